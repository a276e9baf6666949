/* gptq_ln_qkv.h — LayerNorm + GPTQ int4 dequantization + QKV projection in one kernel (C ABI).
 *
 * For tokens t < tokens and output columns n < N:
 *   xn[t, k]  = (x[t, k] - mean_t) / sqrt(var_t + eps) * ln_weight[k] + ln_bias[k]
 *               (mean and biased variance in fp32; xn rounded to fp16, as HF's fp16 LayerNorm)
 *   out[t, n] = bias[n] + sum_k xn[t, k] * scales[g(k), n] * (q[k, n] - z[g(k), n])
 * with the GPTQ format of python/neoxfuse/quant/gptq.py:
 *   q[k, n] = (qweight[k / 8, n] >> 4 (k % 8)) & 15,   z[g, n] = ((qzeros[g, n / 8] >> 4 (n % 8)) & 15) + zero_offset,
 *   g(k) = k / group_size (g_idx NULL: groups in order) or g_idx[k] (act-order).
 * out keeps the weight's column order: for HF's fused query_key_value that is [tokens, heads, 3, head_dim].
 * Sums are in fp32; out is rounded once to fp16. Python: neoxfuse.ops.gptq_ln_qkv.
 */
#pragma once

#include <stdint.h>

#include "kernels/common/status.h"

typedef struct CUstream_st* cudaStream_t;

#define NEOXFUSE_GPTQ_LN_QKV_MAX_TOKENS 8
#define NEOXFUSE_GPTQ_LN_QKV_MAX_K 8192

/* Device pointers, contiguous, 16-byte aligned; fp16 tensors are `__half`:
 *   out [tokens, N] fp16;  x [tokens, K] fp16;  ln_weight, ln_bias [K] fp16;
 *   qweight [K/8, N] int32;  qzeros [groups, N/8] int32;  scales [groups, N] fp16;
 *   g_idx [K] int32, values in 0..groups-1, or NULL (then K = groups * group_size);
 *   bias [N] fp16 or NULL.
 * Sizes: 1 <= tokens <= 8; K, N multiples of 8; K <= NEOXFUSE_GPTQ_LN_QKV_MAX_K; group_size a
 * multiple of 8 (read only when g_idx is NULL; K for per-channel); zero_offset 1 (checkpoint
 * format "gptq", v1) or 0 ("gptq_v2"); eps finite, >= 0.
 * Returns NEOXFUSE_ERR_INVALID_ARGUMENT for a NULL pointer or a size, group or eps out of range,
 * NEOXFUSE_ERR_MISALIGNED for a pointer off 16 bytes, NEOXFUSE_ERR_UNSUPPORTED for tokens or K
 * past the limits (or shared memory the device lacks). A g_idx value outside 0..groups-1 is not
 * read out of bounds: the columns it touches come out NaN. */
NEOXFUSE_API int neoxfuse_gptq_ln_qkv(void* out, const void* x, const void* ln_weight, const void* ln_bias,
                                      const int32_t* qweight, const int32_t* qzeros, const void* scales,
                                      const int32_t* g_idx, const void* bias, int tokens, int K, int N, int groups,
                                      int group_size, int zero_offset, float eps, cudaStream_t stream);
