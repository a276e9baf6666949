/* ln_residual.h — fused residual add + one or two LayerNorms with shared statistics (C ABI).
 *
 * For every row t of [rows, hidden] tensors:
 *   h[t]   = x[t] + residual0[t] + residual1[t]        (each residual optional)
 *   y_k[t] = (h[t] - mean(h[t])) / sqrt(var(h[t]) + eps) * weight_k + bias_k,   k = 0 and optionally 1
 * with mean and the biased variance in fp32, h summed in fp32 and rounded once to the dtype, and
 * the statistics taken of h as rounded, so y_k is the LayerNorm of the h written. It serves, for
 * GPT-NeoX: the parallel-residual block (h = attn + mlp + h_prev, then LN1 and LN2 of the next
 * layer), the sequential block (one residual, one LN), the final LayerNorm (h not written) and a
 * plain LayerNorm (no residual). Python: neoxfuse.ops.ln_residual.
 */
#pragma once

#include <stdint.h>

#include "kernels/common/dtype.h"
#include "kernels/common/status.h"

typedef struct CUstream_st* cudaStream_t;

/* Rows longer than this are NEOXFUSE_ERR_UNSUPPORTED (the row is held in registers). */
#define NEOXFUSE_LN_RESIDUAL_MAX_HIDDEN 16384

/* Every tensor is [rows, hidden] with contiguous rows `*_stride` elements apart (the stride is
 * ignored when rows == 1), except weight/bias: [hidden], contiguous. Device pointers. Outputs
 * must not overlap inputs or each other; output strides are at least `hidden`. */
typedef struct {
  int dtype; /* enum neoxfuse_dtype: of every tensor of the call (inputs, weights, biases, outputs) */
  float eps; /* finite, >= 0 */
  int64_t rows;
  int64_t hidden;
  const void* x;
  int64_t x_stride;
  const void* residual[2]; /* NULL: absent */
  int64_t residual_stride[2];
  void* h; /* NULL: the sum is not written */
  int64_t h_stride;
  const void* weight[2]; /* required for each y[k] given */
  const void* bias[2];
  void* y[2]; /* y[0] required; y[1] NULL for one LayerNorm */
  int64_t y_stride[2];
} neoxfuse_ln_residual_args;

/* How a call is launched: one block of `threads` per row; each thread holds `chunks_per_thread`
 * chunks of `vector_width` elements (vector_width > 1: 16-byte accesses; 1: the scalar path for
 * sizes, pointers or strides off 16 bytes). */
typedef struct {
  int vector_width;
  int chunks_per_thread;
  int threads;
} neoxfuse_ln_residual_launch;

/* Runs the kernel on `stream`. NEOXFUSE_ERR_INVALID_ARGUMENT for a missing pointer, a bad dtype,
 * size, stride or eps; NEOXFUSE_ERR_UNSUPPORTED for hidden > NEOXFUSE_LN_RESIDUAL_MAX_HIDDEN or
 * rows >= 2^31. rows == 0 launches nothing (its pointers may be NULL). */
NEOXFUSE_API int neoxfuse_ln_residual(const neoxfuse_ln_residual_args* args, cudaStream_t stream);

/* The launch neoxfuse_ln_residual would make for `args` (checks them the same way); touches no
 * GPU, so it can be asked anywhere. */
NEOXFUSE_API int neoxfuse_ln_residual_plan(const neoxfuse_ln_residual_args* args, neoxfuse_ln_residual_launch* launch);
