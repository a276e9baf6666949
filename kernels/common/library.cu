// library.cu — the library's self-description (ABI version, build, devices) and its error record.
#include <cstdio>
#include <cstring>

#include "kernels/common/library.h"
#include "kernels/common/status.cuh"

#define NEOXFUSE_STR2(x) #x
#define NEOXFUSE_STR(x) NEOXFUSE_STR2(x)

namespace neoxfuse {

namespace {
thread_local char last_error[512] = "";
}

int record_cuda_error(cudaError_t err) {
  std::snprintf(last_error, sizeof(last_error), "%s: %s", cudaGetErrorName(err), cudaGetErrorString(err));
  return err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver ? NEOXFUSE_ERR_NO_DEVICE
                                                                        : NEOXFUSE_ERR_CUDA;
}

}  // namespace neoxfuse

NEOXFUSE_API int neoxfuse_abi_version(void) { return NEOXFUSE_ABI_VERSION; }

NEOXFUSE_API const char* neoxfuse_build_info(void) {
  return "abi=" NEOXFUSE_STR(NEOXFUSE_ABI_VERSION) " cuda=" NEOXFUSE_STR(__CUDACC_VER_MAJOR__) "." NEOXFUSE_STR(
      __CUDACC_VER_MINOR__) " archs=" NEOXFUSE_CUDA_ARCHS;
}

NEOXFUSE_API const char* neoxfuse_last_error(void) { return neoxfuse::last_error; }

NEOXFUSE_API int neoxfuse_device_count(int* count) {
  if (count == nullptr) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  *count = 0;
  cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    return neoxfuse::record_cuda_error(err);
  }
  return NEOXFUSE_OK;
}

NEOXFUSE_API int neoxfuse_get_device_info(int device, neoxfuse_device_info* info) {
  if (info == nullptr) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  std::memset(info, 0, sizeof(*info));
  cudaDeviceProp prop;
  if (int status = neoxfuse::check_cuda(cudaGetDeviceProperties(&prop, device))) return status;
  std::snprintf(info->name, sizeof(info->name), "%s", prop.name);
  info->sm_major = prop.major;
  info->sm_minor = prop.minor;
  info->multiprocessors = prop.multiProcessorCount;
  info->total_memory_bytes = prop.totalGlobalMem;
  info->l2_cache_bytes = static_cast<size_t>(prop.l2CacheSize);
  if (int status = neoxfuse::check_cuda(cudaDriverGetVersion(&info->driver_version))) return status;
  return neoxfuse::check_cuda(cudaRuntimeGetVersion(&info->runtime_version));
}
