// CPU beam-search step (mplug_fast::beam_step): one task per open sample (at::parallel_for).
//
// Per sample: log-softmax (ATen, the Python path's kernel) -> scores of the K x V continuations ->
// the top K (official) or 2K (standard) in (score descending, index ascending) order -> the new beams,
// their sequences and the finished-hypothesis buffers. Bit-identical to the Python twin
// (mplug_fast/generation/beam_step.py): the same fp32 operations in the same order.
#include "../ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/log_softmax.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace mplug_fast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// The n best of the values pushed in increasing index order: value descending, ties by lower index.
class TopN {
 public:
  explicit TopN(int64_t n) : n_(n) { items_.reserve(n + 1); }

  void push(float value, int64_t index) {
    if (static_cast<int64_t>(items_.size()) == n_) {
      if (!(value > items_.back().value)) return;
      items_.pop_back();
    }
    // After every kept item of a value >= `value` (they came first: lower index).
    auto at = std::upper_bound(items_.begin(), items_.end(), value,
                               [](float v, const Item& item) { return v > item.value; });
    items_.insert(at, Item{value, index});
  }

  float value(int64_t i) const { return items_[i].value; }
  int64_t index(int64_t i) const { return items_[i].index; }

 private:
  struct Item {
    float value;
    int64_t index;
  };
  int64_t n_;
  std::vector<Item> items_;
};

struct Row {
  int64_t K, V, L, prompt_len, step, eos_id;
  bool forbid_eos, last;
  float lp;
};

// Scores of the K x V continuations of one sample into `top`; official divides by the length penalty.
void select(const float* logp, const float* running, const Row& r, bool official, TopN& top) {
  for (int64_t k = 0; k < r.K; ++k) {
    const float* row = logp + k * r.V;
    const float run = running[k];
    for (int64_t v = 0; v < r.V; ++v) {
      float x = (r.forbid_eos && v == r.eos_id) ? kNegEos : row[v];
      float total = x + run;
      top.push(official ? total / r.lp : total, k * r.V + v);
    }
  }
}

