// ln_residual.cu — fused residual add + one or two LayerNorms with shared statistics.
//
// For every row t of [rows, hidden] tensors, in one pass over memory (formula in ln_residual.h):
//   h[t] = x[t] + r0[t] + r1[t];  y_k[t] = LN_k(h[t])  for k = 0 (and 1), sharing mean and rstd.
//
// Work split: one thread block per row. The row is cut into chunks of V elements: 16 bytes
// (V = 8 fp16/bf16, 4 fp32) when hidden % V == 0 and every pointer and row stride is 16-byte
// aligned, else single elements (the scalar path: odd sizes, offsets, strides). Thread i holds
// chunks i, i + threads, ... — K chunks, K * V <= 32 fp32 values in registers — and the host
// picks the smallest K (a power of two) that keeps the block at <= 512 threads: Pythia-2.8B in
// fp16 is 320 chunks, so 320 threads of one chunk each.
//
// Why: each input element is read once and each output written once, the minimum traffic; the
// row stays in registers from the sum through both statistics passes to the normalisation. At
// decode (one row) the whole block spreads the row so that every thread issues one 16-byte load
// per input, all loads in flight together: the kernel is a few memory latencies long. At prefill
// (16k rows) rows are independent blocks with no inter-block communication, several resident per
// SM, which keeps enough loads in flight to stream at memory bandwidth. The statistics are two
// block reductions (common/reduce.cuh), one barrier each. x and the residuals are streamed
// (ld.global.cs: read once); weights and biases are ordinary loads (every row reads them, so they
// stay in L2) issued together with the inputs when they take <= 32 bytes per thread and tensor,
// so their latency hides behind the reductions.
//
// Limits: hidden <= 16384 (512 threads x 32 values), rows < 2^31 (one block each).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstring>

#include "kernels/common/dtype.cuh"
#include "kernels/common/layernorm.cuh"
#include "kernels/common/reduce.cuh"
#include "kernels/common/status.cuh"
#include "kernels/common/vec.cuh"
#include "kernels/ln_residual/ln_residual.h"

namespace neoxfuse {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kMaxValuesPerThread = 32;
constexpr int kPrefetchBytesPerThread = 32;  // per weight/bias tensor
static_assert(kMaxThreads * kMaxValuesPerThread == NEOXFUSE_LN_RESIDUAL_MAX_HIDDEN, "ln_residual.h states the limit");

// V consecutive elements, moved as one access (a 16-byte vector when V * sizeof(T) == 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_streaming(const T* p) {
  if constexpr (sizeof(Pack<T, V>) == kVecBytes) {
    const uint4 raw = load_vec_streaming(reinterpret_cast<const uint4*>(p));
    Pack<T, V> pack;
    memcpy(&pack, &raw, sizeof(pack));
    return pack;
  } else {
    return *reinterpret_cast<const Pack<T, V>*>(p);
  }
}

// Where this thread's chunks of a row live: chunk k of the thread is element columns
// [V * (threadIdx.x + k * blockDim.x), +V) of the row.
template <int V>
__device__ __forceinline__ int chunk_column(int k) {
  return V * static_cast<int>(threadIdx.x + k * blockDim.x);
}

// chunks[k] = row `row` of the [rows, hidden] tensor at base (row stride `stride`), this thread's
// K chunks; zero past the row's end. Streaming loads.
template <typename T, int V, int K>
__device__ __forceinline__ void load_row_chunks(const void* base, int64_t stride, int64_t row, int hidden,
                                                Pack<T, V> (&chunks)[K]) {
  const T* row_start = static_cast<const T*>(base) + row * stride;  // [hidden]
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int column = chunk_column<V>(k);
    chunks[k] = column < hidden ? load_streaming<T, V>(row_start + column) : Pack<T, V>{};
  }
}

// This thread's K chunks of a [hidden] parameter vector (ordinary loads: every row reads it).
template <typename T, int V, int K>
__device__ __forceinline__ void load_param_chunks(const void* base, int hidden, Pack<T, V> (&chunks)[K]) {
  const T* param = static_cast<const T*>(base);  // [hidden]
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int column = chunk_column<V>(k);
    chunks[k] = column < hidden ? *reinterpret_cast<const Pack<T, V>*>(param + column) : Pack<T, V>{};
  }
}

template <typename T, int V, int K>
__device__ __forceinline__ void add_chunks(const Pack<T, V> (&chunks)[K], float (&values)[K * V]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int v = 0; v < V; ++v) values[k * V + v] += to_float(chunks[k].v[v]);
  }
}

