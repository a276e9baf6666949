// gptq_ln_qkv.cu — out = LayerNorm(x) · W + bias with W a GPTQ int4 weight, in one pass over qweight.
//
// Formula and format: gptq_ln_qkv.h. Figures below are Pythia-2.8B's QKV: K 2560, N 7680, group 128.
//
// Work split. Block b owns 32 output columns [32b, 32b + 32) over all of K: it alone reads that
// slice of qweight ([K/8, 32] int32, 40 KB), so every packed weight is read exactly once, with no
// split-K, no atomics and no workspace. 256 threads = 8 warps. Lane l of warp w owns column
// vector l % 8 of the block (4 columns: one 16-byte load of qweight holds 4 columns x 8 input
// rows) and k-slice s = 4w + l / 8 of 32: packed rows r = s, s + 32, s + 64, ... (10 rows for
// K 2560). One warp load reads 4 whole 128-byte lines. A thread sums its 4 columns x tokens in
// fp32 registers; the 32 k-slices are then added with two shuffles (the 4 slices in a warp) and
// shared memory (the 8 warps), always in the same order, so results are deterministic.
// N 7680 makes 240 blocks, all resident at once on an H100 (2 per SM): the 9.8 MB of qweight
// stream in a single wave.
//
// Loads are software-pipelined kBatch rows deep: as a thread finishes a row it issues the
// qweight vector (a streaming load: read once), scales and zeros of the row kBatch ahead. Its
// first kBatch rows are issued before the LayerNorm, which then runs under their latency.
//
// LayerNorm is computed by every block, redundantly: x is tokens x K fp16 (5 KB per token,
// L2-resident after the first blocks read it) and its statistics are two block reductions per
// token (common/layernorm.cuh over common/reduce.cuh). Computing it once instead would need a
// second launch or a grid-wide barrier, microseconds: the whole budget of this kernel. The block
// stages x in shared memory, normalizes it in place to fp16 ([tokens, K]: 5 KB for one token,
// 80 KB for 8 tokens of K 5120) and widens it to fp32 where it is used.
//
// Dequantization is exact in fp32: the bits 0x4B000000 | q are the float 2^23 + q, so subtracting
// 2^23 + z leaves q - z (one LOP3, one FADD). With ordered groups (g_idx NULL) the 8 rows of a
// word share a group: sum_i xn_i (q_i - z) is formed first and scaled once. With act-order
// (g_idx given) every row's group is read and every weight scaled.
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/common/layernorm.cuh"
#include "kernels/common/reduce.cuh"
#include "kernels/common/status.cuh"
#include "kernels/common/vec.cuh"
#include "kernels/gptq_ln_qkv/gptq_ln_qkv.h"

