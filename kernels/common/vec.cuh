// vec.cuh — 16-byte vector memory access, the unit every bandwidth-bound kernel here moves.
//
// A uint4 carries 16 bytes: 8 fp16/bf16 or 4 fp32 values. The streaming variants
// (ld.global.cs / st.global.cs) mark data touched once, so it does not push reused data
// (weights of the next layer, the KV cache) out of L2.
#pragma once

#include <cstddef>
#include <cstdint>

namespace neoxfuse {

constexpr int kVecBytes = 16;

__host__ __device__ inline bool is_vec_aligned(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % kVecBytes == 0;
}

__device__ __forceinline__ uint4 load_vec_streaming(const uint4* p) { return __ldcs(p); }

__device__ __forceinline__ void store_vec_streaming(uint4* p, uint4 v) { __stcs(p, v); }

}  // namespace neoxfuse
