// fused_decoder.cuh — the GPT-NeoX decode kernels: a layer in two cluster launches, then the logits.
//
// A decode step is memory-bound: every weight byte is read once per token, so the design goal
// is that all SMs stream weights with 16-byte loads from start to end, and everything else
// (LayerNorm, rotary, attention, reductions) hides behind that stream or costs on-chip time only.
//
// Why two launches per layer: y needs a dot product over all of attn (every head) and all of
// GELU(fc_in) (every row), so there is one grid-wide dependency in a layer; a launch boundary is
// the cheapest deterministic grid barrier (no float atomics, no co-residency requirement), and
// programmatic dependent launch (PDL) lets each kernel start streaming while the previous drains.
//
// 1. attn_mlp_in_kernel — grid: the plan's clusters x C blocks, at least one cluster per head
//    (C: the plan's cluster size, e.g. 3 for 32 heads on a 132-SM H100 whose GPCs fit 42 clusters of 3).
//    Cluster h < heads owns head h; every block computes LN2(x), a head's blocks LN1(x) too, from
//    one set of statistics (x is 10 KiB).
//    - QKV: the 3 * head_dim rows of head h are split across the C blocks; each warp takes whole
//      rows (warp_dot). ClusterGather then gives every block the head's q, k, v.
//    - rotary on q, k; the block whose position range holds p writes k, v into the cache at p.
//    - attention over positions 0..p, split across the C blocks (flash-decoding); the softmax
//      partials merge over DSMEM with ClusterReduce<SoftmaxMerge>, block r finishing dims
//      split_range(head_dim, C, r) -> attn[h, :].
//    - MLP in: the QKV rows and the fc_in rows (GELU applied, -> mlp) are all `hidden` long, and
//      every block of the grid gets an even share of them (fc_in_rows): a head block's QKV rows
//      count towards its share, and the clusters past the heads (the plan adds them where the
//      GPU has SMs that head clusters cannot fill) compute fc_in rows only, with no cluster
//      barrier. A head block runs half of its fc_in rows between the QKV and the gather and half
//      after the merge, so the cluster barriers' waits overlap weight streaming; the first rows
//      of the second half are prefetched into L2 before the attention, so DRAM streams through it too.
// 2. out_proj_kernel — grid: the plan's clusters x C blocks (its own C and cluster count).
//    Cluster g owns rows split_range(hidden, clusters, g) of y; block r multiplies them by its
//    slice of attn (dense) and of mlp (fc_out), then the partial dot products are summed over the
//    cluster in rank order (ClusterReduce<Sum>) and y = x + b_dense + b_out + sum.
// 3. lm_head_kernel — plain blocks: LN_final(x) in every block, then the vocab rows of embed_out
//    split evenly over the blocks -> logits (fp32).
// 4. sample_token_kernel (sample.cuh) — one cluster turns the logits into a sampled token:
//    temperature, top-k and top-p by radix select on chip, then the exponential race.
//
// Activations written by an earlier kernel (x, attn, mlp, position, the KV cache) are read with
// coherent loads (ld.global.cg, which also keeps them out of L1), never ld.global.nc: with PDL a
// kernel is resident while its predecessor still writes them, and only reads after
// griddepcontrol.wait are ordered after those writes. (Cache operators are hints: they do not
// change the memory model, so the block that writes K, V at p and then reads them after a
// __syncthreads sees its own writes.) Every thread must reach every cluster barrier, so no
// thread leaves a kernel early except all blocks of a cluster together.
#pragma once

#include <cooperative_groups.h>

#include <cstdint>

#include "kernels/common/cluster.cuh"
#include "kernels/common/dtype.cuh"
#include "kernels/common/layernorm.cuh"
#include "kernels/common/reduce.cuh"
#include "kernels/fused_decoder/attention.cuh"
#include "kernels/fused_decoder/fused_decoder.h"
#include "kernels/fused_decoder/matvec.cuh"