namespace neoxfuse {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;                        // 8
constexpr int kRowsPerWord = 8;                                     // int4 input rows per int32
constexpr int kColumnsPerVec = kVecBytes / sizeof(uint32_t);        // 4 int32 columns per 16-byte load
constexpr int kVecsPerBlock = 8;                                    // column vectors of a block: lane % 8
constexpr int kColumnsPerBlock = kVecsPerBlock * kColumnsPerVec;    // 32
constexpr int kSlicesPerWarp = kWarpSize / kVecsPerBlock;           // 4
constexpr int kSlices = kThreads / kVecsPerBlock;                   // 32 k-slices
constexpr int kBatch = 4;                                           // rows in flight per thread
constexpr int kHalvesPerVec = kVecBytes / sizeof(__half);           // 8
constexpr int kLnChunks = NEOXFUSE_GPTQ_LN_QKV_MAX_K / (kThreads * kHalvesPerVec);  // 4 chunks of a row per thread
constexpr int kLnSlots = kLnChunks * kHalvesPerVec;                 // 32 values of a row per thread
constexpr uint32_t kTwoTo23Bits = 0x4B000000u;                      // the float 2^23
constexpr float kTwoTo23 = 8388608.0f;

struct Params {
  __half* out;              // [T, N]
  const __half* x;          // [T, K]
  const __half* ln_weight;  // [K]
  const __half* ln_bias;    // [K]
  const uint4* qweight;     // [K/8, N/4]: 4 int32 columns per vector
  const uint32_t* qzeros;   // [groups, N/8]
  const __half* scales;     // [groups, N]
  const int* g_idx;         // [K], or null: group of row k is k / group_size
  const __half* bias;       // [N], or null
  int K, N, groups;
  int rows_per_group;       // packed rows per group: group_size / 8 (ordered groups only)
  int zero_offset;          // true zero = stored nibble + zero_offset
  float eps;
};

// What a thread reads for one packed row r of its 4 columns c0 .. c0+3.
template <bool kActOrder>
struct RowLoad;

template <>
struct RowLoad<false> {  // ordered groups: the row's group g = r / rows_per_group
  uint4 words;           // qweight[r, c0 .. c0+4): 4 columns x 8 int4 rows
  uint2 scales;          // scales[g, c0 .. c0+4): 4 fp16
  uint32_t zeros;        // qzeros[g, c0 / 8]: 8 zero nibbles, 4 of them ours
};

template <>
struct RowLoad<true> {   // act-order: each of the 8 rows has its own group
  uint4 words;
  int4 groups[2];        // g_idx[8r .. 8r+8)
};

struct Thread {
  int vec;     // column vector: columns [4 vec, 4 vec + 4)
  int slice;   // k-slice: packed rows slice, slice + kSlices, ...
  int rows;    // how many packed rows this thread reads
  int zshift;  // bit offset of its first zero nibble in a qzeros word: 0 or 16
};

__device__ __forceinline__ void load_row(const Params& p, const Thread& th, int r, RowLoad<false>& row) {
  row.words = load_vec_streaming(p.qweight + static_cast<int64_t>(r) * (p.N / kColumnsPerVec) + th.vec);
  const int g = r / p.rows_per_group;
  row.scales = __ldg(reinterpret_cast<const uint2*>(p.scales + g * p.N) + th.vec);
  row.zeros = __ldg(p.qzeros + g * (p.N / kRowsPerWord) + th.vec / 2);
}

__device__ __forceinline__ void load_row(const Params& p, const Thread& th, int r, RowLoad<true>& row) {
  row.words = load_vec_streaming(p.qweight + static_cast<int64_t>(r) * (p.N / kColumnsPerVec) + th.vec);
  const int4* groups = reinterpret_cast<const int4*>(p.g_idx + r * kRowsPerWord);
  row.groups[0] = __ldg(groups);
  row.groups[1] = __ldg(groups + 1);
}

__device__ __forceinline__ void unpack_halves(uint32_t bits, float& lo, float& hi) {
  __half2 pair;
  memcpy(&pair, &bits, sizeof(pair));
  const float2 f = __half22float2(pair);
  lo = f.x;
  hi = f.y;
}

// 8 consecutive fp16 (one 16-byte vector) as floats.
__device__ __forceinline__ void unpack_vec(const uint4& raw, float (&v)[kHalvesPerVec]) {
  unpack_halves(raw.x, v[0], v[1]);
  unpack_halves(raw.y, v[2], v[3]);
  unpack_halves(raw.z, v[4], v[5]);
  unpack_halves(raw.w, v[6], v[7]);
}

__device__ __forceinline__ uint32_t pack_halves(float lo, float hi) {
  const __half2 pair = __floats2half2_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// q_i - z exactly, for the int4 code i (input row 8r + i) of `word`; zero_magic = 2^23 + z.
__device__ __forceinline__ float code_minus_zero(uint32_t word, int i, float zero_magic) {
  return __uint_as_float(kTwoTo23Bits | ((word >> (4 * i)) & 0xFu)) - zero_magic;
}

__device__ __forceinline__ float zero_magic(uint32_t zeros, int shift, int zero_offset) {
  return kTwoTo23 + static_cast<float>(static_cast<int>((zeros >> shift) & 0xFu) + zero_offset);
}

// The normalized x of rows 8r .. 8r+8 of token t, widened: xs is [T, K] fp16 in shared memory.
__device__ __forceinline__ void load_x(const __half* xs, int K, int t, int r, float (&xv)[kRowsPerWord]) {
  unpack_vec(*reinterpret_cast<const uint4*>(xs + t * K + r * kRowsPerWord), xv);
}

// acc[t][c] += sum_i xn[t, 8r + i] * scale[c] * (q[8r + i, c] - z[c]), one group for the word.
template <int T>
__device__ __forceinline__ void accumulate_row(const Params& p, const Thread& th, int r, const RowLoad<false>& row,
                                               const __half* xs, float (&acc)[T][kColumnsPerVec]) {
  const uint32_t words[kColumnsPerVec] = {row.words.x, row.words.y, row.words.z, row.words.w};
  float scale[kColumnsPerVec];
  unpack_halves(row.scales.x, scale[0], scale[1]);
  unpack_halves(row.scales.y, scale[2], scale[3]);
  float diff[kColumnsPerVec][kRowsPerWord];  // q - z
#pragma unroll
  for (int c = 0; c < kColumnsPerVec; ++c) {
    const float magic = zero_magic(row.zeros, th.zshift + 4 * c, p.zero_offset);
#pragma unroll
    for (int i = 0; i < kRowsPerWord; ++i) diff[c][i] = code_minus_zero(words[c], i, magic);
  }
#pragma unroll
  for (int t = 0; t < T; ++t) {
    float xv[kRowsPerWord];
    load_x(xs, p.K, t, r, xv);
#pragma unroll
    for (int c = 0; c < kColumnsPerVec; ++c) {
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kRowsPerWord; ++i) dot = fmaf(xv[i], diff[c][i], dot);
      acc[t][c] = fmaf(scale[c], dot, acc[t][c]);
    }
  }
}

// acc[t][c] += sum_i xn[t, 8r + i] * scales[g_i, c] * (q[8r + i, c] - z[g_i, c]), g_i = g_idx[8r + i].
// A group outside 0..groups-1 is not read: its weights are NaN.
template <int T>
__device__ __forceinline__ void accumulate_row(const Params& p, const Thread& th, int r, const RowLoad<true>& row,
                                               const __half* xs, float (&acc)[T][kColumnsPerVec]) {
  const uint32_t words[kColumnsPerVec] = {row.words.x, row.words.y, row.words.z, row.words.w};
  const int groups[kRowsPerWord] = {row.groups[0].x, row.groups[0].y, row.groups[0].z, row.groups[0].w,
                                    row.groups[1].x, row.groups[1].y, row.groups[1].z, row.groups[1].w};
  float weight[kColumnsPerVec][kRowsPerWord];  // dequantized W[8r + i, c]
#pragma unroll
  for (int i = 0; i < kRowsPerWord; ++i) {
    const bool in_range = static_cast<unsigned>(groups[i]) < static_cast<unsigned>(p.groups);
    const int g = in_range ? groups[i] : 0;
    const uint2 scale_bits = __ldg(reinterpret_cast<const uint2*>(p.scales + g * p.N) + th.vec);
    const uint32_t zeros = __ldg(p.qzeros + g * (p.N / kRowsPerWord) + th.vec / 2);
    float scale[kColumnsPerVec];
    unpack_halves(scale_bits.x, scale[0], scale[1]);
    unpack_halves(scale_bits.y, scale[2], scale[3]);
#pragma unroll
    for (int c = 0; c < kColumnsPerVec; ++c) {
      const float s = in_range ? scale[c] : __uint_as_float(0x7FC00000u);  // NaN
      weight[c][i] = s * code_minus_zero(words[c], i, zero_magic(zeros, th.zshift + 4 * c, p.zero_offset));
    }
  }
#pragma unroll
  for (int t = 0; t < T; ++t) {
    float xv[kRowsPerWord];
    load_x(xs, p.K, t, r, xv);
#pragma unroll
    for (int c = 0; c < kColumnsPerVec; ++c) {
#pragma unroll
      for (int i = 0; i < kRowsPerWord; ++i) acc[t][c] = fmaf(xv[i], weight[c][i], acc[t][c]);
    }
  }
}

// Asks for the 128-byte line holding `address` to be brought into L1, without a register.
__device__ __forceinline__ void prefetch_l1(const void* address) {
  asm volatile("prefetch.global.L1 [%0];" ::"l"(address));
}

// xs [T, K] := fp16(LayerNorm(x)), in shared memory, visible to the whole block on return.
// Thread i holds chunks i, i + kThreads, ... (8 elements each) of every row.
template <int T>
__device__ void layer_norm_to_shared(const Params& p, __half* xs, float (*scratch)[kMaxWarpsPerBlock]) {
  const int K = p.K;
#pragma unroll
  for (int c = 0; c < kLnChunks; ++c) {  // LayerNorm weight and bias: into L1 now, used after the statistics
    const int k = (threadIdx.x + c * kThreads) * kHalvesPerVec;
    if (k < K) {
      prefetch_l1(p.ln_weight + k);
      prefetch_l1(p.ln_bias + k);
    }
  }
  const int vecs = T * K / kHalvesPerVec;
#pragma unroll 4
  for (int v = threadIdx.x; v < vecs; v += kThreads) {
    reinterpret_cast<uint4*>(xs)[v] = __ldg(reinterpret_cast<const uint4*>(p.x) + v);
  }
  __syncthreads();

  BlockAllReduce<SumOp> block_sum(scratch);
  const auto in_row = [&](int slot) { return (threadIdx.x + slot / kHalvesPerVec * kThreads) * kHalvesPerVec < K; };
#pragma unroll 1
  for (int t = 0; t < T; ++t) {
    __half* row = xs + t * K;  // [K]
    float values[kLnSlots];
#pragma unroll
    for (int c = 0; c < kLnChunks; ++c) {
      const int k = (threadIdx.x + c * kThreads) * kHalvesPerVec;
      float chunk[kHalvesPerVec];
      unpack_vec(k < K ? *reinterpret_cast<const uint4*>(row + k) : uint4{}, chunk);
#pragma unroll
      for (int e = 0; e < kHalvesPerVec; ++e) values[c * kHalvesPerVec + e] = chunk[e];
    }
    const LayerNormStats stats = layernorm_stats(values, in_row, K, p.eps, block_sum);
#pragma unroll
    for (int c = 0; c < kLnChunks; ++c) {
      const int k = (threadIdx.x + c * kThreads) * kHalvesPerVec;
      if (k >= K) continue;
      float w[kHalvesPerVec], b[kHalvesPerVec], y[kHalvesPerVec];
      unpack_vec(__ldg(reinterpret_cast<const uint4*>(p.ln_weight + k)), w);
      unpack_vec(__ldg(reinterpret_cast<const uint4*>(p.ln_bias + k)), b);
#pragma unroll
      for (int e = 0; e < kHalvesPerVec; ++e) y[e] = layernorm_apply(values[c * kHalvesPerVec + e], stats, w[e], b[e]);
      *reinterpret_cast<uint4*>(row + k) =
          uint4{pack_halves(y[0], y[1]), pack_halves(y[2], y[3]), pack_halves(y[4], y[5]), pack_halves(y[6], y[7])};
    }
  }
  __syncthreads();
}

constexpr size_t partials_bytes(int tokens) { return sizeof(float) * kWarps * tokens * kColumnsPerBlock; }
constexpr size_t scratch_bytes() { return sizeof(float) * 2 * kMaxWarpsPerBlock; }

size_t shared_bytes(int tokens, int K) {
  return partials_bytes(tokens) + scratch_bytes() + sizeof(__half) * static_cast<size_t>(tokens) * K;
}

template <int T, bool kActOrder>
__global__ void __launch_bounds__(kThreads, 2) gptq_ln_qkv_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char shared[];
  auto* partials = reinterpret_cast<float(*)[T][kColumnsPerBlock]>(shared);                       // [kWarps][T][32]
  auto* scratch = reinterpret_cast<float(*)[kMaxWarpsPerBlock]>(shared + partials_bytes(T));      // [2][32]
  __half* xs = reinterpret_cast<__half*>(shared + partials_bytes(T) + scratch_bytes());            // [T, K]

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  Thread th;
  th.vec = blockIdx.x * kVecsPerBlock + lane % kVecsPerBlock;
  th.slice = warp * kSlicesPerWarp + lane / kVecsPerBlock;
  const int packed_rows = p.K / kRowsPerWord;
  const bool has_columns = th.vec < p.N / kColumnsPerVec;
  th.rows = has_columns && th.slice < packed_rows ? (packed_rows - th.slice + kSlices - 1) / kSlices : 0;
  th.zshift = (th.vec % 2) * kColumnsPerVec * 4;

