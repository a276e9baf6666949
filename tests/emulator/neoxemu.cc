// neoxemu.cc — the CUDA runtime C functions the launchers call, for the emulated device of
// neoxemu.h (declarations: the real cuda_runtime_api.h).
#include "tests/emulator/neoxemu.h"

using neoxemu::set_error;

cudaError_t cudaGetLastError() {
  const cudaError_t error = neoxemu::last_error;
  neoxemu::last_error = cudaSuccess;
  return error;
}

const char* cudaGetErrorName(cudaError_t error) { return error == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated"; }

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : neoxemu::failure_message.c_str();
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return set_error(cudaErrorInvalidDevice, "the emulator has device 0 only");
  switch (attribute) {
    case cudaDevAttrComputeCapabilityMajor:
      *value = neoxemu::device.major;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = neoxemu::device.minor;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = neoxemu::device.sms;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = neoxemu::device.shared_optin;
      return cudaSuccess;
    default:
      return set_error(cudaErrorInvalidValue, "a device attribute the emulator does not model");
  }
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return set_error(cudaErrorInvalidDevice, "the emulator has device 0 only");
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "neoxfuse CPU emulator");
  prop->major = neoxemu::device.major;
  prop->minor = neoxemu::device.minor;
  prop->multiProcessorCount = neoxemu::device.sms;
  prop->sharedMemPerBlockOptin = static_cast<size_t>(neoxemu::device.shared_optin);
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* kernel) {
  std::memset(attributes, 0, sizeof(*attributes));
  attributes->maxThreadsPerBlock = 1024;
  attributes->maxDynamicSharedSizeBytes = neoxemu::dynamic_shared_limit(kernel);
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    return set_error(cudaErrorInvalidValue, "a function attribute the emulator does not model");
  }
  if (value < 0 || value > neoxemu::device.shared_optin) {
    return set_error(cudaErrorInvalidValue, "dynamic shared memory over the device's opt-in limit");
  }
  std::lock_guard<std::mutex> lock(neoxemu::attributes_mutex);
  neoxemu::max_dynamic_shared[kernel] = value;
  return cudaSuccess;
}

// One block per SM (the kernels' shared memory allows no more), and a cluster within one GPC:
// SMs / cluster size clusters, or the sum of that over the GPCs where the device has them.
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, const void* kernel, const cudaLaunchConfig_t* config) {
  const int size = neoxemu::cluster_size_of(*config);
  if (size < 1 || size > neoxemu::kMaxClusterSize) return set_error(cudaErrorInvalidClusterSize, "cluster size 1..8");
  const bool fits = config->dynamicSmemBytes <= static_cast<size_t>(neoxemu::dynamic_shared_limit(kernel));
  const neoxemu::Device& device = neoxemu::device;
  int count = device.gpcs == 0 ? device.sms / size : 0;
  for (int g = 0; g < device.gpcs; ++g) count += device.gpc_sms[g] / size;
  *clusters = fits ? count : 0;
  return cudaSuccess;
}

// UBSan's report hook: the library is built with -fsanitize=alignment (bazel/emulator.bzl), whose
// runtime prints each report and then calls this, on the thread that made the access. UBSan
// reports a source location once per process; the sticky failure makes that enough.
extern "C" void __ubsan_get_current_report_data(const char** kind, const char** message, const char** file,
                                                unsigned* line, unsigned* column, char** address);
extern "C" __attribute__((visibility("default"))) void __ubsan_on_report() {
  const char *kind = nullptr, *message = nullptr, *file = nullptr;
  unsigned line = 0, column = 0;
  char* address = nullptr;
  __ubsan_get_current_report_data(&kind, &message, &file, &line, &column, &address);
  neoxemu::misaligned_access(std::string(message) + " at " + file + ":" + std::to_string(line));
}

// For tests: the fiber order of every block from now on (0 forward, 1 reverse; see neoxemu.h).
extern "C" __attribute__((visibility("default"))) void neoxemu_set_schedule(int order) { neoxemu::schedule = order; }

// For tests: the bytes streaming loads (__ldcs) read since the last call.
extern "C" __attribute__((visibility("default"))) uint64_t neoxemu_take_streamed_bytes() {
  return neoxemu::streamed_bytes.exchange(0);
}

// For tests: count the bytes that cache-operator loads read inside [begin, begin + bytes) from
// now on; returns the count of the previous watch.
extern "C" __attribute__((visibility("default"))) uint64_t neoxemu_watch(uintptr_t begin, uint64_t bytes) {
  neoxemu::watch_begin = begin;
  neoxemu::watch_end = begin + bytes;
  return neoxemu::watched_bytes.exchange(0);
}

// For tests: the device the emulator reports from now on (see neoxemu::Device); gpc_sms: [gpcs]
// SMs per GPC (gpcs 0: none). Returns 0, or -1 for more GPCs than modelled or sizes not summing to sms.
extern "C" __attribute__((visibility("default"))) int neoxemu_set_device(int major, int minor, int sms, int shared_optin,
                                                                        const int* gpc_sms, int gpcs) {
  if (gpcs < 0 || gpcs > neoxemu::Device::kMaxGpcs) return -1;
  neoxemu::Device device{major, minor, sms, shared_optin, gpcs, {}};
  int total = 0;
  for (int g = 0; g < gpcs; ++g) total += device.gpc_sms[g] = gpc_sms[g];
  if (gpcs > 0 && total != sms) return -1;
  neoxemu::device = device;
  return 0;
}
