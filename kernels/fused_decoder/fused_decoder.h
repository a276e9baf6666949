/* fused_decoder.h — one GPT-NeoX (parallel residual) decoder layer for one token, the final
 * LayerNorm + logits, and a sampled token, as cluster kernels (kernels/fused_decoder/fused_decoder.cu).
 *
 * For the token's residual stream x [hidden] (fp32) at position p, a layer computes
 *
 *   q, k, v = split(LN1(x) @ W_qkv.T + b_qkv)       per head: [heads, 3, head_dim] (HF's layout)
 *   q, k    = RoPE(q, p), RoPE(k, p)                 NeoX rotate_half on the first rotary_dims
 *   K[h, p], V[h, p] = k, v                          written into the KV cache (rounded to nearest)
 *   a_h     = softmax(q_h . K[h, 0..p] / sqrt(head_dim)) V[h, 0..p]
 *   m       = GELU(LN2(x) @ W_in.T + b_in)           exact erf GELU
 *   y       = x + (a @ W_dense.T + b_dense) + (m @ W_out.T + b_out)
 *
 * with LN(x) = (x - mean) / sqrt(var + eps) * w + b from one set of statistics. Weights are
 * fp16 or bf16 (the shape's dtype) in Hugging Face's layout (no re-layout); everything is
 * accumulated in fp32; the KV cache is [heads, max_seq, head_dim] per layer, of the weights' dtype.
 * Results do not depend on timing: every reduction has a fixed order and no float atomics are used.
 *
 * The position is read from device memory, so a CUDA graph can replay a step while the
 * position advances. A position outside [0, max_seq) writes NaN to y and nothing to the cache.
 *
 * Call neoxfuse_fused_decoder_plan() once per device and shape before launching a layer: it
 * checks the shape, sets the kernels' shared-memory limits and picks their grids (cluster size and count).
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "kernels/common/dtype.h"
#include "kernels/common/status.h"

typedef struct CUstream_st* cudaStream_t;

#define NEOXFUSE_FUSED_DECODER_THREADS 256 /* threads per block of every kernel */
#define NEOXFUSE_FUSED_DECODER_MAX_HIDDEN 8192
#define NEOXFUSE_FUSED_SAMPLE_MAX_VOCAB 65536 /* the largest vocabulary neoxfuse_fused_sample_token takes */

/* The model's sizes and dtype. Supported: head_dim 64, 80, 96, 128 or 256, hidden = heads * head_dim <= 8192,
 * hidden and ffn multiples of 8, rotary_dims even and <= head_dim, dtype NEOXFUSE_FP16 or NEOXFUSE_BF16
 * (NEOXFUSE_ERR_UNSUPPORTED otherwise). */
typedef struct {
  int hidden;
  int heads;
  int head_dim;
  int rotary_dims;
  int ffn;
  int max_seq; /* positions the KV cache holds */
  float eps;
  float rotary_base;
  int dtype; /* enum neoxfuse_dtype of every weight, bias and the KV cache */
} neoxfuse_fused_shape;

/* How one layer kernel is launched: `clusters` clusters of `cluster_size` blocks. */
typedef struct {
  int cluster_size;        /* blocks per cluster (1..8) */
  int clusters;            /* clusters in the launch */
  int max_active_clusters; /* clusters of this size the device runs at once */
  int smem;                /* dynamic shared memory per block, bytes */
} neoxfuse_fused_grid;

/* How the layer kernels run on the current device (filled by neoxfuse_fused_decoder_plan). */
typedef struct {
  neoxfuse_fused_grid attn_mlp_in; /* clusters >= heads: cluster h < heads owns head h, the others compute fc_in rows only */
  neoxfuse_fused_grid out_proj;    /* the clusters split the rows of y */
} neoxfuse_fused_plan;

/* One layer's tensors: device pointers, each 16-byte aligned and contiguous. T: the shape's dtype
 * (__half or __nv_bfloat16). */
