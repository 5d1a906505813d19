// The mplug_fast native ops: schemas, shape checks, and the CPU / CUDA / Meta registrations.
// Importing `mplug_fast._C` (this library) registers them as torch.ops.mplug_fast.*.
//
// beam_step: one beam-search step for the Bo open samples of a batch of B (K beams, vocabulary V):
//   logits [Bo*K, V] fp32, bias [V] fp32 or None (added before the log-softmax),
//   running [Bo, K] fp32 (official: the unpenalized cumulative score, -inf for dead beams; standard: the
//   cumulative log-prob), seq long [Bo, K, Lbuf], closed bool [Bo], open_ids long [Bo] (each row's sample),
//   finished-hypothesis buffers indexed by sample: fin_scores fp32 [B, S], fin_seqs long [B, S, Lbuf],
//   fin_lengths long [B, S] (official: S = max_length * K, slot step * K + k; standard: S = K, the best K
//   sorted), steps long [B] (steps run per sample). Updates them in place and returns (beam, token).
// reorder_caches: dst[i][:, n, :, :length] = src[i][:, index[n], :, :length], each [P, N, X, Lmax, Dh].
// small_linear: x [M, K] @ weight [N, K]^T + bias, fp32, for the few rows of a decoding step (CPU).
// packed_linear: the same with the weight as panels [N/16, K, 16] (CPU).
// short_query_attention: softmax(scale q k^T) v, q [B, H, G, D], k and v [B, H, M, D], key_mask bool [B, M] or
//   none, fp32 (CPU).
// decode_layers: the post-LN decoder layers of one cached decoding step, x [N, D] -> [N, D], writing the new
//   keys / values into cache_k, cache_v [layers, N, H, Lmax, Dh] at `length` (CPU; see ops.h).
// parallel_threads: how many threads at::parallel_for gives the CPU ops (1 in a build without OpenMP).
#include "ops.h"

#include <ATen/ops/empty.h>
#include <Python.h>
#include <torch/library.h>

namespace mplug_fast {

void check_beam_step(const at::Tensor& logits, const std::optional<at::Tensor>& bias, const at::Tensor& running,
                     const at::Tensor& seq, const at::Tensor& closed, const at::Tensor& open_ids,
                     const at::Tensor& fin_scores, const at::Tensor& fin_seqs, const at::Tensor& fin_lengths,
                     const at::Tensor& steps, int64_t step, int64_t prompt_len, int64_t max_length,
                     bool official) {
  TORCH_CHECK(running.dim() == 2, "beam_step: running must be [Bo, K], got ", running.sizes());
  const int64_t Bo = running.size(0), K = running.size(1);
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == Bo * K,
              "beam_step: logits must be [Bo*K, V] = [", Bo * K, ", V], got ", logits.sizes());
  const int64_t V = logits.size(1);
  TORCH_CHECK(V >= 2 * K + 1, "beam_step: a vocabulary of ", V, " is too small for ", K, " beams");
  TORCH_CHECK(seq.dim() == 3 && seq.size(0) == Bo && seq.size(1) == K,
              "beam_step: seq must be [Bo, K, Lbuf], got ", seq.sizes());
  const int64_t L = seq.size(2), B = fin_scores.size(0);
  TORCH_CHECK(0 <= step && step < max_length && prompt_len + max_length <= L,
              "beam_step: step ", step, " / prompt_len ", prompt_len, " / max_length ", max_length,
              " do not fit seq of length ", L);
  const int64_t S = official ? max_length * K : K;
  TORCH_CHECK(fin_scores.dim() == 2 && fin_scores.size(1) == S, "beam_step: fin_scores must be [B, ", S,
              "], got ", fin_scores.sizes());
  TORCH_CHECK(fin_seqs.dim() == 3 && fin_seqs.size(0) == B && fin_seqs.size(1) == S && fin_seqs.size(2) == L,
              "beam_step: fin_seqs must be [B, S, Lbuf], got ", fin_seqs.sizes());
  TORCH_CHECK(fin_lengths.sizes() == fin_scores.sizes(), "beam_step: fin_lengths must be [B, S]");
  TORCH_CHECK(closed.dim() == 1 && closed.size(0) == Bo && open_ids.dim() == 1 && open_ids.size(0) == Bo,
              "beam_step: closed and open_ids must be [Bo]");
  TORCH_CHECK(steps.dim() == 1 && steps.size(0) == B, "beam_step: steps must be [B]");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && running.scalar_type() == at::kFloat &&
                  fin_scores.scalar_type() == at::kFloat,
              "beam_step: logits, running and fin_scores must be float32");
  TORCH_CHECK(seq.scalar_type() == at::kLong && open_ids.scalar_type() == at::kLong &&
                  fin_seqs.scalar_type() == at::kLong && fin_lengths.scalar_type() == at::kLong &&
                  steps.scalar_type() == at::kLong,
              "beam_step: seq, open_ids, fin_seqs, fin_lengths and steps must be int64");
  TORCH_CHECK(closed.scalar_type() == at::kBool, "beam_step: closed must be bool");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V && bias->scalar_type() == at::kFloat,
                "beam_step: bias must be float32 [V]");
  }
  for (const at::Tensor* t : {&running, &seq, &closed, &open_ids, &fin_scores, &fin_seqs, &fin_lengths, &steps}) {
    TORCH_CHECK(t->is_contiguous() && t->device() == logits.device(),
                "beam_step: every state tensor must be contiguous and on the logits' device");
  }
}