// Merges candidates (scores, seqs [C, L], lengths) into a sample's kept best K, sorted descending (stable).
void merge(float* fin_scores, int64_t* fin_seqs, int64_t* fin_lengths, const std::vector<float>& scores,
           const std::vector<const int64_t*>& seqs, int64_t length, int64_t K, int64_t L) {
  const int64_t C = static_cast<int64_t>(scores.size());
  std::vector<float> all(fin_scores, fin_scores + K);
  all.insert(all.end(), scores.begin(), scores.end());
  std::vector<int64_t> order(K + C);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return all[a] > all[b]; });
  std::vector<int64_t> new_seqs(K * L), new_lengths(K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t o = order[k];
    const int64_t* src = o < K ? fin_seqs + o * L : seqs[o - K];
    std::memcpy(new_seqs.data() + k * L, src, L * sizeof(int64_t));
    new_lengths[k] = o < K ? fin_lengths[o] : length;
  }
  for (int64_t k = 0; k < K; ++k) fin_scores[k] = all[order[k]];
  std::memcpy(fin_seqs, new_seqs.data(), K * L * sizeof(int64_t));
  std::memcpy(fin_lengths, new_lengths.data(), K * sizeof(int64_t));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> beam_step_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, at::Tensor& running, at::Tensor& seq,
    at::Tensor& closed, const at::Tensor& open_ids, at::Tensor& fin_scores, at::Tensor& fin_seqs,
    at::Tensor& fin_lengths, at::Tensor& steps, int64_t step, int64_t prompt_len, int64_t max_length,
    int64_t min_length, int64_t eos_id, double alpha, bool official, bool exact) {
  check_beam_step(logits, bias, running, seq, closed, open_ids, fin_scores, fin_seqs, fin_lengths, steps, step,
                  prompt_len, max_length, official);
  const int64_t Bo = running.size(0), K = running.size(1), V = logits.size(1), L = seq.size(2);
  const int64_t S = fin_scores.size(1);
  at::Tensor logp = at::log_softmax(bias.has_value() ? at::add(logits, *bias) : logits, -1).contiguous();
  at::Tensor beam = at::empty({Bo, K}, running.options().dtype(at::kLong));
  at::Tensor token = at::empty({Bo, K}, running.options().dtype(at::kLong));
  const Row r{K,
              V,
              L,
              prompt_len,
              step,
              eos_id,
              step < min_length && eos_id >= 0,
              step + 1 == max_length,
              gnmt_length_penalty(step, alpha)};
  const float bound_lp = exact ? gnmt_length_penalty(max_length - 1, alpha) : r.lp;
  const float* logp_p = logp.const_data_ptr<float>();
  float* run_p = running.data_ptr<float>();
  int64_t* seq_p = seq.data_ptr<int64_t>();
  bool* closed_p = closed.data_ptr<bool>();
  const int64_t* open_p = open_ids.const_data_ptr<int64_t>();
  float* fs_p = fin_scores.data_ptr<float>();
  int64_t* fq_p = fin_seqs.data_ptr<int64_t>();
  int64_t* fl_p = fin_lengths.data_ptr<int64_t>();
  int64_t* steps_p = steps.data_ptr<int64_t>();
  int64_t* beam_p = beam.data_ptr<int64_t>();
  int64_t* token_p = token.data_ptr<int64_t>();

  at::parallel_for(0, Bo, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t* beam_b = beam_p + b * K;
      int64_t* token_b = token_p + b * K;
      if (closed_p[b]) {  // frozen until the caller drops it
        for (int64_t k = 0; k < K; ++k) beam_b[k] = k, token_b[k] = 0;
        continue;
      }
      const int64_t s = open_p[b];
      float* run_b = run_p + b * K;
      int64_t* seq_b = seq_p + b * K * L;
      const int64_t n = official ? K : 2 * K;
      TopN top(n);
      select(logp_p + b * K * V, run_b, r, official, top);
      // Candidate c continues beam top.index(c) / V with token top.index(c) % V.
      std::vector<int64_t> cand_seqs(n * L);
      for (int64_t c = 0; c < n; ++c) {
        std::memcpy(cand_seqs.data() + c * L, seq_b + (top.index(c) / V) * L, L * sizeof(int64_t));
        cand_seqs[c * L + prompt_len + step] = top.index(c) % V;
      }
      const int64_t length = prompt_len + step + 1;
      steps_p[s] = step + 1;
      if (official) {
        const bool closing = r.last || (eos_id >= 0 && top.index(0) % V == eos_id);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t tok = top.index(k) % V;
          const bool record = closing || (eos_id >= 0 && tok == eos_id);
          const int64_t slot = s * S + step * K + k;
          fs_p[slot] = record ? top.value(k) : -kInf;
          std::memcpy(fq_p + slot * L, cand_seqs.data() + k * L, L * sizeof(int64_t));
          fl_p[slot] = length;
          run_b[k] = top.value(k) * r.lp;
          beam_b[k] = top.index(k) / V;
          token_b[k] = tok;
        }
        std::memcpy(seq_b, cand_seqs.data(), K * L * sizeof(int64_t));
        closed_p[b] = closing;
        continue;
      }
      // Standard: finished candidates (a [SEP] ranked below K is dropped) join the kept best K ...
      std::vector<float> fin(n);
      std::vector<const int64_t*> fin_src(n);
      std::vector<int64_t> keep, eos;
      for (int64_t c = 0; c < n; ++c) {
        const bool is_eos = eos_id >= 0 && top.index(c) % V == eos_id;
        const bool finished = is_eos && c < K && top.value(c) > kNegEos / 2;
        fin[c] = finished ? top.value(c) / r.lp : -kInf;
        fin_src[c] = cand_seqs.data() + c * L;
        (is_eos ? eos : keep).push_back(c);
      }
      merge(fs_p + s * S, fq_p + s * S * L, fl_p + s * S, fin, fin_src, length, K, L);
      // ... and the K best non-[SEP] candidates continue.
      keep.insert(keep.end(), eos.begin(), eos.end());
      std::vector<float> last_scores(K);
      std::vector<const int64_t*> last_src(K);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = keep[k];
        run_b[k] = top.value(c);
        std::memcpy(seq_b + k * L, cand_seqs.data() + c * L, L * sizeof(int64_t));
        beam_b[k] = top.index(c) / V;
        token_b[k] = top.index(c) % V;
        last_scores[k] = run_b[k] / r.lp;
        last_src[k] = seq_b + k * L;
      }
      if (r.last) {  // beams still running hit max_length
        merge(fs_p + s * S, fq_p + s * S * L, fl_p + s * S, last_scores, last_src, length, K, L);
        closed_p[b] = true;
      } else {
        const float worst = fs_p[s * S + K - 1];
        closed_p[b] = worst > -kInf && run_b[0] / bound_lp <= worst;
      }
    }
  });
  return {beam, token};
}

}  // namespace mplug_fast
