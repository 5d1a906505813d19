// CPU linear layer for the few rows of a decoding step (mplug_fast::small_linear): y = x W^T + b, fp32,
// x [M, K], W [N, K] (nn.Linear's layout, read once), b [N] or none -> y [M, N].
//
// A BLAS GEMM is tuned for many rows; at a few rows it leaves most of the FMA throughput unused. Here every
// output is a dot product over K computed in 8-wide AVX2 FMA lanes, in register tiles of 3 rows x 4 weight
// rows (12 accumulators; each weight vector loaded once per tile and used by 3 rows), K in chunks that keep
// the tile's weight rows in L1, the lanes summed at the end. The first row tile of a block prefetches the
// next block's weight rows (into L2), so that the weight stream overlaps the FMAs. Threads split the weight
// rows (at::parallel_for), so each output has one fixed summation order whatever the thread count. Without
// AVX2 + FMA (checked at run time) it returns at::linear.
#include "../ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <immintrin.h>

#include <algorithm>

namespace mplug_fast {
namespace {

constexpr int kRowTile = 3;       // x rows per register tile
constexpr int kColTile = 4;       // weight rows (outputs) per register tile
constexpr int kRowGroup = 48;     // x rows whose partial sums are kept between K chunks
constexpr int64_t kChunk = 1024;  // K elements per pass (4 weight rows x 4 KB stay in L1)

__attribute__((target("avx2,fma"))) inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc[r][c] += x[r, k0:k1] * w[c, k0:k1] lane-wise (8 lanes), for r < R, c < C; k1 - k0 a multiple of 8.
// With `next` (the following weight rows, or nullptr), asks for their cache lines at the same k, one line
// of each of kColTile rows every 16 k: the next block's rows arrive while these FMAs run.
template <int R, int C>
__attribute__((target("avx2,fma"))) inline void tile(const float* x, const float* w, __m256 (*acc)[kColTile],
                                                    int64_t k0, int64_t k1, int64_t K, const float* next) {
  __m256 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = acc[r][c];
  for (int64_t k = k0; k < k1; k += 8) {
    if (next != nullptr && (k & 15) == 0) {
      for (int c = 0; c < kColTile; ++c) _mm_prefetch(reinterpret_cast<const char*>(next + c * K + k), _MM_HINT_T1);
    }
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(w + c * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int c = 0; c < C; ++c) a[r][c] = _mm256_fmadd_ps(xv, wv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = a[r][c];
}

// Up to kRowGroup rows of x against C weight rows. K is walked in chunks of kChunk (the C weight rows of a
// chunk stay in L1 while every row tile reads them); the 8-lane partial sums live in `acc` between chunks.
// Each output: lanes summed, then the K % 8 tail, then the bias (the same order for every M and thread).
// `next`: the weight rows of the block that follows (prefetched by the first row tile), or nullptr.
template <int C>
__attribute__((target("avx2,fma"))) void column_block(const float* x, const float* w, const float* b, float* y,
                                                      int64_t M, int64_t K, int64_t N, const float* next) {
  __m256 acc[kRowGroup][kColTile];
  const int64_t K8 = K - K % 8;
  for (int64_t g = 0; g < M; g += kRowGroup) {
    const int64_t rows = std::min<int64_t>(kRowGroup, M - g);
    const float* xg = x + g * K;
    for (int64_t r = 0; r < rows; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K8; k0 += kChunk) {
      const int64_t k1 = std::min(K8, k0 + kChunk);
      const float* pf = g == 0 ? next : nullptr;  // the first pass over this chunk streams the next rows
      int64_t m = 0;
      for (; m + kRowTile <= rows; m += kRowTile, pf = nullptr) {
        tile<kRowTile, C>(xg + m * K, w, acc + m, k0, k1, K, pf);
      }
      if (rows - m == 2) tile<2, C>(xg + m * K, w, acc + m, k0, k1, K, pf);
      if (rows - m == 1) tile<1, C>(xg + m * K, w, acc + m, k0, k1, K, pf);
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int c = 0; c < C; ++c) {
        float sum = lane_sum(acc[r][c]);
        for (int64_t k = K8; k < K; ++k) sum += xg[r * K + k] * w[c * K + k];
        y[(g + r) * N + c] = sum + (b != nullptr ? b[c] : 0.0f);
      }
    }
  }
}

}  // namespace

bool cpu_has_avx2_fma() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}

at::Tensor small_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_small_linear(x, weight, bias);
  if (!cpu_has_avx2_fma()) return at::linear(x, weight, bias);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* wp = wc.const_data_ptr<float>();
  const float* bp = bc.defined() ? bc.const_data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t blocks = N / kColTile;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t n = j * kColTile;
      const float* next = j + 1 < end ? wp + (n + kColTile) * K : nullptr;
      column_block<kColTile>(xp, wp + n * K, bp != nullptr ? bp + n : nullptr, yp + n, M, K, N, next);
    }
  });
  for (int64_t n = blocks * kColTile; n < N; ++n)
    column_block<1>(xp, wp + n * K, bp != nullptr ? bp + n : nullptr, yp + n, M, K, N, nullptr);
  return y;
}

void check_small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "small_linear: x [M, K] and weight [N, K] must be 2-D, got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "small_linear: x has K=", x.size(1), ", weight K=", weight.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "small_linear: float32 only, got ", x.scalar_type(), " and ", weight.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == at::kFloat,
                "small_linear: bias must be float32 [N] with N=", weight.size(0), ", got ", bias->sizes());
  }
}

}  // namespace mplug_fast
