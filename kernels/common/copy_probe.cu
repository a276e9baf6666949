// copy_probe.cu — dst = src, bytes at the speed of device memory (the bandwidth probe).
//
// Work split: a grid of kBlocksPerSM blocks per SM, 256 threads each, strides over the
// buffer in 16-byte vectors. Each thread issues kUnroll vector loads before its kUnroll
// stores, so every SM keeps 256 * kBlocksPerSM * kUnroll * 16 B = 64 KiB of reads in flight:
// enough to cover HBM latency on H100/H200 and RTX 5090. Loads and stores are streaming
// (touched once). The last bytes % 16 are copied one byte per thread by block 0.
#include "kernels/common/copy_probe.h"
#include "kernels/common/status.cuh"
#include "kernels/common/vec.cuh"

namespace neoxfuse {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kBlocksPerSM = 4;

__global__ void __launch_bounds__(kThreads)
    copy_kernel(uint4* __restrict__ dst, const uint4* __restrict__ src, size_t n_vec,
                unsigned char* __restrict__ dst_tail, const unsigned char* __restrict__ src_tail,
                int n_tail) {
  const size_t stride = static_cast<size_t>(gridDim.x) * kThreads;
  size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n_vec; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = load_vec_streaming(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store_vec_streaming(dst + i + u * stride, v[u]);
  }
  for (; i < n_vec; i += stride) store_vec_streaming(dst + i, load_vec_streaming(src + i));
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < n_tail) dst_tail[threadIdx.x] = src_tail[threadIdx.x];
}

}  // namespace
}  // namespace neoxfuse

NEOXFUSE_API int neoxfuse_device_copy(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  using namespace neoxfuse;
  if (dst == nullptr || src == nullptr) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  if (!is_vec_aligned(dst) || !is_vec_aligned(src)) return NEOXFUSE_ERR_MISALIGNED;
  if (bytes == 0) return NEOXFUSE_OK;

  int device = 0, sms = 0;
  if (int status = check_cuda(cudaGetDevice(&device))) return status;
  if (int status = check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device))) return status;

  const size_t n_vec = bytes / kVecBytes;
  const int n_tail = static_cast<int>(bytes % kVecBytes);
  const size_t blocks_needed = (n_vec + kThreads * kUnroll - 1) / (kThreads * kUnroll);
  const unsigned blocks = static_cast<unsigned>(
      blocks_needed < 1 ? 1 : (blocks_needed < static_cast<size_t>(sms) * kBlocksPerSM ? blocks_needed : sms * kBlocksPerSM));

  copy_kernel<<<blocks, kThreads, 0, stream>>>(
      static_cast<uint4*>(dst), static_cast<const uint4*>(src), n_vec,
      static_cast<unsigned char*>(dst) + n_vec * kVecBytes,
      static_cast<const unsigned char*>(src) + n_vec * kVecBytes, n_tail);
  return NEOXFUSE_CHECK_LAUNCH();
}
