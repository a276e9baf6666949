// attention.cuh — decode attention of one head's query over a range of cached positions, as a
// softmax partial that merges with the partials of other ranges (flash-decoding split).
//
// For positions t in [begin, end), scores s_t = scale * q . K[t], the partial of each output dim d is
//
//   m = max_t s_t,   l = sum_t e^(s_t - m),   o_d = sum_t e^(s_t - m) V[t, d]
//
// and two partials merge as m = max(m1, m2), l = l1 e^(m1-m) + l2 e^(m2-m), o = o1 e^(m1-m) + o2 e^(m2-m);
// the attention output is o / l once every range is merged. An empty range is (-inf, 0, 0).
//
// Work split inside a block: L lanes read one position's row, lane c taking dims 8c..8c+7 (L = 16
// for head_dim <= 128, so one warp instruction reads two whole rows, contiguous; L = 32, a whole
// warp, for head_dim 256), and the block's threads form kThreads / L position groups; group g
// takes positions begin + g, begin + g + groups, ... Each lane issues the key and value loads of
// kPositionsPerLane positions at once (one DRAM round trip per 128 positions for 256 threads and
// L = 16), scores them with an L-lane butterfly and keeps an online softmax of its group in registers. The groups' partials are merged in group order
// through shared memory at the end: no atomics, no barriers inside the loop.
#pragma once

#include <cstdint>

#include "kernels/common/dtype.cuh"
#include "kernels/fused_decoder/matvec.cuh"

namespace neoxfuse {

// One output dim's softmax partial (see the header).
struct SoftmaxPartial {
  float max;  // m
  float sum;  // l
  float out;  // o_d
};

struct SoftmaxMerge {
  __device__ __forceinline__ SoftmaxPartial operator()(SoftmaxPartial a, SoftmaxPartial b) const {
    const float m = fmaxf(a.max, b.max);
    if (m == -INFINITY) return a;  // both empty
    const float wa = expf(a.max - m), wb = expf(b.max - m);
    return {m, a.sum * wa + b.sum * wb, a.out * wa + b.out * wb};
  }
};

template <int kHeadDim, int kThreads, typename T>
struct DecodeAttention {
  static constexpr int kRowChunks = kHeadDim / kChunkElems;  // 16-byte vectors per key or value row
  static constexpr int kLanesPerPosition = kRowChunks <= 16 ? 16 : kWarpSize;
  static constexpr int kGroups = kThreads / kLanesPerPosition;
  static constexpr int kPositionsPerLane = 8;
  static constexpr int kGroupStride = kHeadDim + 2;            // scratch row: m, l, o[head_dim]
  static constexpr int kScratchFloats = kGroups * kGroupStride;
  static_assert(kHeadDim % kChunkElems == 0 && kRowChunks <= kLanesPerPosition, "a row must fit one warp");
  static_assert(kThreads % kWarpSize == 0, "whole warps");

  // Writes out[d] = the partial of positions [begin, end) for every d < kHeadDim (threads d, d +
  // blockDim.x, ... write them; no barrier after). q: shared [head_dim] fp32, already rotated.
  // keys, values: this head's cache [max_seq, head_dim] of T. scratch: shared [kScratchFloats].
  // Every thread of the block calls it.
  __device__ static void partial(const float* q, const T* keys, const T* values, int begin, int end,
                                 float scale, SoftmaxPartial* out, float* scratch) {
    const int chunk = static_cast<int>(threadIdx.x) % kLanesPerPosition;
    const int group = static_cast<int>(threadIdx.x) / kLanesPerPosition;
    const bool reads = chunk < kRowChunks;  // lanes past the row (head_dim 80: 10 of 16) only shuffle
    const uint4* key_rows = reinterpret_cast<const uint4*>(keys);    // [max_seq, kRowChunks]
    const uint4* value_rows = reinterpret_cast<const uint4*>(values);

    float4 q_lo = make_float4(0.f, 0.f, 0.f, 0.f), q_hi = q_lo;  // q[8 chunk .. 8 chunk + 8)
    if (reads) {
      q_lo = reinterpret_cast<const float4*>(q)[2 * chunk];
      q_hi = reinterpret_cast<const float4*>(q)[2 * chunk + 1];
    }

    float m = -INFINITY, l = 0.0f, acc[kChunkElems] = {};  // this group's online softmax
    for (int tile = begin; tile < end; tile += kGroups * kPositionsPerLane) {
      uint4 k[kPositionsPerLane], v[kPositionsPerLane];
#pragma unroll
      for (int u = 0; u < kPositionsPerLane; ++u) {
        const int t = tile + group + u * kGroups;
        if (reads && t < end) {
          k[u] = __ldcg(key_rows + static_cast<size_t>(t) * kRowChunks + chunk);  // written by earlier kernels
          v[u] = __ldcg(value_rows + static_cast<size_t>(t) * kRowChunks + chunk);
        }
      }
      float s[kPositionsPerLane];
      float tile_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < kPositionsPerLane; ++u) {
        const int t = tile + group + u * kGroups;
        float d = reads && t < end ? dot_chunk<T>(k[u], q_lo, q_hi, 0.0f) : 0.0f;
#pragma unroll
        for (int mask = kLanesPerPosition / 2; mask > 0; mask /= 2) d += __shfl_xor_sync(0xffffffffu, d, mask);
        s[u] = t < end ? d * scale : -INFINITY;
        tile_max = fmaxf(tile_max, s[u]);
      }
      const float m_new = fmaxf(m, tile_max);
      const float rescale = m == -INFINITY ? 0.0f : expf(m - m_new);  // acc and l are 0 while m is -inf
      l *= rescale;
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) acc[e] *= rescale;
#pragma unroll
      for (int u = 0; u < kPositionsPerLane; ++u) {
        const int t = tile + group + u * kGroups;
        const float p = t < end ? expf(s[u] - m_new) : 0.0f;
        l += p;
        if (reads && t < end) {
          const Pair<T>* pairs = reinterpret_cast<const Pair<T>*>(&v[u]);
#pragma unroll
          for (int e = 0; e < kChunkElems / 2; ++e) {
            const float2 v2 = to_float2(pairs[e]);
            acc[2 * e] = fmaf(p, v2.x, acc[2 * e]);
            acc[2 * e + 1] = fmaf(p, v2.y, acc[2 * e + 1]);
          }
        }
      }
      m = m_new;
    }

    float* mine = scratch + group * kGroupStride;  // [m, l, o[head_dim]]
    if (chunk == 0) {
      mine[0] = m;
      mine[1] = l;
    }
    if (reads) {
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) mine[2 + chunk * kChunkElems + e] = acc[e];
    }
    __syncthreads();

    for (int d = threadIdx.x; d < kHeadDim; d += blockDim.x) {
      SoftmaxPartial merged = {-INFINITY, 0.0f, 0.0f};
      for (int g = 0; g < kGroups; ++g) {
        const float* theirs = scratch + g * kGroupStride;
        merged = SoftmaxMerge{}(merged, {theirs[0], theirs[1], theirs[2 + d]});
      }
      out[d] = merged;
    }
  }
};

}  // namespace neoxfuse