  // Row j of the thread is packed row slice + j * kSlices; it lives in ring[j % kBatch] from its
  // load, issued kBatch rows ahead, until it is accumulated.
  RowLoad<kActOrder> ring[kBatch];
#pragma unroll
  for (int b = 0; b < kBatch; ++b) {
    if (b < th.rows) load_row(p, th, th.slice + b * kSlices, ring[b]);
  }
  layer_norm_to_shared<T>(p, xs, scratch);

  float acc[T][kColumnsPerVec] = {};
  for (int j0 = 0; j0 < th.rows; j0 += kBatch) {
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int j = j0 + b;
      if (j < th.rows) {
        accumulate_row<T>(p, th, th.slice + j * kSlices, ring[b], xs, acc);
        if (j + kBatch < th.rows) load_row(p, th, th.slice + (j + kBatch) * kSlices, ring[b]);
      }
    }
  }

  // Sum the 4 k-slices of the warp (lanes l, l^8, l^16, l^24 share a column vector), then the 8 warps.
#pragma unroll
  for (int t = 0; t < T; ++t) {
#pragma unroll
    for (int c = 0; c < kColumnsPerVec; ++c) {
      float v = acc[t][c];
      v += __shfl_xor_sync(0xffffffffu, v, kVecsPerBlock);
      v += __shfl_xor_sync(0xffffffffu, v, 2 * kVecsPerBlock);
      if (lane < kVecsPerBlock) partials[warp][t][lane * kColumnsPerVec + c] = v;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < T * kColumnsPerBlock; i += kThreads) {
    const int t = i / kColumnsPerBlock;
    const int column = i % kColumnsPerBlock;
    const int n = blockIdx.x * kColumnsPerBlock + column;
    if (n >= p.N) continue;
    float sum = p.bias != nullptr ? __half2float(p.bias[n]) : 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partials[w][t][column];
    p.out[t * p.N + n] = __float2half_rn(sum);
  }
}