// values (this thread's K chunks, fp32) rounded to T and stored into row `row` of base.
template <typename T, int V, int K>
__device__ __forceinline__ void store_row_chunks(void* base, int64_t stride, int64_t row, int hidden,
                                                 const float (&values)[K * V]) {
  T* row_start = static_cast<T*>(base) + row * stride;  // [hidden]
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int column = chunk_column<V>(k);
    if (column < hidden) {
      Pack<T, V> pack;
#pragma unroll
      for (int v = 0; v < V; ++v) pack.v[v] = from_float<T>(values[k * V + v]);
      *reinterpret_cast<Pack<T, V>*>(row_start + column) = pack;
    }
  }
}

template <typename T, int V, int K>
__global__ void __launch_bounds__(kMaxThreads) ln_residual_kernel(const neoxfuse_ln_residual_args args) {
  using Chunk = Pack<T, V>;
  constexpr bool kPrefetchParams = K * sizeof(Chunk) <= kPrefetchBytesPerThread;
  constexpr int kParamSlots = kPrefetchParams ? 2 : 1;  // LayerNorms whose weight/bias are held at once
  const int hidden = static_cast<int>(args.hidden);
  const int64_t row = blockIdx.x;

  // Every load of the row is issued before any is used.
  Chunk x[K], residual0[K], residual1[K];
  load_row_chunks<T, V, K>(args.x, args.x_stride, row, hidden, x);
  if (args.residual[0] != nullptr) load_row_chunks<T, V, K>(args.residual[0], args.residual_stride[0], row, hidden, residual0);
  if (args.residual[1] != nullptr) load_row_chunks<T, V, K>(args.residual[1], args.residual_stride[1], row, hidden, residual1);
  Chunk weight[kParamSlots][K], bias[kParamSlots][K];
  if constexpr (kPrefetchParams) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (args.y[k] != nullptr) {
        load_param_chunks<T, V, K>(args.weight[k], hidden, weight[k]);
        load_param_chunks<T, V, K>(args.bias[k], hidden, bias[k]);
      }
    }
  }

  // h = x + r0 + r1 in fp32, rounded once to T: what is written and what is normalised.
  float h[K * V];
#pragma unroll
  for (int i = 0; i < K * V; ++i) h[i] = 0.0f;
  add_chunks<T, V, K>(x, h);
  if (args.residual[0] != nullptr) add_chunks<T, V, K>(residual0, h);
  if (args.residual[1] != nullptr) add_chunks<T, V, K>(residual1, h);
#pragma unroll
  for (int i = 0; i < K * V; ++i) h[i] = to_float(from_float<T>(h[i]));
  if (args.h != nullptr) store_row_chunks<T, V, K>(args.h, args.h_stride, row, hidden, h);

  __shared__ float scratch[2][kMaxWarpsPerBlock];
  BlockAllReduce<SumOp> block_sum(scratch);
  const LayerNormStats stats = layernorm_stats(
      h, [&](int i) { return chunk_column<V>(i / V) < hidden; }, hidden, args.eps, block_sum);

#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (args.y[k] == nullptr) continue;
    const int slot = kPrefetchParams ? k : 0;
    if constexpr (!kPrefetchParams) {
      load_param_chunks<T, V, K>(args.weight[k], hidden, weight[slot]);
      load_param_chunks<T, V, K>(args.bias[k], hidden, bias[slot]);
    }
    float y[K * V];
#pragma unroll
    for (int c = 0; c < K; ++c) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        y[c * V + v] = layernorm_apply(h[c * V + v], stats, to_float(weight[slot][c].v[v]), to_float(bias[slot][c].v[v]));
      }
    }
    store_row_chunks<T, V, K>(args.y[k], args.y_stride[k], row, hidden, y);
  }
}

int element_bytes(int dtype) {
  switch (dtype) {
    case NEOXFUSE_FP32:
      return 4;
    case NEOXFUSE_FP16:
    case NEOXFUSE_BF16:
      return 2;
    default:
      return 0;
  }
}

