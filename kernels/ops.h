// Declarations of the mplug_fast native ops (schemas in registration.cpp; Python twins in
// mplug_fast/generation/beam_step.py and mplug_fast/modeling/kv_cache.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace mplug_fast {

// The [SEP] log-prob before min_length (official beam search).
constexpr float kNegEos = -1e20f;

// GNMT length penalty at 0-based `step`: ((5 + step + 1) / 6) ** alpha, rounded to fp32 as the
// Python path's tensor / float division does.
inline float gnmt_length_penalty(int64_t step, double alpha) {
  return static_cast<float>(std::pow((5.0 + static_cast<double>(step + 1)) / 6.0, alpha));
}

// One beam-search step for the open samples; see BeamStepArgs in registration.cpp for the schema.
// Returns (beam, token), each long [Bo, K]: the origin beam and the token of every new beam
// (closed samples: beam k -> k, token 0).
std::tuple<at::Tensor, at::Tensor> beam_step_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, at::Tensor& running, at::Tensor& seq,
    at::Tensor& closed, const at::Tensor& open_ids, at::Tensor& fin_scores, at::Tensor& fin_seqs,
    at::Tensor& fin_lengths, at::Tensor& steps, int64_t step, int64_t prompt_len, int64_t max_length,
    int64_t min_length, int64_t eos_id, double alpha, bool official, bool exact);

std::tuple<at::Tensor, at::Tensor> beam_step_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, at::Tensor& running, at::Tensor& seq,
    at::Tensor& closed, const at::Tensor& open_ids, at::Tensor& fin_scores, at::Tensor& fin_seqs,
    at::Tensor& fin_lengths, at::Tensor& steps, int64_t step, int64_t prompt_len, int64_t max_length,
    int64_t min_length, int64_t eos_id, double alpha, bool official, bool exact);

// dst[i][:, n, :, :length] = src[i][:, index[n], :, :length] for every cache tensor i ([P, N, X, Lmax, Dh]).
void reorder_caches_cpu(at::TensorList src, at::TensorList dst, const at::Tensor& index, int64_t length);
void reorder_caches_cuda(at::TensorList src, at::TensorList dst, const at::Tensor& index, int64_t length);

// y = x weight^T + bias for the few rows of a decoding step: x [M, K], weight [N, K], bias [N] (fp32, CPU).
at::Tensor small_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// The same product with the weight stored as panels: x [M, K], packed [N/16, K, 16] (packed[p, k, j] =
// weight[16 p + j, k]), bias [N] (fp32, CPU) -> [M, N].
at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias);

// Whether this CPU runs AVX2 + FMA (checked once at run time): the AVX2 kernels' condition; without it they
// return the same computation in ATen ops.
bool cpu_has_avx2_fma();

// softmax(scale q k^T) v for the few queries of a decoding step: q [B, H, G, D], k and v [B, H, M, D] with the
// head dim contiguous, key_mask bool [B, M] (true = attend; a row with no key gives 0) or none (fp32, CPU)
// -> [B, H, G, D].
at::Tensor short_query_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& key_mask, double scale);

// The post-LN decoder layers of one cached decoding step (one new token per row), fp32 CPU: x [N, D];
// params: 18 per layer (kernels/cpu/decode_layers.cpp; a 3-D linear weight is packed panels); cache_k,
// cache_v [layers, N, H, Lmax, Dh] (the new keys / values are written at `length`); self_mask bool
// [N, length + 1] or none; memory_k, memory_v per layer [Bm, H, M, Dh] (N = Bm x G rows, G per memory row);
// memory_mask bool [Bm, M] or none -> [N, D].
at::Tensor decode_layers_cpu(const at::Tensor& x, at::TensorList params, at::Tensor& cache_k, at::Tensor& cache_v,
                             int64_t length, const std::optional<at::Tensor>& self_mask, at::TensorList memory_k,
                             at::TensorList memory_v, const std::optional<at::Tensor>& memory_mask, double eps);

// The number of threads at::parallel_for gives these ops under the current torch.set_num_threads
// (1 when the library was built without OpenMP).
int64_t parallel_threads();

// Shape and dtype checks shared by the CPU and CUDA implementations.
void check_beam_step(const at::Tensor& logits, const std::optional<at::Tensor>& bias, const at::Tensor& running,
                     const at::Tensor& seq, const at::Tensor& closed, const at::Tensor& open_ids,
                     const at::Tensor& fin_scores, const at::Tensor& fin_seqs, const at::Tensor& fin_lengths,
                     const at::Tensor& steps, int64_t step, int64_t prompt_len, int64_t max_length,
                     bool official);
void check_reorder_caches(at::TensorList src, at::TensorList dst, const at::Tensor& index, int64_t length);
void check_small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
void check_packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias);
void check_short_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& key_mask);
void check_decode_layers(const at::Tensor& x, at::TensorList params, const at::Tensor& cache_k,
                         const at::Tensor& cache_v, int64_t length, const std::optional<at::Tensor>& self_mask,
                         at::TensorList memory_k, at::TensorList memory_v,
                         const std::optional<at::Tensor>& memory_mask);

}  // namespace mplug_fast