template <int T, bool kActOrder>
int launch(const Params& p, cudaStream_t stream) {
  const size_t bytes = shared_bytes(T, p.K);
  const auto kernel = gptq_ln_qkv_kernel<T, kActOrder>;
  if (bytes > 48 * 1024) {
    int device = 0, limit = 0;
    if (int status = check_cuda(cudaGetDevice(&device))) return status;
    if (int status = check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device))) return status;
    if (bytes > static_cast<size_t>(limit)) return NEOXFUSE_ERR_UNSUPPORTED;
    if (int status = check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)))) {
      return status;
    }
  }
  const unsigned blocks = static_cast<unsigned>((p.N + kColumnsPerBlock - 1) / kColumnsPerBlock);
  kernel<<<blocks, kThreads, bytes, stream>>>(p);
  return NEOXFUSE_CHECK_LAUNCH();
}

// Instantiates T = 1 .. NEOXFUSE_GPTQ_LN_QKV_MAX_TOKENS, each with ordered and act-order groups.
template <int T = 1>
int dispatch(const Params& p, int tokens, cudaStream_t stream) {
  if constexpr (T < NEOXFUSE_GPTQ_LN_QKV_MAX_TOKENS) {
    if (tokens > T) return dispatch<T + 1>(p, tokens, stream);
  }
  return p.g_idx != nullptr ? launch<T, true>(p, stream) : launch<T, false>(p, stream);
}

}  // namespace
}  // namespace neoxfuse

