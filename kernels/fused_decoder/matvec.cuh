// matvec.cuh — one warp's dot product of a 16-bit (fp16 or bf16) weight row with an fp32 vector in
// shared memory: the inner loop of every projection of the fused decoder.
//
//   dot = sum_c sum_{e<8} w[c][e] * v[8c + e]     over the 8-element chunks c of up to two
//                                                  row segments (w: global T, v: shared fp32)
//
// Lane l takes chunks l, l + 32, l + 64, ... Each step, a lane issues kDotUnroll 16-byte loads
// (predicated past the end) before it multiplies any, so a warp keeps up to 8 KiB of the row in
// flight; the 8 warps of a block then cover DRAM latency with one row each. Weights are read
// once per token, so their loads are streaming (evict-first). The lane sums are combined by a
// butterfly, so the result has a fixed order of operations and every lane gets it.
#pragma once

#include <cstdint>

#include "kernels/common/dtype.cuh"
#include "kernels/common/reduce.cuh"
#include "kernels/common/vec.cuh"

namespace neoxfuse {

constexpr int kChunkElems = 8;   // 16-bit elements in one 16-byte vector
constexpr int kDotUnroll = 16;   // 16-byte loads a lane has in flight per step

// acc + sum_{e<8} w[e] * v[e]: w, 8 T (__half or __nv_bfloat16) in one vector; lo, hi: v[0..4), v[4..8).
template <typename T>
__device__ __forceinline__ float dot_chunk(uint4 w, float4 lo, float4 hi, float acc) {
  const Pair<T>* pairs = reinterpret_cast<const Pair<T>*>(&w);
  const float2 w01 = to_float2(pairs[0]), w23 = to_float2(pairs[1]);
  const float2 w45 = to_float2(pairs[2]), w67 = to_float2(pairs[3]);
  acc = fmaf(w01.x, lo.x, acc);
  acc = fmaf(w01.y, lo.y, acc);
  acc = fmaf(w23.x, lo.z, acc);
  acc = fmaf(w23.y, lo.w, acc);
  acc = fmaf(w45.x, hi.x, acc);
  acc = fmaf(w45.y, hi.y, acc);
  acc = fmaf(w67.x, hi.z, acc);
  return fmaf(w67.y, hi.w, acc);
}

// A contiguous piece of one weight row and the vector it multiplies.
struct RowSegment {
  const uint4* weights;  // [chunks] 8 x T, 16-byte aligned
  const float* vector;   // [chunks * 8] fp32, shared memory, 16-byte aligned
  int chunks;
};

// dot(a) + dot(b) for one warp (see the header), weights of type T; every lane returns the sum.
// The two segments share the load window, so a short segment does not cost a round trip of its own.
template <typename T>
__device__ __forceinline__ float warp_dot(RowSegment a, RowSegment b = {nullptr, nullptr, 0}) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int chunks = a.chunks + b.chunks;
  float acc = 0.0f;
  for (int base = lane; base < chunks; base += kWarpSize * kDotUnroll) {
    uint4 w[kDotUnroll];
#pragma unroll
    for (int u = 0; u < kDotUnroll; ++u) {
      const int c = base + u * kWarpSize;
      if (c < chunks) w[u] = load_vec_streaming(c < a.chunks ? a.weights + c : b.weights + (c - a.chunks));
    }
#pragma unroll
    for (int u = 0; u < kDotUnroll; ++u) {
      const int c = base + u * kWarpSize;
      if (c < chunks) {
        const float* v = c < a.chunks ? a.vector + c * kChunkElems : b.vector + (c - a.chunks) * kChunkElems;
        acc = dot_chunk<T>(w[u], reinterpret_cast<const float4*>(v)[0], reinterpret_cast<const float4*>(v)[1], acc);
      }
    }
  }
  return warp_allreduce(acc, SumOp{});
}

// Asks L2 to fetch `bytes` from `p` (one request per 128-byte line, spread over the warp's lanes),
// without waiting: used before a kernel may touch its inputs, to start streaming its first weights.
__device__ __forceinline__ void warp_prefetch_l2(const void* p, size_t bytes) {
  const char* bytes_p = static_cast<const char*>(p);
  for (size_t offset = static_cast<size_t>(threadIdx.x % kWarpSize) * 128; offset < bytes; offset += kWarpSize * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(bytes_p + offset));
  }
}

}  // namespace neoxfuse
