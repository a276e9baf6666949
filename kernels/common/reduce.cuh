// reduce.cuh — reductions across a warp and across a thread block; every thread gets the result.
//
// warp_allreduce: a butterfly over the 32 lanes (__shfl_xor_sync). Every lane combines the same
// values in the same order, so all lanes end with bit-identical results.
// BlockAllReduce: warp_allreduce, one partial per warp through shared memory, then every warp
// reduces the partials the same way (again bit-identical across the block). One __syncthreads
// per call: consecutive calls alternate between two scratch rows, so a block may call it back to
// back (the two passes of LayerNorm statistics) without a second barrier — the barrier of call
// n+1 separates the reads of call n from the writes of call n+2 into the same row.
#pragma once

#include <cmath>  // INFINITY

namespace neoxfuse {

constexpr int kWarpSize = 32;
constexpr int kMaxWarpsPerBlock = 1024 / kWarpSize;

struct SumOp {
  static constexpr float kIdentity = 0.0f;
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

struct MaxOp {
  static constexpr float kIdentity = -INFINITY;
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename Op>
__device__ __forceinline__ float warp_allreduce(float value, Op op) {
#pragma unroll
  for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) {
    value = op(value, __shfl_xor_sync(0xffffffffu, value, lane_mask));
  }
  return value;
}

// Op over every thread of a 1-D block whose size is a multiple of 32 (at most 1024). Every thread
// of the block must make every call.
template <typename Op>
class BlockAllReduce {
 public:
  // scratch: __shared__ float[2][kMaxWarpsPerBlock], used by this reducer alone.
  __device__ explicit BlockAllReduce(float (*scratch)[kMaxWarpsPerBlock]) : scratch_(scratch) {}

  __device__ __forceinline__ float operator()(float value) {
    const Op op;
    value = warp_allreduce(value, op);
    const int warps = blockDim.x / kWarpSize;
    if (warps == 1) return value;
    float* partials = scratch_[parity_];  // [warps]
    parity_ ^= 1;
    const int lane = threadIdx.x % kWarpSize;
    if (lane == 0) partials[threadIdx.x / kWarpSize] = value;
    __syncthreads();
    return warp_allreduce(lane < warps ? partials[lane] : Op::kIdentity, op);
  }

 private:
  float (*scratch_)[kMaxWarpsPerBlock];
  int parity_ = 0;
};

}  // namespace neoxfuse
