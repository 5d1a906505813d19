// CPU attention for the few queries of a decoding step (mplug_fast::short_query_attention), fp32:
// out[b, h, g] = softmax(scale * q[b, h, g] . k[b, h, j] over the keys j that key_mask[b] keeps) @ v[b, h, :]
// q [B, H, G, D]; k, v [B, H, M, D], each with the head dim contiguous (any other strides: the views of a
// fused K/V projection or of a KV cache are read in place); key_mask bool [B, M] or none; a row whose mask
// keeps no key gives 0 (mplug_fast.ops.reference semantics) -> out [B, H, G, D] contiguous.
//
// At a few queries per head, torch's attention kernels spend most of their time on blocking meant for long
// query blocks. Here each (b, h) is three passes over the keys, all AVX2 FMA:
//   scores  the q rows against 2 keys at a time in 5 x 2 register tiles over D (dot products, the sums taken
//           by one horizontal-add tree per query row);
//   softmax max, exp (a vectorised exp: range reduction to [-ln2/2, ln2/2], degree-6 polynomial, the
//           power of two put into the exponent bits; within 2 ulp of expf) and sum per query row;
//   values  5 query rows x 16 output lanes of registers, each V row loaded once per tile and scaled by the
//           rows' probabilities (broadcast), the 1 / sum applied at the end.
// Keys go in blocks of 64 (a block's K or V rows stay in L1 while every row tile reads them). The first row
// tile of a block prefetches the next block's K rows and this block's V rows, and the value pass prefetches
// the next head's K rows, so that the memory stream overlaps the FMAs.
// Threads split the (b, h) pairs (at::parallel_for): one summation order whatever the thread count.
// Without AVX2 + FMA (checked at run time) it returns the same computation in ATen ops.
#include "../ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace mplug_fast {
namespace {

// Register tiles of 5 query rows (the beams of one image) x 2 keys (scores) or x 2 vectors of 8 head dims
// (values): 10 accumulators + 3 operands, within the 16 AVX2 registers.
constexpr int kRows = 5;   // query rows per register tile
constexpr int kKeys = 2;   // keys per score tile
constexpr int kLanes = 2;  // 8-float vectors of output per value tile (16 head dims)
constexpr int64_t kBlock = 64;  // keys per block (64 x D floats of K or V stay in L1)

// The 4 horizontal sums of a[0..3], in order.
__attribute__((target("avx2,fma"))) inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// e^x for x <= 0 (scores minus their row max); below the float range's end it returns 0.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.33654f);
  const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 split in a part exact in float and the rest.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

struct Head {
  const float* q;       // [G, D], row stride sq
  const float* k;       // [M, D], row stride sk
  const float* v;       // [M, D], row stride sv
  float* out;           // [G, D] contiguous
  const float* next_k;  // the K rows of the next head this thread runs (prefetched), or nullptr
  const bool* mask;     // [M], true = attend, or nullptr (every key)
  int64_t G, M, D, sq, sk, sv;
};

// Asks for the cache lines of row `row` ([D] floats) ahead of its use.
template <_mm_hint Hint>
inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) _mm_prefetch(reinterpret_cast<const char*>(row + d), Hint);
}

// s[r, j + c] = q[r] . k[j + c] for R query rows and C keys; q [R, D] (row stride sq), k rows at stride sk,
// s rows at stride M. Arguments are plain values (not the Head) so that the accumulators stay in registers.
template <int R, int C>
__attribute__((target("avx2,fma"))) inline void score_tile(const float* q, int64_t sq, const float* k, int64_t sk,
                                                          int64_t D, float* s, int64_t M) {
  static_assert(C == 1 || C == 2, "the sums below take one or two keys");
  __m256 acc[R * C];  // one flat array with unrolled loops: GCC then keeps it in registers
#pragma GCC unroll 16
  for (int i = 0; i < R * C; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 kv[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) kv[c] = _mm256_loadu_ps(k + c * sk + d);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 qv = _mm256_loadu_ps(q + r * sq + d);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[r * C + c] = _mm256_fmadd_ps(qv, kv[c], acc[r * C + c]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    alignas(16) float sums[4];
    _mm_store_ps(sums, sum4(acc[r * C], C > 1 ? acc[r * C + C - 1] : zero, zero, zero));
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) s[r * M + c] = sums[c];
  }
}