namespace neoxfuse {
namespace fused_decoder {

constexpr int kThreads = NEOXFUSE_FUSED_DECODER_THREADS;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxHidden = NEOXFUSE_FUSED_DECODER_MAX_HIDDEN;
constexpr int kLayerNormChunks = kMaxHidden / (kChunkElems * kThreads);  // 8-element chunks per thread
// fc_in rows per warp asked into L2 before the attention, so DRAM keeps streaming while the
// block computes on chip (about 3 us of a block's bandwidth share at short contexts).
constexpr int kRowsPrefetchedOverAttention = 2;

// Everything a layer's two kernels read and write (device pointers; see fused_decoder.h). T: the
// weights' and the KV cache's type, __half or __nv_bfloat16.
template <typename T>
struct LayerParams {
  const float* x;          // [hidden]
  const T* ln1_weight;     // [hidden]
  const T* ln1_bias;
  const T* ln2_weight;
  const T* ln2_bias;
  const T* qkv_weight;     // [heads, 3, head_dim, hidden]
  const T* qkv_bias;       // [heads, 3, head_dim]
  const T* dense_weight;   // [hidden, hidden]
  const T* dense_bias;     // [hidden]
  const T* fc_in_weight;   // [ffn, hidden]
  const T* fc_in_bias;     // [ffn]
  const T* fc_out_weight;  // [hidden, ffn]
  const T* fc_out_bias;    // [hidden]
  T* k_cache;              // [heads, max_seq, head_dim]
  T* v_cache;              // [heads, max_seq, head_dim]
  const int* position;          // [1]
  float* attn;                  // [hidden] = [heads, head_dim]
  float* mlp;                   // [ffn]
  float* y;                     // [hidden]
  int hidden, heads, ffn, max_seq, rotary_dims;
  float eps, rotary_base, softmax_scale;
};

// griddepcontrol (sm_90+): without a PDL launch both are no-ops.
__device__ __forceinline__ void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void wait_for_previous_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

template <typename T>
__device__ __forceinline__ const uint4* row_of(const T* matrix, int row, int cols) {
  return reinterpret_cast<const uint4*>(matrix + static_cast<size_t>(row) * cols);
}

__device__ __forceinline__ float gelu(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

// One LayerNorm output: out = LN(x) * weight + bias, written to shared memory.
template <typename T>
struct LayerNormOut {
  const T* weight;  // [hidden]
  const T* bias;    // [hidden]
  float* out;       // [hidden] shared
};

// out_k = (x - mean) * rstd * weight_k + bias_k for each k < kOuts, from one set of statistics of
// x [hidden] (fp32, global, written by an earlier kernel). Thread t holds chunks t, t + kThreads.
// Ends with a barrier, so the outputs are ready for the whole block.
template <int kOuts, typename T>
__device__ void layer_norm_to_shared(const float* x, int hidden, float eps, const LayerNormOut<T> (&outs)[kOuts],
                                     float (*reduce_scratch)[kMaxWarpsPerBlock]) {
  const int chunks = hidden / kChunkElems;
  auto chunk_of = [](int slot) { return static_cast<int>(threadIdx.x) + slot * kThreads; };
  float values[kLayerNormChunks * kChunkElems];
#pragma unroll
  for (int slot = 0; slot < kLayerNormChunks; ++slot) {
    float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
    if (chunk_of(slot) < chunks) {
      lo = __ldcg(reinterpret_cast<const float4*>(x) + 2 * chunk_of(slot));
      hi = __ldcg(reinterpret_cast<const float4*>(x) + 2 * chunk_of(slot) + 1);
    }
    const float loaded[kChunkElems] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int e = 0; e < kChunkElems; ++e) values[slot * kChunkElems + e] = loaded[e];
  }
  BlockAllReduce<SumOp> block_sum(reduce_scratch);
  const LayerNormStats stats = layernorm_stats(
      values, [&](int i) { return chunk_of(i / kChunkElems) < chunks; }, hidden, eps,
      [&](float v) { return block_sum(v); });
#pragma unroll
  for (int k = 0; k < kOuts; ++k) {
#pragma unroll
    for (int slot = 0; slot < kLayerNormChunks; ++slot) {
      const int c = chunk_of(slot);
      if (c >= chunks) continue;
      const uint4 w = reinterpret_cast<const uint4*>(outs[k].weight)[c];
      const uint4 b = reinterpret_cast<const uint4*>(outs[k].bias)[c];
      const T* wt = reinterpret_cast<const T*>(&w);
      const T* bt = reinterpret_cast<const T*>(&b);
      float result[kChunkElems];
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) {
        result[e] = layernorm_apply(values[slot * kChunkElems + e], stats, to_float(wt[e]), to_float(bt[e]));
      }
      float4* dst = reinterpret_cast<float4*>(outs[k].out) + 2 * c;
      dst[0] = make_float4(result[0], result[1], result[2], result[3]);
      dst[1] = make_float4(result[4], result[5], result[6], result[7]);
    }
  }
  __syncthreads();
}

// NeoX rotate_half RoPE in place on q and k [head_dim] (shared), for i < rotary_dims / 2:
//   angle = p * base^(-2i / r);  (x_i, x_{i+r/2}) <- (x_i cos - x_{i+r/2} sin, x_{i+r/2} cos + x_i sin)
// with base^(-2i/r) computed as neoxfuse.reference does: 1 / base^(float(2i) / r) in fp32.
__device__ void rotate_half_in_place(float* q, float* k, int rotary_dims, int position, float base) {
  const int half = rotary_dims / 2;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float inv_freq = 1.0f / powf(base, static_cast<float>(2 * i) / static_cast<float>(rotary_dims));
    float sin_a, cos_a;
    sincosf(static_cast<float>(position) * inv_freq, &sin_a, &cos_a);
    auto rotate = [&](float* vec) {
      const float x1 = vec[i], x2 = vec[i + half];
      vec[i] = x1 * cos_a - x2 * sin_a;
      vec[i + half] = x2 * cos_a + x1 * sin_a;
    };
    rotate(q);
    rotate(k);
  }
}

