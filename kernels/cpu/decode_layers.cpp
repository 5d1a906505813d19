// The decoder layers of one decoding step in one call (mplug_fast::decode_layers), CPU fp32.
//
// A cached decoding step runs every post-LN decoder layer on one new token per row: a few hundred small
// ops per step, each a Python call through nn.Module, the attention and fused-backend dispatch and the
// cache bookkeeping; on two cores that Python work took as long as a third of the weight reading. This op
// runs the same computation as a loop in C++: the same kernels (small_linear, or packed_linear for a weight
// stored as panels, short_query_attention, at::layer_norm, at::gelu, at::add) in the same order on the same
// values, so its result equals the Python layers' bit for bit when those run these kernels
// (mplug_fast/modeling/native_decode.py decides when they would).
//
// Per layer (params: 18 tensors per layer, the order of kParams), with h [N, D] the new token's state:
//   qkv = h Wqkv^T + b          the new k, v written into the cache at position `length`
//   h = LN(h + out(attn(q, cache[: length + 1], self_mask)))
//   h = LN(h + out(attn(q(h) folded to [Bm, H, G, Dh], memory k/v, memory_mask)))   G = N / Bm rows per memory row
//   h = LN(h + fc2(gelu(fc1(h))))
#include "../ops.h"

#include <ATen/ops/add.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>

#include <cmath>

namespace mplug_fast {
namespace {

// The parameters of one layer, in the order the op receives them.
enum Param : int64_t {
  kQkvW, kQkvB, kAttnOutW, kAttnOutB, kNormAttnW, kNormAttnB,
  kCrossQW, kCrossQB, kCrossOutW, kCrossOutB, kNormCrossW, kNormCrossB,
  kFc1W, kFc1B, kFc2W, kFc2B, kNormMlpW, kNormMlpB, kParams
};

// A linear layer of the op: the weight in nn.Linear's layout [N, K], or packed panels [N/16, K, 16].
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  return weight.dim() == 3 ? packed_linear_cpu(x, weight, bias) : small_linear_cpu(x, weight, bias);
}

}  // namespace

at::Tensor decode_layers_cpu(const at::Tensor& x, at::TensorList params, at::Tensor& cache_k, at::Tensor& cache_v,
                             int64_t length, const std::optional<at::Tensor>& self_mask, at::TensorList memory_k,
                             at::TensorList memory_v, const std::optional<at::Tensor>& memory_mask, double eps) {
  check_decode_layers(x, params, cache_k, cache_v, length, self_mask, memory_k, memory_v, memory_mask);
  // The kernels below read raw CPU pointers: every tensor must be a CPU tensor (x is, by the dispatch).
  for (const at::Tensor& p : params) {
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat,
                "decode_layers: every parameter must be a float32 CPU tensor, got ", p.scalar_type(), " on ",
                p.device());
  }
  bool on_cpu = cache_k.device().is_cpu() && cache_v.device().is_cpu();
  for (size_t i = 0; i < memory_k.size(); ++i) {
    on_cpu = on_cpu && memory_k[i].device().is_cpu() && memory_v[i].device().is_cpu();
  }
  if (self_mask.has_value()) on_cpu = on_cpu && self_mask->device().is_cpu();
  if (memory_mask.has_value()) on_cpu = on_cpu && memory_mask->device().is_cpu();
  TORCH_CHECK(on_cpu, "decode_layers: the caches, the memory k/v and the masks must be CPU tensors");
  const int64_t N = x.size(0), D = x.size(1), layers = cache_k.size(0), H = cache_k.size(2), Dh = cache_k.size(4);
  const int64_t Bm = memory_k[0].size(0), G = N / Bm;
  const double scale = std::pow(static_cast<double>(Dh), -0.5);  // Python's Dh ** -0.5
  const std::vector<int64_t> shape{D};
  at::Tensor h = x;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* p = params.data() + i * kParams;
    // Causal self-attention over the cache (the new token sees every cached position).
    const at::Tensor qkv = linear(h, p[kQkvW], p[kQkvB]).view({N, 3, H, Dh});
    at::Tensor k_layer = cache_k.select(0, i), v_layer = cache_v.select(0, i);  // [N, H, Lmax, Dh]
    k_layer.select(2, length).copy_(qkv.select(1, 1));
    v_layer.select(2, length).copy_(qkv.select(1, 2));
    const at::Tensor a = short_query_attention_cpu(qkv.select(1, 0).unsqueeze(2), k_layer.narrow(2, 0, length + 1),
                                                   v_layer.narrow(2, 0, length + 1), self_mask, scale);
    const at::Tensor ao = linear(a.view({N, D}), p[kAttnOutW], p[kAttnOutB]);
    h = at::layer_norm(at::add(h, ao), shape, p[kNormAttnW], p[kNormAttnB], eps);
    // Cross-attention: the G rows of each memory row are one query axis of G rows per head.
    const at::Tensor q = linear(h, p[kCrossQW], p[kCrossQB]).view({Bm, G, H, Dh}).permute({0, 2, 1, 3});
    const at::Tensor c = short_query_attention_cpu(q, memory_k[i], memory_v[i], memory_mask, scale);  // [Bm, H, G, Dh]
    const at::Tensor co = linear(c.permute({0, 2, 1, 3}).reshape({N, D}), p[kCrossOutW], p[kCrossOutB]);
    h = at::layer_norm(at::add(h, co), shape, p[kNormCrossW], p[kNormCrossB], eps);
    // MLP (erf GELU).
    const at::Tensor f = at::gelu(linear(h, p[kFc1W], p[kFc1B]));
    h = at::layer_norm(at::add(h, linear(f, p[kFc2W], p[kFc2B])), shape, p[kNormMlpW], p[kNormMlpB], eps);
  }
  return h;
}