// Scores of R query rows (from row g) against the keys [j0, j1).
template <int R>
__attribute__((target("avx2,fma"))) void scores(const Head& h, int64_t g, int64_t j0, int64_t j1, float* s) {
  const float* q = h.q + g * h.sq;
  float* sg = s + g * h.M;
  // The first row tile streams the memory: it asks for the next block's K rows (into L1) and this block's
  // V rows (into L2, for the value pass), so that the loads overlap the FMAs.
  const bool first = g == 0;
  int64_t j = j0;
  for (; j + kKeys <= j1; j += kKeys) {
    if (first) {
      for (int64_t c = j; c < j + kKeys; ++c) {
        if (c + kBlock < h.M) prefetch_row<_MM_HINT_T0>(h.k + (c + kBlock) * h.sk, h.D);
        prefetch_row<_MM_HINT_T1>(h.v + c * h.sv, h.D);
      }
    }
    score_tile<R, kKeys>(q, h.sq, h.k + j * h.sk, h.sk, h.D, sg + j, h.M);
  }
  for (; j < j1; ++j) {
    if (first) prefetch_row<_MM_HINT_T1>(h.v + j * h.sv, h.D);
    score_tile<R, 1>(q, h.sq, h.k + j * h.sk, h.sk, h.D, sg + j, h.M);
  }
}

// In place: s[g] <- exp(scale * (s[g] - max s[g])) over the keys `mask` keeps (the others get 0); returns
// 1 / the row's sum, or 0 when the mask keeps no key (the row's output is then 0).
__attribute__((target("avx2,fma"))) float softmax_row(float* s, int64_t M, float scale, const bool* mask) {
  if (mask != nullptr) {
    for (int64_t j = 0; j < M; ++j) s[j] = mask[j] ? s[j] : -INFINITY;
  }
  float m = -INFINITY;
  for (int64_t j = 0; j < M; ++j) m = std::max(m, s[j]);
  if (m == -INFINITY) {
    std::fill(s, s + M, 0.0f);
    return 0.0f;
  }
  const __m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= M; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm), vs));
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  const __m256 zero = _mm256_setzero_ps();
  float sum = _mm_cvtss_f32(sum4(vsum, zero, zero, zero));
  for (; j < M; ++j) {
    s[j] = std::exp((s[j] - m) * scale);
    sum += s[j];
  }
  return 1.0f / sum;
}

// acc[r, 0 : 8 L] += sum_{j < n} p[r, j] v[j, 0 : 8 L], for R rows: p rows at stride M, v rows at stride sv,
// acc rows at stride D (plain values, so that the accumulators stay in registers).
template <int R, int L>
__attribute__((target("avx2,fma"))) inline void value_tile(const float* p, int64_t M, const float* v, int64_t sv,
                                                          int64_t n, float* acc_out, int64_t D) {
  __m256 acc[R * L];  // one flat array with unrolled loops: GCC then keeps it in registers
#pragma GCC unroll 16
  for (int i = 0; i < R * L; ++i) acc[i] = _mm256_loadu_ps(acc_out + (i / L) * D + 8 * (i % L));
  for (int64_t j = 0; j < n; ++j) {
    __m256 vv[L];
#pragma GCC unroll 16
    for (int c = 0; c < L; ++c) vv[c] = _mm256_loadu_ps(v + j * sv + 8 * c);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + r * M + j);
#pragma GCC unroll 16
      for (int c = 0; c < L; ++c) acc[r * L + c] = _mm256_fmadd_ps(pr, vv[c], acc[r * L + c]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R * L; ++i) _mm256_storeu_ps(acc_out + (i / L) * D + 8 * (i % L), acc[i]);
}

// The value sums of R query rows (from row g) over the keys [j0, j1).
template <int R>
__attribute__((target("avx2,fma"))) void values(const Head& h, const float* p, float* acc, int64_t g, int64_t j0,
                                                int64_t j1) {
  const float* pg = p + g * h.M + j0;
  const float* v = h.v + j0 * h.sv;
  float* ag = acc + g * h.D;
  if (g == 0 && h.next_k != nullptr) {  // the next head's K rows of this block, into L2
    for (int64_t j = j0; j < j1; ++j) prefetch_row<_MM_HINT_T1>(h.next_k + j * h.sk, h.D);
  }
  int64_t d0 = 0;
  for (; d0 + 8 * kLanes <= h.D; d0 += 8 * kLanes) value_tile<R, kLanes>(pg, h.M, v + d0, h.sv, j1 - j0, ag + d0, h.D);
  for (; d0 < h.D; d0 += 8) value_tile<R, 1>(pg, h.M, v + d0, h.sv, j1 - j0, ag + d0, h.D);
}

