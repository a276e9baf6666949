// selftest.cu — kernels with the mistakes the emulator must catch, for tests/test_emulator.py.
// Built into the emulated library only (tests/emulator/BUILD.bazel), never into libneoxfuse.so.
//
//   int neoxemu_selftest(int which, float* out /* [64] */):
//     0 ordered:   out[t] = the value thread t+1 wrote to shared memory, after a barrier
//     1 unordered: the same without the barrier (a race: the result depends on thread order)
//     2 divergent: half of a warp waits in __syncthreads, the other half in a shuffle (deadlock)
//     3 bad PTX:   an instruction the emulator does not know
//     4 past end:  thread t writes out[t + 16], past the end of out
//     5 PDL early: a programmatic dependent launch reads out (ld.global.cg) before griddepcontrol.wait
//     6 PDL:       the same after griddepcontrol.wait: out[t] += 1
//     7 misaligned: thread 0 loads a float4 from out + 1 (4 bytes past a 16-byte boundary)
//     8 unwritten: out[t] = a static __shared__ float no thread has written
//     9 overwrite: every thread reads a shared value; after a shuffle, the last thread overwrites it
//                  with no barrier in between (a race: the first warp may not have read it yet)
#include "kernels/common/status.cuh"

namespace {

constexpr int kThreads = 64;

__global__ void neighbour_kernel(float* out, bool barrier) {
  __shared__ float values[kThreads];
  values[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (barrier) __syncthreads();
  out[threadIdx.x] = values[(threadIdx.x + 1) % kThreads];
}

__global__ void divergent_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void bad_ptx_kernel(float* out) {
  asm volatile("membar.gl;" ::: "memory");
  out[threadIdx.x] = 0.0f;
}

__global__ void past_end_kernel(float* out) { out[threadIdx.x + 16] = 0.0f; }

__global__ void pdl_kernel(float* out, bool wait_first) {
  if (wait_first) asm volatile("griddepcontrol.wait;" ::: "memory");
  const float previous = __ldcg(out + threadIdx.x);
  asm volatile("griddepcontrol.wait;" ::: "memory");
  out[threadIdx.x] = previous + 1.0f;
}

__global__ void unwritten_kernel(float* out) {
  __shared__ float values[kThreads];
  out[threadIdx.x] = values[threadIdx.x];
}

__global__ void overwrite_kernel(float* out) {
  __shared__ float value;
  if (threadIdx.x == kThreads - 1) value = 1.0f;
  __syncthreads();
  const float seen = value;
  __shfl_xor_sync(0xffffffffu, 0.0f, 1);
  if (threadIdx.x == kThreads - 1) value = 2.0f;
  out[threadIdx.x] = seen;
}

__global__ void misaligned_kernel(float* out) {
  if (threadIdx.x == 0) out[0] = reinterpret_cast<const float4*>(out + 1)->x;
}

int launch_pdl(float* out, bool wait_first) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(1);
  config.blockDim = dim3(kThreads);
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, pdl_kernel, out, wait_first);
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int neoxemu_selftest(int which, float* out) {
  switch (which) {
    case 0:
    case 1:
      neighbour_kernel<<<1, kThreads>>>(out, which == 0);
      break;
    case 2:
      divergent_kernel<<<1, kThreads>>>(out);
      break;
    case 3:
      bad_ptx_kernel<<<1, kThreads>>>(out);
      break;
    case 4:
      past_end_kernel<<<1, kThreads>>>(out);
      break;
    case 5:
    case 6:
      launch_pdl(out, which == 6);
      break;
    case 7:
      misaligned_kernel<<<1, kThreads>>>(out);
      break;
    case 8:
      unwritten_kernel<<<1, kThreads>>>(out);
      break;
    case 9:
      overwrite_kernel<<<1, kThreads>>>(out);
      break;
    default:
      return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  return NEOXFUSE_CHECK_LAUNCH();
}
