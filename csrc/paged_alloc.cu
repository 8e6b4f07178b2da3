// Unified-memory allocator of qpeft.optim's paged states, and their prefetch.
// UNVERIFIED ON A GPU: compiled and linked for sm_90 on a machine without one.
//
// qpeft_managed_alloc / qpeft_managed_free are the two C functions torch.cuda.memory.CUDAPluggableAllocator loads
// from this library (signatures fixed by PyTorch: alloc(size, device, stream), free(ptr, size, device, stream));
// a torch.cuda.MemPool over that allocator owns the memory (python/qpeft/optim/paged.py), so paged states are real
// CUDA tensors, freed with their optimizer and counted in the caching allocator's statistics.
// cudaMallocManaged(cudaMemAttachGlobal): pages migrate on demand between host and device, so the driver can evict
// optimizer states when the GPU is oversubscribed; managed_prefetch moves them ahead of use on the current stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <sys/types.h>

#include "common.h"
#include "ops.h"

extern "C" {

void* qpeft_managed_alloc(ssize_t size, int device, cudaStream_t /*stream*/) {
  void* ptr = nullptr;
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) return nullptr;
  if (prev != device && cudaSetDevice(device) != cudaSuccess) return nullptr;
  // nullptr tells PyTorch the allocation failed (it then raises its out-of-memory error)
  if (cudaMallocManaged(&ptr, static_cast<size_t>(size), cudaMemAttachGlobal) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky error of the failed allocation
    ptr = nullptr;
  }
  if (prev != device) (void)cudaSetDevice(prev);
  return ptr;
}

void qpeft_managed_free(void* ptr, ssize_t /*size*/, int /*device*/, cudaStream_t /*stream*/) {
  // cudaFree synchronizes the device; the memory pool calls this only when it releases a segment (empty_cache or
  // the pool's destruction), never per tensor.
  (void)cudaFree(ptr);
}

}  // extern "C"

namespace qpeft {

void managed_prefetch(const at::Tensor& t, int64_t device) {
  TORCH_CHECK(t.is_cuda(), "managed_prefetch: t must be a CUDA tensor (in managed memory), got ", t.device());
  const c10::cuda::CUDAGuard guard(t.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (bytes == 0) return;
#if CUDART_VERSION >= 13000
  cudaMemLocation loc{};
  loc.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  loc.id = device < 0 ? 0 : static_cast<int>(device);
  C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), bytes, loc, 0, stream));
#else
  C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), bytes, device < 0 ? cudaCpuDeviceId : static_cast<int>(device),
                                      stream));
#endif
}

bool managed_concurrent_access(int64_t device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, static_cast<int>(device)));
  return value != 0;
}

}  // namespace qpeft