// `fn<R>(g)` over the query rows in tiles of kRows, then the tail tile.
template <typename Fn>
inline void row_tiles(int64_t G, Fn&& fn) {
  int64_t g = 0;
  for (; g + kRows <= G; g += kRows) fn(std::integral_constant<int, kRows>{}, g);
  if (G - g == 4) fn(std::integral_constant<int, 4>{}, g);
  if (G - g == 3) fn(std::integral_constant<int, 3>{}, g);
  if (G - g == 2) fn(std::integral_constant<int, 2>{}, g);
  if (G - g == 1) fn(std::integral_constant<int, 1>{}, g);
}

// One (b, h): keys in blocks of kBlock, so a block's K (then V) rows stay in L1 while every row tile reads
// them. buf: the scores [G, M] (every entry written), the output sums [G, D] (zeroed), the rows' 1 / sum [G].
__attribute__((target("avx2,fma"))) void attend_head(const Head& h, float scale, std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(h.G * h.M + h.G * h.D + h.G));
  float* s = buf.data();
  float* acc = s + h.G * h.M;
  float* inv = acc + h.G * h.D;
  std::fill(acc, inv, 0.0f);
  for (int64_t j0 = 0; j0 < h.M; j0 += kBlock) {
    const int64_t j1 = std::min(h.M, j0 + kBlock);
    row_tiles(h.G, [&](auto R, int64_t g) { scores<decltype(R)::value>(h, g, j0, j1, s); });
  }
  for (int64_t r = 0; r < h.G; ++r) inv[r] = softmax_row(s + r * h.M, h.M, scale, h.mask);
  for (int64_t j0 = 0; j0 < h.M; j0 += kBlock) {
    const int64_t j1 = std::min(h.M, j0 + kBlock);
    row_tiles(h.G, [&](auto R, int64_t g) { values<decltype(R)::value>(h, s, acc, g, j0, j1); });
  }
  for (int64_t r = 0; r < h.G; ++r)
    for (int64_t d = 0; d < h.D; ++d) h.out[r * h.D + d] = acc[r * h.D + d] * inv[r];
}

}  // namespace

at::Tensor short_query_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& key_mask, double scale) {
  check_short_query_attention(q, k, v, key_mask);
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), M = k.size(2);
  if (!cpu_has_avx2_fma()) {
    at::Tensor scores = at::matmul(q, k.transpose(-1, -2)).mul(scale);
    if (key_mask.has_value()) scores = scores.masked_fill(key_mask->logical_not().view({B, 1, 1, M}), -INFINITY);
    return at::matmul(scores.softmax(-1).nan_to_num(0.0), v).contiguous();  // no key: NaN -> 0
  }
  const at::Tensor mask = key_mask.has_value() ? key_mask->contiguous() : at::Tensor();
  const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  at::Tensor out = at::empty({B, H, G, D}, q.options());
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, hh = i % H, nb = (i + 1) / H, nh = (i + 1) % H;
      const Head h{qp + b * q.stride(0) + hh * q.stride(1),
                   kp + b * k.stride(0) + hh * k.stride(1),
                   vp + b * v.stride(0) + hh * v.stride(1),
                   op + i * G * D,
                   i + 1 < end ? kp + nb * k.stride(0) + nh * k.stride(1) : nullptr,
                   mp != nullptr ? mp + b * M : nullptr,
                   G, M, D, q.stride(2), k.stride(2), v.stride(2)};
      attend_head(h, static_cast<float>(scale), buf);
    }
  });
  return out;
}

void check_short_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& key_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "short_query_attention: q [B, H, G, D], k and v [B, H, M, D] must be 4-D, got ", q.sizes(), ", ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "short_query_attention: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "short_query_attention: q ", q.sizes(), " does not match k ", k.sizes(), " in B, H or D");
  TORCH_CHECK(k.size(2) > 0, "short_query_attention: no keys (M = 0)");
  TORCH_CHECK(q.size(3) % 8 == 0, "short_query_attention: head dim ", q.size(3), " is not a multiple of 8");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "short_query_attention: float32 only, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "short_query_attention: the head dim of q, k and v must be contiguous (stride 1)");
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == k.size(0) &&
                    key_mask->size(1) == k.size(2),
                "short_query_attention: key_mask must be bool [B, M] = [", k.size(0), ", ", k.size(2), "], got ",
                key_mask->scalar_type(), " ", key_mask->sizes());
  }
}

}  // namespace mplug_fast