// Shared memory of attn_mlp_in_kernel, in floats from the start of the dynamic allocation.
template <int kHeadDim, typename T>
struct AttnMlpInLayout {
  using Attention = DecodeAttention<kHeadDim, kThreads, T>;
  static constexpr int kQkvRows = 3 * kHeadDim;  // [3, head_dim]: this head's q, k, v
  static constexpr int kPartialFloats = kHeadDim * static_cast<int>(sizeof(SoftmaxPartial) / sizeof(float));

  __host__ __device__ static int xn1(int) { return 0; }
  __host__ __device__ static int xn2(int hidden) { return hidden; }
  __host__ __device__ static int qkv_own(int hidden) { return 2 * hidden; }
  __host__ __device__ static int qkv(int hidden) { return qkv_own(hidden) + kQkvRows; }
  __host__ __device__ static int partial(int hidden) { return qkv(hidden) + kQkvRows; }
  __host__ __device__ static int merged(int hidden) { return partial(hidden) + kPartialFloats; }
  __host__ __device__ static int scratch(int hidden) { return merged(hidden) + kPartialFloats; }
  __host__ __device__ static size_t bytes(int hidden) {
    return sizeof(float) * static_cast<size_t>(scratch(hidden) + Attention::kScratchFloats);
  }
};

// The fc_in rows block `block` of attn_mlp_in computes, of a grid of `blocks` whose first
// `head_blocks` (heads x C) own the heads' QKV rows. The grid's jobs are 3 * hidden QKV rows and
// ffn fc_in rows, all `hidden` long; block b's share is split_range(3 * hidden + ffn, blocks, b).
// The head blocks' shares hold all QKV rows and fc_in rows [0, head_fc), split evenly over them;
// each other block's share is all fc_in rows. The plan keeps head_fc >= 0 (fc_in_rows_for_heads).
__host__ __device__ inline int fc_in_rows_for_heads(int hidden, int ffn, int head_blocks, int blocks) {
  return split_range(3 * hidden + ffn, blocks, head_blocks).begin - 3 * hidden;
}

__host__ __device__ inline IndexRange fc_in_rows(int hidden, int ffn, int head_blocks, int blocks, int block) {
  if (block < head_blocks) return split_range(fc_in_rows_for_heads(hidden, ffn, head_blocks, blocks), head_blocks, block);
  const IndexRange share = split_range(3 * hidden + ffn, blocks, block);
  return {share.begin - 3 * hidden, share.end - 3 * hidden};
}

