// CUDA beam-search step (mplug_fast::beam_step): one block per open sample, no host synchronisation.
//
// log-softmax (ATen, the Python path's kernel), then per block: every thread keeps the top n (K official,
// 2K standard) of its strided share of the K x V scores, in (score descending, index ascending) order; n
// block-wide arg-max rounds merge them; thread 0 makes the per-sample decisions (recording, the standard
// merge into the kept best K, closing) and the block copies the sequences. Same fp32 operations as the
// CPU kernel and the Python twin (built with --fmad=false).
#include "../ops.h"

#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/log_softmax.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>

namespace mplug_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBeams = 16;
constexpr int kMaxN = 2 * kMaxBeams;

struct Cand {
  float v;
  int i;
};

__device__ __forceinline__ bool better(const Cand& a, const Cand& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

struct Entry {  // a finished hypothesis being merged: score, source row in the scratch, length
  float v;
  int src;
  int64_t len;
};

struct Params {
  const float* logp;
  float* running;
  int64_t* seq;
  bool* closed;
  const int64_t* open_ids;
  float* fin_scores;
  int64_t* fin_seqs;
  int64_t* fin_lengths;
  int64_t* steps;
  int64_t* beam;
  int64_t* token;
  int64_t* scratch;  // [Bo, n + K, L]: the n candidate sequences, then a copy of the kept K (standard)
  int K, V, L, S, n, prompt_len, step, eos_id;
  bool forbid_eos, last, official, exact;
  float lp, bound_lp;
};

// Stable insertion of `e` into the descending list `list` of `count` entries (after equal scores).
__device__ void insert_entry(Entry* list, int& count, Entry e) {
  int j = count++;
  while (j > 0 && e.v > list[j - 1].v) {
    list[j] = list[j - 1];
    --j;
  }
  list[j] = e;
}

__global__ void __launch_bounds__(kThreads) beam_step_kernel(Params p) {
  const int b = blockIdx.x, tid = threadIdx.x, K = p.K, V = p.V, L = p.L, n = p.n;
  __shared__ Cand heads[kThreads];
  __shared__ float top_v[kMaxN];
  __shared__ int top_i[kMaxN];
  __shared__ int fin_src[kMaxBeams], keep[kMaxBeams];
  __shared__ bool is_closed;
  if (tid == 0) is_closed = p.closed[b];
  __syncthreads();
  if (is_closed) {  // frozen until the caller drops it
    if (tid < K) p.beam[b * K + tid] = tid, p.token[b * K + tid] = 0;
    return;
  }
  // 1. This thread's top n of columns tid, tid + kThreads, ... (increasing index: ties keep the first).
  Cand local[kMaxN];
  int count = 0;
  const float* logp = p.logp + static_cast<int64_t>(b) * K * V;
  const float* run = p.running + b * K;
  for (int c = tid; c < K * V; c += kThreads) {
    const int k = c / V, v = c - k * V;
    const float x = (p.forbid_eos && v == p.eos_id) ? kNegEos : logp[c];
    const float total = x + run[k];
    const Cand e{p.official ? total / p.lp : total, c};
    if (count == n) {
      if (!(e.v > local[n - 1].v)) continue;
      --count;
    }
    int j = count++;
    while (j > 0 && e.v > local[j - 1].v) {
      local[j] = local[j - 1];
      --j;
    }
    local[j] = e;
  }
  // 2. n block-wide arg-max rounds over the threads' list heads.
  int head = 0;
  for (int r = 0; r < n; ++r) {
    const Cand mine = head < count ? local[head] : Cand{-INFINITY, INT_MAX};
    heads[tid] = mine;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (tid < s && better(heads[tid + s], heads[tid])) heads[tid] = heads[tid + s];
      __syncthreads();
    }
    const Cand best = heads[0];
    if (head < count && best.i == mine.i) ++head;
    if (tid == 0) top_v[r] = best.v, top_i[r] = best.i;
    __syncthreads();
  }
  // 3. Candidate sequences (and, standard, the kept hypotheses) into the scratch rows.
  const int64_t s_id = p.open_ids[b];
  int64_t* scratch = p.scratch + static_cast<int64_t>(b) * (n + K) * L;
  for (int e = tid; e < n * L; e += kThreads) {
    const int c = e / L, q = e - c * L;
    scratch[e] = q == p.prompt_len + p.step ? top_i[c] % V
                                            : p.seq[(static_cast<int64_t>(b) * K + top_i[c] / V) * L + q];
  }
  if (!p.official) {
    for (int e = tid; e < K * L; e += kThreads) scratch[n * L + e] = p.fin_seqs[s_id * p.S * L + e];
  }
  __syncthreads();
  // 4. The decisions (thread 0).
  const int64_t length = p.prompt_len + p.step + 1;
  if (tid == 0) {
    p.steps[s_id] = p.step + 1;
    if (p.official) {
      const bool closing = p.last || (p.eos_id >= 0 && top_i[0] % V == p.eos_id);
      for (int k = 0; k < K; ++k) {
        const int tok = top_i[k] % V;
        const bool record = closing || (p.eos_id >= 0 && tok == p.eos_id);
        const int64_t slot = s_id * p.S + static_cast<int64_t>(p.step) * K + k;
        p.fin_scores[slot] = record ? top_v[k] : -INFINITY;
        p.fin_lengths[slot] = length;
        p.running[b * K + k] = top_v[k] * p.lp;
        p.beam[b * K + k] = top_i[k] / V;
        p.token[b * K + k] = tok;
        fin_src[k] = keep[k] = k;
      }
      p.closed[b] = closing;
    } else {
      Entry list[3 * kMaxBeams];
      int size = 0;
      float* fs = p.fin_scores + s_id * p.S;
      int64_t* fl = p.fin_lengths + s_id * p.S;
      for (int k = 0; k < K; ++k) insert_entry(list, size, Entry{fs[k], n + k, fl[k]});
      int kept = 0;
      for (int c = 0; c < n; ++c) {  // finished candidates (a [SEP] ranked below K is dropped)
        const bool is_eos = p.eos_id >= 0 && top_i[c] % V == p.eos_id;
        const bool finished = is_eos && c < K && top_v[c] > kNegEos / 2;
        insert_entry(list, size, Entry{finished ? top_v[c] / p.lp : -INFINITY, c, length});
        if (!is_eos && kept < K) keep[kept++] = c;
      }
      for (int c = 0; c < n && kept < K; ++c) {  // only if fewer than K non-[SEP] candidates
        if (p.eos_id >= 0 && top_i[c] % V == p.eos_id) keep[kept++] = c;
      }
      size = K;
      for (int k = 0; k < K; ++k) {
        const int c = keep[k];
        p.running[b * K + k] = top_v[c];
        p.beam[b * K + k] = top_i[c] / V;
        p.token[b * K + k] = top_i[c] % V;
      }
      if (p.last) {  // beams still running hit max_length
        for (int k = 0; k < K; ++k) insert_entry(list, size, Entry{top_v[keep[k]] / p.lp, keep[k], length});
        size = K;
        p.closed[b] = true;
      } else {
        const float worst = list[K - 1].v;
        p.closed[b] = worst > -INFINITY && top_v[keep[0]] / p.bound_lp <= worst;
      }
      for (int k = 0; k < K; ++k) fs[k] = list[k].v, fl[k] = list[k].len, fin_src[k] = list[k].src;
    }
  }
  __syncthreads();
  // 5. The sequences: new beams and finished hypotheses.
  const int64_t fin_base = s_id * p.S + (p.official ? static_cast<int64_t>(p.step) * K : 0);
  for (int e = tid; e < K * L; e += kThreads) {
    const int k = e / L, q = e - k * L;
    p.seq[(static_cast<int64_t>(b) * K + k) * L + q] = scratch[keep[k] * L + q];
    p.fin_seqs[(fin_base + k) * L + q] = scratch[fin_src[k] * L + q];
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> beam_step_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, at::Tensor& running, at::Tensor& seq,
    at::Tensor& closed, const at::Tensor& open_ids, at::Tensor& fin_scores, at::Tensor& fin_seqs,
    at::Tensor& fin_lengths, at::Tensor& steps, int64_t step, int64_t prompt_len, int64_t max_length,
    int64_t min_length, int64_t eos_id, double alpha, bool official, bool exact) {
  check_beam_step(logits, bias, running, seq, closed, open_ids, fin_scores, fin_seqs, fin_lengths, steps, step,
                  prompt_len, max_length, official);
  const int64_t Bo = running.size(0), K = running.size(1), V = logits.size(1), L = seq.size(2);
  TORCH_CHECK(K <= kMaxBeams, "beam_step (CUDA): at most ", kMaxBeams, " beams, got ", K);
  TORCH_CHECK(K * V < INT_MAX, "beam_step (CUDA): K * V must fit in int32");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor logp = at::log_softmax(bias.has_value() ? at::add(logits, *bias) : logits, -1).contiguous();
  auto long_options = running.options().dtype(at::kLong);
  at::Tensor beam = at::empty({Bo, K}, long_options), token = at::empty({Bo, K}, long_options);
  const int n = static_cast<int>(official ? K : 2 * K);
  at::Tensor scratch = at::empty({Bo, n + K, L}, long_options);
  if (Bo == 0) return {beam, token};
  Params p{logp.const_data_ptr<float>(),
           running.data_ptr<float>(),
           seq.data_ptr<int64_t>(),
           closed.data_ptr<bool>(),
           open_ids.const_data_ptr<int64_t>(),
           fin_scores.data_ptr<float>(),
           fin_seqs.data_ptr<int64_t>(),
           fin_lengths.data_ptr<int64_t>(),
           steps.data_ptr<int64_t>(),
           beam.data_ptr<int64_t>(),
           token.data_ptr<int64_t>(),
           scratch.data_ptr<int64_t>(),
           static_cast<int>(K),
           static_cast<int>(V),
           static_cast<int>(L),
           static_cast<int>(fin_scores.size(1)),
           n,
           static_cast<int>(prompt_len),
           static_cast<int>(step),
           static_cast<int>(eos_id),
           step < min_length && eos_id >= 0,
           step + 1 == max_length,
           official,
           exact,
           gnmt_length_penalty(step, alpha),
           exact ? gnmt_length_penalty(max_length - 1, alpha) : gnmt_length_penalty(step, alpha)};
  beam_step_kernel<<<static_cast<unsigned>(Bo), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {beam, token};
}

}  // namespace mplug_fast
