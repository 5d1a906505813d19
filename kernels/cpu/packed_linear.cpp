// CPU linear layer on a weight stored as panels (mplug_fast::packed_linear): y = x W^T + b, fp32,
// x [M, K], packed [N/16, K, 16] with packed[p, k, j] = W[16 p + j, k], b [N] or none -> y [M, N].
//
// A decoding step multiplies every weight by a few rows while the weights stream from DRAM. In nn.Linear's
// layout a register tile of 4 outputs reads 4 weight rows at once (4 streams) and ends with lane sums. In
// panels the 16 outputs of a panel are two vectors per k, and the whole panel is one sequential stream:
// for each k, x[m, k] is broadcast and multiplied into the panel's two vectors, in tiles of 5 rows x 2
// vectors (10 independent accumulators, the FMA latency covered), the stream prefetched 4 KB ahead (the
// hardware prefetcher alone left a core's loads waiting: 15-20 % slower). Each output is a plain sum over
// k = 0 .. K-1 in order, plus the bias at the end: one summation order for every M and thread count.
// Rows are taken in blocks whose x fits in L2 (for long inputs the panels are re-read per block from the
// last-level cache, not x per panel from DRAM); threads split the panels (at::parallel_for). Without AVX2 +
// FMA (checked at run time) it returns at::linear on the unpacked weight.
#include "../ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <immintrin.h>

#include <algorithm>

namespace mplug_fast {
namespace {

constexpr int64_t kPanel = 16;          // outputs per panel (two 8-lane vectors)
constexpr int kRowTile = 5;             // x rows per register tile
constexpr int64_t kAhead = 64;          // the weight line asked for, in k steps ahead (4 KB of the stream)
constexpr int64_t kBlockBytes = 96 << 10;  // x rows per block: about this many bytes (half of a 512 KB L2 or less)

// y[r, 0:16] = x[r, :] . panel + b for r < R (x rows at stride K, y rows at stride N).
template <int R>
__attribute__((target("avx2,fma"))) inline void panel_tile(const float* x, const float* panel, const float* b,
                                                          float* y, int64_t K, int64_t N) {
  // The row loops are unrolled first (the pragmas), so that the accumulators live in registers: left to
  // the later unrolling, GCC 12 stores all ten to the stack on every k.
  __m256 a[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    // One 64-byte line per k: ask for the line kAhead steps on (past the panel's end: the next panel's,
    // which this thread reads next; a prefetch never faults).
    _mm_prefetch(reinterpret_cast<const char*>(panel + (k + kAhead) * kPanel), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel), w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * K + k);
      a[r][0] = _mm256_fmadd_ps(xv, w0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(xv, w1, a[r][1]);
    }
  }
  const __m256 b0 = b != nullptr ? _mm256_loadu_ps(b) : _mm256_setzero_ps();
  const __m256 b1 = b != nullptr ? _mm256_loadu_ps(b + 8) : _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * N, _mm256_add_ps(a[r][0], b0));
    _mm256_storeu_ps(y + r * N + 8, _mm256_add_ps(a[r][1], b1));
  }
}

// Rows [0, rows) of x against one panel: tiles of kRowTile rows, then one tile of the rest.
__attribute__((target("avx2,fma"))) void panel_rows(const float* x, const float* panel, const float* b, float* y,
                                                    int64_t rows, int64_t K, int64_t N) {
  int64_t m = 0;
  for (; m + kRowTile <= rows; m += kRowTile) panel_tile<kRowTile>(x + m * K, panel, b, y + m * N, K, N);
  switch (rows - m) {
    case 4: panel_tile<4>(x + m * K, panel, b, y + m * N, K, N); break;
    case 3: panel_tile<3>(x + m * K, panel, b, y + m * N, K, N); break;
    case 2: panel_tile<2>(x + m * K, panel, b, y + m * N, K, N); break;
    case 1: panel_tile<1>(x + m * K, panel, b, y + m * N, K, N); break;
    default: break;
  }
}

// packed [N/16, K, 16] -> the weight [N, K] (the fallback without AVX2).
at::Tensor unpack_panels(const at::Tensor& packed) {
  return packed.permute({0, 2, 1}).reshape({packed.size(0) * packed.size(2), packed.size(1)});
}

}  // namespace

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  check_packed_linear(x, packed, bias);
  if (!cpu_has_avx2_fma()) return at::linear(x, unpack_panels(packed), bias);
  const at::Tensor xc = x.contiguous(), wc = packed.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t M = xc.size(0), K = xc.size(1), panels = wc.size(0), N = panels * kPanel;
  at::Tensor y = at::empty({M, N}, xc.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* wp = wc.const_data_ptr<float>();
  const float* bp = bc.defined() ? bc.const_data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t block = std::max<int64_t>(kRowTile, kBlockBytes / (K * 4) / kRowTile * kRowTile);
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t rows = std::min(block, M - m0);
    at::parallel_for(0, panels, 4, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        panel_rows(xp + m0 * K, wp + p * K * kPanel, bp != nullptr ? bp + p * kPanel : nullptr,
                   yp + m0 * N + p * kPanel, rows, K, N);
      }
    });
  }
  return y;
}

void check_packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == kPanel,
              "packed_linear: x [M, K] and packed [N/16, K, 16] expected, got ", x.sizes(), " and ",
              packed.sizes());
  TORCH_CHECK(x.size(1) == packed.size(1), "packed_linear: x has K=", x.size(1), ", the weight K=", packed.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "packed_linear: float32 only, got ", x.scalar_type(), " and ", packed.scalar_type());
  if (bias.has_value()) {
    const int64_t N = packed.size(0) * kPanel;
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat,
                "packed_linear: bias must be float32 [N] with N=", N, ", got ", bias->sizes());
  }
}

}  // namespace mplug_fast
