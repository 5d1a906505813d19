// CUDA cache reorder (mplug_fast::reorder_caches): one launch for every cache tensor (multi-tensor: the
// pointers travel in the kernel arguments); block r copies row r's `length` valid positions, 16 bytes per
// thread and step when aligned.
#include "../ops.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace mplug_fast {
namespace {

constexpr int kMaxTensors = 8;
constexpr int kThreads = 128;

struct Pointers {
  const char* src[kMaxTensors];
  char* dst[kMaxTensors];
};

// Row r of tensor t = (t, p, n, x); it copies `bytes` from src row (p, index[n], x) to dst row (p, n, x).
__global__ void reorder_kernel(Pointers ptr, const int64_t* index, int64_t rows, int64_t N, int64_t Ns, int64_t X,
                               int64_t row_stride, int64_t bytes) {
  const int64_t r = blockIdx.x, t = r / rows, i = r % rows;
  const int64_t p = i / (N * X), n = (i / X) % N, x = i % X;
  const char* from = ptr.src[t] + ((p * Ns + index[n]) * X + x) * row_stride;
  char* to = ptr.dst[t] + ((p * N + n) * X + x) * row_stride;
  if (bytes % 16 == 0 && reinterpret_cast<uintptr_t>(from) % 16 == 0 && reinterpret_cast<uintptr_t>(to) % 16 == 0) {
    for (int64_t e = threadIdx.x; e < bytes / 16; e += blockDim.x) {
      reinterpret_cast<int4*>(to)[e] = reinterpret_cast<const int4*>(from)[e];
    }
  } else {
    for (int64_t e = threadIdx.x; e < bytes; e += blockDim.x) to[e] = from[e];
  }
}

}  // namespace

void reorder_caches_cuda(at::TensorList src, at::TensorList dst, const at::Tensor& index, int64_t length) {
  check_reorder_caches(src, dst, index, length);
  TORCH_CHECK(src.size() <= kMaxTensors, "reorder_caches (CUDA): at most ", kMaxTensors, " tensors per call");
  if (src.empty() || length == 0 || index.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(index.device());
  Pointers ptr{};
  for (size_t t = 0; t < src.size(); ++t) {
    ptr.src[t] = static_cast<const char*>(src[t].const_data_ptr());
    ptr.dst[t] = static_cast<char*>(dst[t].data_ptr());
  }
  const at::Tensor& d = dst[0];
  const int64_t P = d.size(0), N = d.size(1), X = d.size(2), Lmax = d.size(3), Dh = d.size(4);
  const int64_t rows = P * N * X, elem = d.element_size();
  reorder_kernel<<<static_cast<unsigned>(rows * src.size()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      ptr, index.const_data_ptr<int64_t>(), rows, N, src[0].size(1), X, Lmax * Dh * elem, length * Dh * elem);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mplug_fast