void check_decode_layers(const at::Tensor& x, at::TensorList params, const at::Tensor& cache_k,
                         const at::Tensor& cache_v, int64_t length, const std::optional<at::Tensor>& self_mask,
                         at::TensorList memory_k, at::TensorList memory_v,
                         const std::optional<at::Tensor>& memory_mask) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "decode_layers: x must be float32 [N, D], got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(cache_k.dim() == 5 && cache_k.sizes() == cache_v.sizes() && cache_k.is_contiguous() &&
                  cache_v.is_contiguous() && cache_k.scalar_type() == at::kFloat &&
                  cache_v.scalar_type() == at::kFloat,
              "decode_layers: the caches must be contiguous float32 [layers, N, H, Lmax, Dh], got ", cache_k.sizes(),
              " and ", cache_v.sizes());
  const int64_t N = x.size(0), D = x.size(1), layers = cache_k.size(0);
  TORCH_CHECK(cache_k.size(1) == N && cache_k.size(2) * cache_k.size(4) == D, "decode_layers: caches ",
              cache_k.sizes(), " do not match x ", x.sizes());
  TORCH_CHECK(0 <= length && length < cache_k.size(3), "decode_layers: position ", length,
              " outside the cache's ", cache_k.size(3));
  TORCH_CHECK(static_cast<int64_t>(params.size()) == layers * kParams, "decode_layers: ", layers, " layers need ",
              layers * kParams, " parameters, got ", params.size());
  TORCH_CHECK(static_cast<int64_t>(memory_k.size()) == layers && static_cast<int64_t>(memory_v.size()) == layers,
              "decode_layers: one memory k and v per layer needed");
  const int64_t Bm = memory_k[0].size(0);
  TORCH_CHECK(Bm > 0 && N % Bm == 0, "decode_layers: ", N, " rows are not groups of the ", Bm, " memory rows");
  for (int64_t i = 0; i < layers; ++i) {
    TORCH_CHECK(memory_k[i].dim() == 4 && memory_k[i].size(0) == Bm && memory_k[i].size(1) == cache_k.size(2) &&
                    memory_k[i].size(3) == cache_k.size(4) && memory_k[i].sizes() == memory_v[i].sizes(),
                "decode_layers: memory k/v of layer ", i, " must be [", Bm, ", H, M, Dh], got ",
                memory_k[i].sizes(), " and ", memory_v[i].sizes());
  }
  if (self_mask.has_value()) {
    TORCH_CHECK(self_mask->dim() == 2 && self_mask->size(0) == N && self_mask->size(1) == length + 1,
                "decode_layers: self_mask must be [N, length + 1] = [", N, ", ", length + 1, "], got ",
                self_mask->sizes());
  }
  if (memory_mask.has_value()) {
    TORCH_CHECK(memory_mask->dim() == 2 && memory_mask->size(0) == Bm, "decode_layers: memory_mask must be [",
                Bm, ", M], got ", memory_mask->sizes());
  }
}

}  // namespace mplug_fast
