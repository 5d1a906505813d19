// CPU cache reorder (mplug_fast::reorder_caches): every cache tensor's rows gathered by `index`, only the
// `length` valid positions, one contiguous copy per (tensor, layer, row, head) (at::parallel_for).
#include "../ops.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace mplug_fast {

void reorder_caches_cpu(at::TensorList src, at::TensorList dst, const at::Tensor& index, int64_t length) {
  check_reorder_caches(src, dst, index, length);
  if (src.empty() || length == 0) return;
  const int64_t* index_p = index.const_data_ptr<int64_t>();
  const int64_t N = dst[0].size(1), P = dst[0].size(0), X = dst[0].size(2);
  const int64_t rows = P * N * X;  // per tensor (all tensors share the shape)
  at::parallel_for(0, rows * static_cast<int64_t>(src.size()), 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const at::Tensor& s = src[i / rows];
      const at::Tensor& d = dst[i / rows];
      const int64_t r = i % rows, p = r / (N * X), n = (r / X) % N, x = r % X;
      const int64_t Ns = s.size(1), Lmax = s.size(3), Dh = s.size(4), bytes = s.element_size();
      const char* from = static_cast<const char*>(s.const_data_ptr()) +
                         (((p * Ns + index_p[n]) * X + x) * Lmax) * Dh * bytes;
      char* to = static_cast<char*>(d.data_ptr()) + (((p * N + n) * X + x) * Lmax) * Dh * bytes;
      std::memcpy(to, from, length * Dh * bytes);
    }
  });
}

}  // namespace mplug_fast