typedef struct {
  const float* x;            /* [hidden] fp32: the residual stream in */
  const void* ln1_weight;    /* [hidden] T */
  const void* ln1_bias;      /* [hidden] T */
  const void* ln2_weight;    /* [hidden] T */
  const void* ln2_bias;      /* [hidden] T */
  const void* qkv_weight;    /* [3 * hidden, hidden] T, rows [heads, 3, head_dim] */
  const void* qkv_bias;      /* [3 * hidden] T */
  const void* dense_weight;  /* [hidden, hidden] T */
  const void* dense_bias;    /* [hidden] T */
  const void* fc_in_weight;  /* [ffn, hidden] T */
  const void* fc_in_bias;    /* [ffn] T */
  const void* fc_out_weight; /* [hidden, ffn] T */
  const void* fc_out_bias;   /* [hidden] T */
  void* k_cache;             /* [heads, max_seq, head_dim] T: position p written, 0..p read */
  void* v_cache;             /* [heads, max_seq, head_dim] T */
  const int* position;       /* [1] int32: p */
  float* attn;               /* [hidden] fp32 scratch: the heads' attention outputs, before dense */
  float* mlp;                /* [ffn] fp32 scratch: GELU(fc_in) */
  float* y;                  /* [hidden] fp32: the residual stream out; must not overlap x */
} neoxfuse_fused_layer;

/* Checks `shape` for the current device, sets the kernels' shared-memory limits there and fills
 * `plan`. For each kernel, cluster_size 0 picks the size (<= 8) that keeps the most SMs busy in one
 * wave of clusters (one block per SM; ties to the larger cluster, and for attn_mlp_in sizes within
 * 1/16 of the most blocks count as ties) and as many clusters of it as run at once; 1..8 forces
 * the size for both kernels.
 * NEOXFUSE_ERR_UNSUPPORTED for a shape the kernels do not handle or that does not fit the
 * device's shared memory. */
NEOXFUSE_API int neoxfuse_fused_decoder_plan(const neoxfuse_fused_shape* shape, int cluster_size, neoxfuse_fused_plan* plan);

/* One decoder layer (two kernel launches on `stream`). use_pdl: launch with programmatic
 * dependent launch, so each kernel starts while its predecessor drains (sm_90+). */
NEOXFUSE_API int neoxfuse_fused_decoder_layer(const neoxfuse_fused_shape* shape, const neoxfuse_fused_layer* layer,
                                              const neoxfuse_fused_plan* plan, int use_pdl, cudaStream_t stream);

/* logits [vocab] fp32 = LN(x) @ embed_out.T: x [hidden] fp32, ln_weight / ln_bias [hidden] and
 * embed_out [vocab, hidden] of `dtype` (NEOXFUSE_FP16 or NEOXFUSE_BF16); hidden a multiple of 8,
 * <= 8192. `blocks` blocks split the vocab rows (one per SM is right). Needs no plan. */
NEOXFUSE_API int neoxfuse_fused_lm_head(const float* x, const void* ln_weight, const void* ln_bias, const void* embed_out,
                                        int dtype, float* logits, int hidden, int vocab, float eps, int blocks,
                                        int use_pdl, cudaStream_t stream);

/* A sampled token from logits [vocab] (fp32), as neoxfuse.sampling.choose draws it: softmax(z / T)
 * filtered by top-k (top_k = 0: off; ties with the k-th are kept) and top-p (top_p = 1: off; the
 * smallest most likely set whose mass reaches top_p of the top-k set's, ties kept), then the
 * exponential race: token = argmax_i w_i / E_i, E_i = -ln(u_i), with u_i from Philox4x32-10 keyed by
 * rng[0] (the seed) at counter (i / 4, 0, rng[1]), word i % 4; ties go to the lowest index. Writes
 * token[0] and advances rng[1] (the draws made) by one, both in device memory, so a CUDA graph
 * replaying the launch draws afresh each time. rng: [2] int64 {seed, draws}. temperature > 0 and
 * finite, top_k >= 0, 0 < top_p <= 1 (NEOXFUSE_ERR_INVALID_ARGUMENT otherwise); vocab at most
 * NEOXFUSE_FUSED_SAMPLE_MAX_VOCAB (NEOXFUSE_ERR_UNSUPPORTED). One cluster of 8 blocks; sm_90+. */
NEOXFUSE_API int neoxfuse_fused_sample_token(const float* logits, int vocab, float temperature, int top_k, float top_p,
                                             int64_t* rng, int64_t* token, cudaStream_t stream);