template <int kHeadDim, typename T>
__global__ void __launch_bounds__(kThreads, 1) attn_mlp_in_kernel(const LayerParams<T> p) {
  using Layout = AttnMlpInLayout<kHeadDim, T>;
  using Attention = typename Layout::Attention;
  constexpr int kQkvRows = Layout::kQkvRows;
  extern __shared__ float4 shared4[];
  float* shared = reinterpret_cast<float*>(shared4);
  float* xn1 = shared + Layout::xn1(p.hidden);      // [hidden] LN1(x)
  float* xn2 = shared + Layout::xn2(p.hidden);      // [hidden] LN2(x)
  float* qkv_own = shared + Layout::qkv_own(p.hidden);  // [3, head_dim]: rows this block computed
  float* qkv = shared + Layout::qkv(p.hidden);          // [3, head_dim]: the whole head; q, k rotated
  auto* partial = reinterpret_cast<SoftmaxPartial*>(shared + Layout::partial(p.hidden));  // [head_dim]
  auto* merged = reinterpret_cast<SoftmaxPartial*>(shared + Layout::merged(p.hidden));    // [head_dim]
  float* attn_scratch = shared + Layout::scratch(p.hidden);  // [Attention::kScratchFloats]
  __shared__ float reduce_scratch[2][kMaxWarpsPerBlock];

  const int rank = cluster_rank(), ranks = cluster_size();
  const int head = static_cast<int>(blockIdx.x) / ranks;  // >= p.heads: a cluster of fc_in rows only
  const bool owns_head = head < p.heads;                   // the same in every block of a cluster
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int chunks = p.hidden / kChunkElems;
  const IndexRange qkv_rows = owns_head ? split_range(kQkvRows, ranks, rank) : IndexRange{0, 0};  // of the head's [3, head_dim]
  const IndexRange fc_rows = fc_in_rows(p.hidden, p.ffn, p.heads * ranks, gridDim.x, blockIdx.x);
  const int fc_split = fc_rows.begin + fc_rows.size() / 2;  // a head block's rows [begin, split) run before attention
  const int qkv_jobs = qkv_rows.size(), first_jobs = qkv_jobs + (fc_split - fc_rows.begin);
  const T* head_qkv_weight = p.qkv_weight + static_cast<size_t>(head) * kQkvRows * p.hidden;  // [3, head_dim, hidden]

  allow_dependent_launch();
  if (warp < first_jobs) {
    const T* first_row = warp < qkv_jobs ? head_qkv_weight + static_cast<size_t>(qkv_rows.begin + warp) * p.hidden
                                              : p.fc_in_weight + static_cast<size_t>(fc_rows.begin + warp - qkv_jobs) * p.hidden;
    warp_prefetch_l2(first_row, sizeof(T) * p.hidden);
  }
  wait_for_previous_grid();

  const int position = __ldcg(p.position);
  if (position < 0 || position >= p.max_seq) {  // uniform over the grid: every block leaves here
    const IndexRange dims = owns_head ? split_range(kHeadDim, ranks, rank) : IndexRange{0, 0};
    for (int d = dims.begin + threadIdx.x; d < dims.end; d += kThreads) p.attn[head * kHeadDim + d] = NAN;
    for (int f = fc_rows.begin + threadIdx.x; f < fc_rows.end; f += kThreads) p.mlp[f] = NAN;
    return;
  }

  auto mlp_row = [&](int f) {
    const float dot = warp_dot<T>({row_of(p.fc_in_weight, f, p.hidden), xn2, chunks});
    if (lane == 0) p.mlp[f] = gelu(dot + to_float(p.fc_in_bias[f]));
  };
  if (!owns_head) {  // the whole cluster leaves here, so it skips every cluster barrier together
    layer_norm_to_shared<1, T>(p.x, p.hidden, p.eps, {{p.ln2_weight, p.ln2_bias, xn2}}, reduce_scratch);
    for (int job = warp; job < fc_rows.size(); job += kWarps) mlp_row(fc_rows.begin + job);
    return;
  }

  layer_norm_to_shared<2, T>(p.x, p.hidden, p.eps, {{p.ln1_weight, p.ln1_bias, xn1}, {p.ln2_weight, p.ln2_bias, xn2}},
                          reduce_scratch);

  // Jobs of a warp: warp, warp + kWarps, ... over [QKV rows | first half of the fc_in rows].
  int job = warp;
  for (; job < qkv_jobs; job += kWarps) {
    const int row = qkv_rows.begin + job;
    const float dot = warp_dot<T>({row_of(head_qkv_weight, row, p.hidden), xn1, chunks});
    if (lane == 0) qkv_own[row] = dot + to_float(p.qkv_bias[head * kQkvRows + row]);
  }
  cluster_arrive();  // this block's q, k, v rows are written
  for (; job < first_jobs; job += kWarps) mlp_row(fc_rows.begin + job - qkv_jobs);
  cluster_wait();
  for (int i = 0; i < kRowsPrefetchedOverAttention; ++i) {
    const int f = fc_split + warp + i * kWarps;
    if (f < fc_rows.end) warp_prefetch_l2(p.fc_in_weight + static_cast<size_t>(f) * p.hidden, sizeof(T) * p.hidden);
  }

  ClusterGather<float>{}(qkv_own, qkv, kQkvRows);
  __syncthreads();
  float* q = qkv;                  // [head_dim]
  float* k = qkv + kHeadDim;       // [head_dim]
  const float* v = qkv + 2 * kHeadDim;
  rotate_half_in_place(q, k, p.rotary_dims, position, p.rotary_base);
  __syncthreads();

  const size_t head_cache = static_cast<size_t>(head) * p.max_seq * kHeadDim;  // [max_seq, head_dim] of this head
  const IndexRange positions = split_range(position + 1, ranks, rank);
  if (positions.contains(position)) {  // the one block that reads position p writes it first
    for (int d = threadIdx.x; d < kHeadDim; d += kThreads) {
      p.k_cache[head_cache + static_cast<size_t>(position) * kHeadDim + d] = from_float<T>(k[d]);
      p.v_cache[head_cache + static_cast<size_t>(position) * kHeadDim + d] = from_float<T>(v[d]);
    }
  }
  __syncthreads();
  Attention::partial(q, p.k_cache + head_cache, p.v_cache + head_cache, positions.begin, positions.end, p.softmax_scale,
                     partial, attn_scratch);

  cluster_sync();  // every block's partial is written
  const IndexRange dims = split_range(kHeadDim, ranks, rank);
  ClusterReduce<SoftmaxPartial, SoftmaxMerge>{}(partial, merged, dims.begin, dims.end);
  __syncthreads();
  for (int d = dims.begin + threadIdx.x; d < dims.end; d += kThreads) {
    p.attn[head * kHeadDim + d] = merged[d].out / merged[d].sum;
  }

  cluster_arrive();  // done reading the other blocks' partials and q, k, v
  for (job = warp; job < fc_rows.end - fc_split; job += kWarps) mlp_row(fc_split + job);
  cluster_wait();  // no block leaves while another may still read its shared memory
}