void check_reorder_caches(at::TensorList src, at::TensorList dst, const at::Tensor& index, int64_t length) {
  TORCH_CHECK(src.size() == dst.size(), "reorder_caches: ", src.size(), " sources but ", dst.size(), " targets");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "reorder_caches: index must be long [N']");
  for (size_t i = 0; i < src.size(); ++i) {
    const at::Tensor &s = src[i], &d = dst[i];
    TORCH_CHECK(s.dim() == 5 && d.dim() == 5 && s.is_contiguous() && d.is_contiguous(),
                "reorder_caches: caches must be contiguous [P, N, X, Lmax, Dh]");
    TORCH_CHECK(d.size(1) == index.size(0) && s.size(0) == d.size(0) && s.size(2) == d.size(2) &&
                    s.size(3) == d.size(3) && s.size(4) == d.size(4) && s.scalar_type() == d.scalar_type(),
                "reorder_caches: target ", i, " must be the source's shape with N' = ", index.size(0), " rows");
    TORCH_CHECK(d.sizes() == dst[0].sizes() && s.device() == index.device() && d.device() == index.device(),
                "reorder_caches: every target must have one shape, on the index's device");
    TORCH_CHECK(0 <= length && length <= s.size(3), "reorder_caches: length ", length, " outside [0, Lmax]");
  }
}

namespace {

std::tuple<at::Tensor, at::Tensor> beam_step_meta(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, at::Tensor& running, at::Tensor& seq,
    at::Tensor& closed, const at::Tensor& open_ids, at::Tensor& fin_scores, at::Tensor& fin_seqs,
    at::Tensor& fin_lengths, at::Tensor& steps, int64_t step, int64_t prompt_len, int64_t max_length,
    int64_t min_length, int64_t eos_id, double alpha, bool official, bool exact) {
  auto options = running.options().dtype(at::kLong);
  return {at::empty(running.sizes(), options), at::empty(running.sizes(), options)};
}

void reorder_caches_meta(at::TensorList src, at::TensorList dst, const at::Tensor& index, int64_t length) {
  check_reorder_caches(src, dst, index, length);
}

at::Tensor small_linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_small_linear(x, weight, bias);
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

at::Tensor packed_linear_meta(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  check_packed_linear(x, packed, bias);
  return at::empty({x.size(0), packed.size(0) * packed.size(2)}, x.options());
}

at::Tensor short_query_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::optional<at::Tensor>& key_mask, double scale) {
  check_short_query_attention(q, k, v, key_mask);
  return at::empty(q.sizes(), q.options());
}

at::Tensor decode_layers_meta(const at::Tensor& x, at::TensorList params, at::Tensor& cache_k, at::Tensor& cache_v,
                              int64_t length, const std::optional<at::Tensor>& self_mask, at::TensorList memory_k,
                              at::TensorList memory_v, const std::optional<at::Tensor>& memory_mask, double eps) {
  check_decode_layers(x, params, cache_k, cache_v, length, self_mask, memory_k, memory_v, memory_mask);
  return at::empty(x.sizes(), x.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mplug_fast, m) {
  m.def(
      "beam_step(Tensor logits, Tensor? bias, Tensor(a!) running, Tensor(b!) seq, Tensor(c!) closed, "
      "Tensor open_ids, Tensor(d!) fin_scores, Tensor(e!) fin_seqs, Tensor(f!) fin_lengths, Tensor(g!) steps, "
      "int step, int prompt_len, int max_length, int min_length, int eos_id, float alpha, bool official, "
      "bool exact) -> (Tensor, Tensor)");
  m.def("reorder_caches(Tensor[] src, Tensor(a!)[] dst, Tensor index, int length) -> ()");
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor");
  m.def("short_query_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, float scale) -> Tensor");
  m.def(
      "decode_layers(Tensor x, Tensor[] params, Tensor(a!) cache_k, Tensor(b!) cache_v, int length, "
      "Tensor? self_mask, Tensor[] memory_k, Tensor[] memory_v, Tensor? memory_mask, float eps) -> Tensor");
  m.def("parallel_threads() -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(mplug_fast, CPU, m) {
  m.impl("beam_step", &beam_step_cpu);
  m.impl("reorder_caches", &reorder_caches_cpu);
  m.impl("small_linear", &small_linear_cpu);
  m.impl("packed_linear", &packed_linear_cpu);
  m.impl("short_query_attention", &short_query_attention_cpu);
  m.impl("decode_layers", &decode_layers_cpu);
}

TORCH_LIBRARY_IMPL(mplug_fast, Meta, m) {
  m.impl("beam_step", &beam_step_meta);
  m.impl("reorder_caches", &reorder_caches_meta);
  m.impl("small_linear", &small_linear_meta);
  m.impl("packed_linear", &packed_linear_meta);
  m.impl("short_query_attention", &short_query_attention_meta);
  m.impl("decode_layers", &decode_layers_meta);
}

#ifdef MPLUG_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mplug_fast, CUDA, m) {
  m.impl("beam_step", &beam_step_cuda);
  m.impl("reorder_caches", &reorder_caches_cuda);
}
#endif

}  // namespace mplug_fast

// `import mplug_fast._C` loads this library (registering the ops above); the module itself is empty.
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mplug_fast native ops (torch.ops.mplug_fast)", -1,
                                 nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&module_def);
}
