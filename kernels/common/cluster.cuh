// cluster.cuh — reductions and gathers across the thread blocks of a cluster, through
// distributed shared memory (DSMEM, sm_90+).
//
// A cluster of C blocks (1 <= C <= 8, the portable limit) runs on one GPC, and every block can
// read the shared memory of the others. Two primitives build on that, both deterministic:
//
//   ClusterReduce<T, Op>: out[i] = ((in@0[i] op in@1[i]) op in@2[i]) ... op in@C-1[i]
//       `in` is the same shared-memory array in every block (in@r: block r's copy), folded in
//       rank order 0, 1, ..., C-1 whichever block computes it, so every block that reduces index
//       i gets bit-identical results. A block reduces the index range it asks for: all of
//       [0, n) (an all-reduce) or its own slice split_range(n, C, rank) (a reduce-scatter).
//   ClusterGather<T>:     out[i] = in@owner(i)[i], owner(i) = the rank r with i in split_range(n, C, r)
//       Each block contributes its slice of an array; afterwards each block holds the whole.
//
// Work split: the threads of the calling block stride over the indices; each index costs C
// loads from distributed shared memory.
//
// `in` must start at the same shared-memory offset in every block: in@r is this block's address
// of `in` mapped into block r (map_shared_rank), so a layout that depends on the rank breaks it.
//
// Synchronisation is the caller's, so it can overlap independent work with a barrier
// (cluster_arrive() ... work ... cluster_wait()). The protocol, for every block of the cluster:
//   1. write this block's `in`;
//   2. cluster_sync() (or cluster_arrive() ... cluster_wait()): the writes are visible cluster-wide;
//   3. call the primitive (it reads the other blocks' `in`, writes this block's `out`);
//   4. cluster_sync() (or arrive ... wait) before any block writes `in` again or exits, since
//      another block may still be reading it: a block's shared memory ends with the block.
// `out` is this block's own memory: __syncthreads() before other threads of the block read it.
#pragma once

#include <cooperative_groups.h>

namespace neoxfuse {

constexpr int kMaxClusterSize = 8;  // the portable limit; larger clusters need an opt-in attribute

// The `part`-th of `parts` contiguous, balanced slices of [0, n): the first n % parts slices get
// one element more. Slices may be empty when n < parts.
struct IndexRange {
  int begin, end;
  __host__ __device__ int size() const { return end - begin; }
  __host__ __device__ bool contains(int i) const { return begin <= i && i < end; }
};

__host__ __device__ inline IndexRange split_range(int n, int parts, int part) {
  const int base = n / parts, extra = n % parts;
  const int begin = part * base + (part < extra ? part : extra);
  return {begin, begin + base + (part < extra ? 1 : 0)};
}

__device__ __forceinline__ int cluster_rank() { return static_cast<int>(cooperative_groups::this_cluster().block_rank()); }
__device__ __forceinline__ int cluster_size() { return static_cast<int>(cooperative_groups::this_cluster().num_blocks()); }

// barrier.cluster.arrive (release) / barrier.cluster.wait (acquire). Every thread of every block
// of the cluster arrives once per phase and waits before arriving again; shared-memory writes
// made before arriving are visible to every thread of the cluster after its wait.
__device__ __forceinline__ void cluster_arrive() { cooperative_groups::this_cluster().barrier_arrive(); }
__device__ __forceinline__ void cluster_wait() { cooperative_groups::this_cluster().barrier_wait(); }
__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }

// `p` (this block's shared memory) as seen in the shared memory of block `rank` of the cluster.
template <typename T>
__device__ __forceinline__ const T* cluster_peer(const T* p, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(const_cast<T*>(p), rank);
}

template <typename T, typename Op>
struct ClusterReduce {
  Op op;

  // out[i] for i in [begin, end), folded in rank order (see the header). in, out: shared memory.
  __device__ void operator()(const T* in, T* out, int begin, int end) const {
    const int ranks = cluster_size();
    for (int i = begin + static_cast<int>(threadIdx.x); i < end; i += blockDim.x) {
      T acc = cluster_peer(in, 0)[i];
      for (int r = 1; r < ranks; ++r) acc = op(acc, cluster_peer(in, r)[i]);
      out[i] = acc;
    }
  }
};

template <typename T>
struct ClusterGather {
  // out[0, n) = the owners' slices of `in` (see the header). in, out: shared memory, distinct.
  __device__ void operator()(const T* in, T* out, int n) const {
    const int ranks = cluster_size();
    for (int r = 0; r < ranks; ++r) {
      const IndexRange slice = split_range(n, ranks, r);
      const T* owner = cluster_peer(in, r);
      for (int i = slice.begin + static_cast<int>(threadIdx.x); i < slice.end; i += blockDim.x) out[i] = owner[i];
    }
  }
};

struct ClusterSum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

struct ClusterMax {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

}  // namespace neoxfuse