int check_args(const neoxfuse_ln_residual_args& a) {
  if (element_bytes(a.dtype) == 0 || a.rows < 0 || a.hidden < 1) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  if (!std::isfinite(a.eps) || a.eps < 0.0f) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  // With no rows the pointers may be NULL: torch gives empty tensors no memory.
  if (a.rows > 0 && (a.x == nullptr || a.y[0] == nullptr)) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  for (int k = 0; k < 2; ++k) {
    if (a.y[k] != nullptr && (a.weight[k] == nullptr || a.bias[k] == nullptr)) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (a.rows > 1) {
    if (a.x_stride < 0) return NEOXFUSE_ERR_INVALID_ARGUMENT;
    for (int k = 0; k < 2; ++k) {
      if (a.residual[k] != nullptr && a.residual_stride[k] < 0) return NEOXFUSE_ERR_INVALID_ARGUMENT;
      if (a.y[k] != nullptr && a.y_stride[k] < a.hidden) return NEOXFUSE_ERR_INVALID_ARGUMENT;
    }
    if (a.h != nullptr && a.h_stride < a.hidden) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (a.hidden > NEOXFUSE_LN_RESIDUAL_MAX_HIDDEN || a.rows > INT_MAX) return NEOXFUSE_ERR_UNSUPPORTED;
  return NEOXFUSE_OK;
}

// Whether every tensor of the call allows 16-byte chunks of `width` elements.
bool vectorizable(const neoxfuse_ln_residual_args& a, int width) {
  if (a.hidden % width != 0) return false;
  const void* pointers[] = {a.x, a.residual[0], a.residual[1], a.h, a.weight[0], a.bias[0], a.weight[1], a.bias[1], a.y[0], a.y[1]};
  for (const void* p : pointers) {
    if (p != nullptr && !is_vec_aligned(p)) return false;
  }
  if (a.rows == 1) return true;
  const int64_t strides[] = {a.x_stride,
                             a.residual[0] ? a.residual_stride[0] : 0,
                             a.residual[1] ? a.residual_stride[1] : 0,
                             a.h ? a.h_stride : 0,
                             a.y_stride[0],
                             a.y[1] ? a.y_stride[1] : 0};
  for (int64_t stride : strides) {
    if (stride % width != 0) return false;
  }
  return true;
}

int plan_launch(const neoxfuse_ln_residual_args& a, neoxfuse_ln_residual_launch* launch) {
  if (int status = check_args(a)) return status;
  const int vector_width = kVecBytes / element_bytes(a.dtype);
  launch->vector_width = vectorizable(a, vector_width) ? vector_width : 1;
  const int chunks = static_cast<int>(a.hidden) / launch->vector_width;
  int chunks_per_thread = 1;  // hidden <= kMaxThreads * kMaxValuesPerThread bounds it by kMaxValuesPerThread / width
  while ((chunks + chunks_per_thread - 1) / chunks_per_thread > kMaxThreads) chunks_per_thread *= 2;
  const int threads = (chunks + chunks_per_thread - 1) / chunks_per_thread;
  launch->chunks_per_thread = chunks_per_thread;
  launch->threads = (threads + kWarpSize - 1) / kWarpSize * kWarpSize;
  return NEOXFUSE_OK;
}

// Instantiates K = 1, 2, 4, ... up to K * V == kMaxValuesPerThread and launches the planned one.
template <typename T, int V, int K = 1>
int launch_kernel(const neoxfuse_ln_residual_args& a, const neoxfuse_ln_residual_launch& launch, cudaStream_t stream) {
  if constexpr (K * V < kMaxValuesPerThread) {
    if (launch.chunks_per_thread > K) return launch_kernel<T, V, 2 * K>(a, launch, stream);
  }
  ln_residual_kernel<T, V, K><<<static_cast<unsigned>(a.rows), launch.threads, 0, stream>>>(a);
  return NEOXFUSE_CHECK_LAUNCH();
}

template <typename T>
int launch_dtype(const neoxfuse_ln_residual_args& a, const neoxfuse_ln_residual_launch& launch, cudaStream_t stream) {
  constexpr int kVectorWidth = kVecBytes / sizeof(T);
  return launch.vector_width == 1 ? launch_kernel<T, 1>(a, launch, stream) : launch_kernel<T, kVectorWidth>(a, launch, stream);
}

}  // namespace
}  // namespace neoxfuse

NEOXFUSE_API int neoxfuse_ln_residual_plan(const neoxfuse_ln_residual_args* args, neoxfuse_ln_residual_launch* launch) {
  if (args == nullptr || launch == nullptr) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  return neoxfuse::plan_launch(*args, launch);
}

NEOXFUSE_API int neoxfuse_ln_residual(const neoxfuse_ln_residual_args* args, cudaStream_t stream) {
  using namespace neoxfuse;
  if (args == nullptr) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  neoxfuse_ln_residual_launch launch;
  if (int status = plan_launch(*args, &launch)) return status;
  if (args->rows == 0) return NEOXFUSE_OK;
  switch (args->dtype) {
    case NEOXFUSE_FP32:
      return launch_dtype<float>(*args, launch, stream);
    case NEOXFUSE_FP16:
      return launch_dtype<__half>(*args, launch, stream);
    default:
      return launch_dtype<__nv_bfloat16>(*args, launch, stream);
  }
}