NEOXFUSE_API int neoxfuse_gptq_ln_qkv(void* out, const void* x, const void* ln_weight, const void* ln_bias,
                                      const int32_t* qweight, const int32_t* qzeros, const void* scales,
                                      const int32_t* g_idx, const void* bias, int tokens, int K, int N, int groups,
                                      int group_size, int zero_offset, float eps, cudaStream_t stream) {
  using namespace neoxfuse;
  const void* required[] = {out, x, ln_weight, ln_bias, qweight, qzeros, scales};
  for (const void* ptr : required) {
    if (ptr == nullptr) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (tokens < 1 || K < kRowsPerWord || K % kRowsPerWord != 0 || N < kRowsPerWord || N % kRowsPerWord != 0 ||
      groups < 1 || (zero_offset != 0 && zero_offset != 1) || !std::isfinite(eps) || eps < 0.0f) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (g_idx == nullptr && (group_size < kRowsPerWord || group_size % kRowsPerWord != 0 || K % group_size != 0 ||
                           groups != K / group_size)) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (tokens > NEOXFUSE_GPTQ_LN_QKV_MAX_TOKENS || K > NEOXFUSE_GPTQ_LN_QKV_MAX_K) return NEOXFUSE_ERR_UNSUPPORTED;
  const void* all[] = {out, x, ln_weight, ln_bias, qweight, qzeros, scales, g_idx, bias};
  for (const void* ptr : all) {
    if (ptr != nullptr && !is_vec_aligned(ptr)) return NEOXFUSE_ERR_MISALIGNED;
  }

  Params p;
  p.out = static_cast<__half*>(out);
  p.x = static_cast<const __half*>(x);
  p.ln_weight = static_cast<const __half*>(ln_weight);
  p.ln_bias = static_cast<const __half*>(ln_bias);
  p.qweight = reinterpret_cast<const uint4*>(qweight);
  p.qzeros = reinterpret_cast<const uint32_t*>(qzeros);
  p.scales = static_cast<const __half*>(scales);
  p.g_idx = g_idx;
  p.bias = static_cast<const __half*>(bias);
  p.K = K;
  p.N = N;
  p.groups = groups;
  p.rows_per_group = g_idx == nullptr ? group_size / kRowsPerWord : 1;
  p.zero_offset = zero_offset;
  p.eps = eps;
  return dispatch(p, tokens, stream);
}