// Shared memory of out_proj_kernel, in floats from the start of the dynamic allocation; slices are
// sized for rank 0, whose slices are the largest. The offsets are the same in every block of a
// cluster, whatever its rank's slice sizes: ClusterReduce reads `partial` at this block's offset in
// the other blocks' shared memory.
struct OutProjLayout {
  __host__ __device__ static int attn_in(int, int) { return 0; }
  __host__ __device__ static int mlp_in(int hidden, int ranks) {
    return split_range(hidden / kChunkElems, ranks, 0).size() * kChunkElems;
  }
  __host__ __device__ static int partial(int hidden, int ffn, int ranks) {
    return mlp_in(hidden, ranks) + split_range(ffn / kChunkElems, ranks, 0).size() * kChunkElems;
  }
  __host__ __device__ static size_t bytes(int hidden, int ffn, int ranks, int clusters) {
    const int rows = split_range(hidden, clusters, 0).size();
    return sizeof(float) * static_cast<size_t>(partial(hidden, ffn, ranks) + 2 * rows);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) out_proj_kernel(const LayerParams<T> p) {
  extern __shared__ float4 shared4[];
  const int rank = cluster_rank(), ranks = cluster_size();
  const int cluster = static_cast<int>(blockIdx.x) / ranks, clusters = static_cast<int>(gridDim.x) / ranks;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const IndexRange rows = split_range(p.hidden, clusters, cluster);                  // rows of y
  const IndexRange attn_chunks = split_range(p.hidden / kChunkElems, ranks, rank);   // this block's K slice of dense
  const IndexRange mlp_chunks = split_range(p.ffn / kChunkElems, ranks, rank);       // ... and of fc_out
  float* shared = reinterpret_cast<float*>(shared4);
  float* attn_in = shared + OutProjLayout::attn_in(p.hidden, ranks);           // [attn_chunks * 8]
  float* mlp_in = shared + OutProjLayout::mlp_in(p.hidden, ranks);             // [mlp_chunks * 8]
  float* partial = shared + OutProjLayout::partial(p.hidden, p.ffn, ranks);    // [rows] this block's share of each dot
  float* total = partial + rows.size();                                        // [rows]

  // Row `row` of y: this block's piece of dense[row, :] . attn and of fc_out[row, :] . mlp.
  auto dense_segment = [&](int row) {
    return RowSegment{row_of(p.dense_weight, row, p.hidden) + attn_chunks.begin, attn_in, attn_chunks.size()};
  };
  auto fc_out_segment = [&](int row) {
    return RowSegment{row_of(p.fc_out_weight, row, p.ffn) + mlp_chunks.begin, mlp_in, mlp_chunks.size()};
  };

  allow_dependent_launch();
  if (warp < rows.size()) {
    warp_prefetch_l2(dense_segment(rows.begin + warp).weights, sizeof(uint4) * attn_chunks.size());
    warp_prefetch_l2(fc_out_segment(rows.begin + warp).weights, sizeof(uint4) * mlp_chunks.size());
  }
  wait_for_previous_grid();

  for (int i = threadIdx.x; i < attn_chunks.size() * 2; i += kThreads) {
    reinterpret_cast<float4*>(attn_in)[i] = __ldcg(reinterpret_cast<const float4*>(p.attn + attn_chunks.begin * kChunkElems) + i);
  }
  for (int i = threadIdx.x; i < mlp_chunks.size() * 2; i += kThreads) {
    reinterpret_cast<float4*>(mlp_in)[i] = __ldcg(reinterpret_cast<const float4*>(p.mlp + mlp_chunks.begin * kChunkElems) + i);
  }
  __syncthreads();

  for (int j = warp; j < rows.size(); j += kWarps) {
    const float dot = warp_dot<T>(dense_segment(rows.begin + j), fc_out_segment(rows.begin + j));
    if (lane == 0) partial[j] = dot;
  }
  cluster_sync();  // every block's partial dot products are written

  const IndexRange mine = split_range(rows.size(), ranks, rank);
  ClusterReduce<float, ClusterSum>{}(partial, total, mine.begin, mine.end);
  cluster_arrive();  // done reading the other blocks' partials
  __syncthreads();
  for (int j = mine.begin + threadIdx.x; j < mine.end; j += kThreads) {
    const int row = rows.begin + j;
    const float bias = to_float(p.dense_bias[row]) + to_float(p.fc_out_bias[row]);
    p.y[row] = __ldcg(p.x + row) + bias + total[j];
  }
  cluster_wait();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    lm_head_kernel(const float* x, const T* ln_weight, const T* ln_bias, const T* embed_out, float* logits, int hidden,
                   int vocab, float eps) {
  extern __shared__ float4 shared4[];
  float* xn = reinterpret_cast<float*>(shared4);  // [hidden] LN_final(x)
  __shared__ float reduce_scratch[2][kMaxWarpsPerBlock];
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const IndexRange rows = split_range(vocab, gridDim.x, blockIdx.x);

  allow_dependent_launch();
  if (warp < rows.size()) warp_prefetch_l2(row_of(embed_out, rows.begin + warp, hidden), sizeof(T) * hidden);
  wait_for_previous_grid();

  layer_norm_to_shared<1, T>(x, hidden, eps, {{ln_weight, ln_bias, xn}}, reduce_scratch);
  for (int j = warp; j < rows.size(); j += kWarps) {
    const float dot = warp_dot<T>({row_of(embed_out, rows.begin + j, hidden), xn, hidden / kChunkElems});
    if (lane == 0) logits[rows.begin + j] = dot;
  }
}

}  // namespace fused_decoder
}  // namespace neoxfuse
