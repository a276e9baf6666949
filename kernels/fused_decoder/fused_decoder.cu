// fused_decoder.cu — the fused decoder's C ABI: argument checks, the launch plan, the launches.
//
// The kernels are in fused_decoder.cuh (what they compute and how work is split). Here: every
// argument is checked before anything is launched; the plan picks each layer kernel's grid (the
// cluster size and count that keep the most SMs streaming weights in one wave of co-resident
// clusters); launches go through cudaLaunchKernelEx with the cluster dimension and, when asked,
// the programmatic-stream-serialization attribute (PDL).
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "kernels/common/status.cuh"
#include "kernels/common/vec.cuh"
#include "kernels/fused_decoder/fused_decoder.cuh"
#include "kernels/fused_decoder/fused_decoder.h"
#include "kernels/fused_decoder/sample.cuh"

namespace neoxfuse {
namespace fused_decoder {
namespace {

// f(T{}) for the storage types the kernels are built for: __half, __nv_bfloat16.
template <typename F>
int with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case NEOXFUSE_FP16:
      return f(__half{});
    case NEOXFUSE_BF16:
      return f(__nv_bfloat16{});
    default:
      return NEOXFUSE_ERR_UNSUPPORTED;
  }
}

// f(std::integral_constant<int, head_dim>{}, T{}) for the head dims and storage types the layer
// kernels are built for.
template <typename F>
int with_layer_kernel_types(const neoxfuse_fused_shape& s, F&& f) {
  return with_dtype(s.dtype, [&](auto type) {
    switch (s.head_dim) {
      case 64:
        return f(std::integral_constant<int, 64>{}, type);
      case 80:
        return f(std::integral_constant<int, 80>{}, type);
      case 96:
        return f(std::integral_constant<int, 96>{}, type);
      case 128:
        return f(std::integral_constant<int, 128>{}, type);
      case 256:
        return f(std::integral_constant<int, 256>{}, type);
      default:
        return static_cast<int>(NEOXFUSE_ERR_UNSUPPORTED);
    }
  });
}

int check_shape(const neoxfuse_fused_shape& s) {
  if (s.heads < 1 || s.hidden < 1 || s.ffn < 1 || s.max_seq < 1 || s.rotary_dims < 0 || !(s.eps > 0.0f) ||
      !(s.rotary_base > 0.0f)) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  const bool built = with_layer_kernel_types(s, [](auto, auto) { return static_cast<int>(NEOXFUSE_OK); }) == NEOXFUSE_OK;
  const bool supported = built && s.hidden == s.heads * s.head_dim && s.hidden % kChunkElems == 0 &&
                         s.hidden <= kMaxHidden && s.ffn % kChunkElems == 0 && s.rotary_dims % 2 == 0 &&
                         s.rotary_dims <= s.head_dim;
  return supported ? NEOXFUSE_OK : NEOXFUSE_ERR_UNSUPPORTED;
}

cudaLaunchConfig_t launch_config(int blocks, size_t smem, cudaStream_t stream, cudaLaunchAttribute* attrs, int cluster_size,
                                 bool pdl) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attrs;
  if (cluster_size > 0) {
    attrs[config.numAttrs].id = cudaLaunchAttributeClusterDimension;
    attrs[config.numAttrs].val.clusterDim.x = static_cast<unsigned>(cluster_size);
    attrs[config.numAttrs].val.clusterDim.y = 1;
    attrs[config.numAttrs].val.clusterDim.z = 1;
    ++config.numAttrs;
  }
  if (pdl) {
    attrs[config.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[config.numAttrs].val.programmaticStreamSerializationAllowed = 1;
    ++config.numAttrs;
  }
  return config;
}

// Launches kernel<<<blocks, kThreads, smem, stream>>> in clusters of cluster_size (0: none), with PDL if asked.
template <typename... KernelArgs, typename... Args>
int launch(void (*kernel)(KernelArgs...), int blocks, int cluster_size, size_t smem, bool pdl, cudaStream_t stream,
           Args&&... args) {
  cudaLaunchAttribute attrs[2];
  const cudaLaunchConfig_t config = launch_config(blocks, smem, stream, attrs, cluster_size, pdl);
  return check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// Raises `kernel`'s dynamic shared-memory limit to all the device allows next to its static
// shared memory, and returns that limit in *limit. Set once to the device's maximum rather than
// to one plan's need, so plans of different cluster sizes stay valid side by side.
int raise_dynamic_smem_limit(const void* kernel, int smem_optin, size_t* limit) {
  cudaFuncAttributes attributes;
  if (int status = check_cuda(cudaFuncGetAttributes(&attributes, kernel))) return status;
  const int dynamic = smem_optin - static_cast<int>(attributes.sharedSizeBytes);
  *limit = static_cast<size_t>(dynamic);
  return check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic));
}

// Fills *grid for `kernel`: the cluster size (`forced`, else the one of 1..8 that keeps the most
// blocks running in one wave; among sizes within slack/16 of the most blocks, the largest) and
// clusters_for(size, wave) clusters, where wave is the most clusters of that size the device runs
// at once with at most one block per SM. clusters_for returns 0 where the size does not suit the
// kernel; smem_for(size, clusters) is the dynamic shared memory per block (at most smem_limit),
// which may grow as clusters shrink.
template <typename SmemFor, typename ClustersFor>
int choose_grid(const void* kernel, int forced, int slack, int sms, size_t smem_limit, SmemFor smem_for,
                ClustersFor clusters_for, neoxfuse_fused_grid* grid) {
  neoxfuse_fused_grid best[kMaxClusterSize + 1] = {};
  int most_blocks = 0;
  for (int size = forced ? forced : 1; size <= (forced ? forced : kMaxClusterSize); ++size) {
    // From a full wave down: the clusters that fit, given the shared memory that many need.
    for (int clusters = clusters_for(size, sms / size); clusters > 0;) {
      const size_t smem = smem_for(size, clusters);
      if (smem > smem_limit) break;
      cudaLaunchAttribute attrs[2];
      const cudaLaunchConfig_t config = launch_config(size, smem, nullptr, attrs, size, /*pdl=*/false);
      int active = 0;
      if (const cudaError_t status = cudaOccupancyMaxActiveClusters(&active, kernel, &config); status != cudaSuccess) {
        if (forced) return check_cuda(status);
        (void)cudaGetLastError();  // this size cannot run here
        break;
      }
      const int fitting = clusters_for(size, std::min(active, sms / size));
      if (fitting >= clusters) {
        best[size] = {size, clusters, active, static_cast<int>(smem)};
        most_blocks = std::max(most_blocks, size * clusters);
        break;
      }
      clusters = fitting;
    }
  }
  for (int size = kMaxClusterSize; size >= 1; --size) {
    if (best[size].clusters > 0 && 16 * size * best[size].clusters >= (16 - slack) * most_blocks) {
      *grid = best[size];
      return NEOXFUSE_OK;
    }
  }
  return NEOXFUSE_ERR_UNSUPPORTED;
}

// Whether `plan` can run a layer of `shape` (a plan is made per shape; this refuses one made for
// other sizes that the kernels' work split cannot take): cluster sizes 1..8, and at least one
// attn_mlp_in cluster per head, with the head blocks' shares holding their QKV rows.
bool valid_plan(const neoxfuse_fused_shape& shape, const neoxfuse_fused_plan& plan) {
  constexpr int kMaxBlocks = 1 << 20;
  for (const neoxfuse_fused_grid& grid : {plan.attn_mlp_in, plan.out_proj}) {
    if (grid.cluster_size < 1 || grid.cluster_size > kMaxClusterSize || grid.clusters < 1 ||
        grid.clusters > kMaxBlocks / grid.cluster_size) {
      return false;
    }
  }
  const neoxfuse_fused_grid& first = plan.attn_mlp_in;
  return first.clusters >= shape.heads &&
         fc_in_rows_for_heads(shape.hidden, shape.ffn, shape.heads * first.cluster_size,
                              first.clusters * first.cluster_size) >= 0;
}

bool all_vec_aligned(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (!is_vec_aligned(p)) return false;
  }
  return true;
}

bool any_null(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (p == nullptr) return true;
  }
  return false;
}

}  // namespace
}  // namespace fused_decoder
}  // namespace neoxfuse

NEOXFUSE_API int neoxfuse_fused_decoder_plan(const neoxfuse_fused_shape* shape, int cluster_size, neoxfuse_fused_plan* plan) {
  using namespace neoxfuse;
  using namespace neoxfuse::fused_decoder;
  if (shape == nullptr || plan == nullptr || cluster_size < 0 || cluster_size > kMaxClusterSize) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (int status = check_shape(*shape)) return status;

  int device = 0, sms = 0, smem_optin = 0, major = 0;
  if (int status = check_cuda(cudaGetDevice(&device))) return status;
  if (int status = check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device))) return status;
  if (major < 9) return NEOXFUSE_ERR_UNSUPPORTED;  // thread-block clusters need sm_90+
  if (int status = check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device))) return status;
  if (int status = check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device))) {
    return status;
  }

  return with_layer_kernel_types(*shape, [&](auto head_dim, auto type) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    using T = decltype(type);
    const void* attn_mlp_in = reinterpret_cast<const void*>(attn_mlp_in_kernel<kHeadDim, T>);
    const void* out_proj = reinterpret_cast<const void*>(out_proj_kernel<T>);
    size_t attn_mlp_in_limit = 0, out_proj_limit = 0;
    if (int status = raise_dynamic_smem_limit(attn_mlp_in, smem_optin, &attn_mlp_in_limit)) return status;
    if (int status = raise_dynamic_smem_limit(out_proj, smem_optin, &out_proj_limit)) return status;
    const int heads = shape->heads, hidden = shape->hidden, ffn = shape->ffn;

    // Every head needs its cluster; more clusters take fc_in rows while the wave has room for
    // them and the head blocks' shares still cover their QKV rows. A size whose wave cannot hold
    // a cluster per head runs them in more than one wave only when forced, or at size 1. Sizes
    // within 1/16 of the most blocks go to the larger cluster: it splits a head's attention over
    // more blocks.
    const auto attn_mlp_in_clusters = [&](int size, int wave) {
      int clusters = wave;
      while (clusters > heads && fc_in_rows_for_heads(hidden, ffn, heads * size, clusters * size) < 0) --clusters;
      return clusters >= heads || cluster_size > 0 || size == 1 ? std::max(clusters, heads) : 0;
    };
    if (int status = choose_grid(attn_mlp_in, cluster_size, /*slack=*/1, sms, attn_mlp_in_limit,
                                 [&](int, int) { return AttnMlpInLayout<kHeadDim, T>::bytes(hidden); }, attn_mlp_in_clusters,
                                 &plan->attn_mlp_in)) {
      return status;
    }
    // Clusters split the rows of y (no more clusters than rows), and no size gains from more
    // blocks per cluster: the most blocks win, ties to the larger cluster.
    const auto out_proj_clusters = [&](int, int wave) { return std::min(wave, hidden); };
    return choose_grid(out_proj, cluster_size, /*slack=*/0, sms, out_proj_limit,
                       [&](int size, int clusters) { return OutProjLayout::bytes(hidden, ffn, size, clusters); },
                       out_proj_clusters, &plan->out_proj);
  });
}

NEOXFUSE_API int neoxfuse_fused_decoder_layer(const neoxfuse_fused_shape* shape, const neoxfuse_fused_layer* layer,
                                              const neoxfuse_fused_plan* plan, int use_pdl, cudaStream_t stream) {
  using namespace neoxfuse;
  using namespace neoxfuse::fused_decoder;
  if (shape == nullptr || layer == nullptr || plan == nullptr) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  if (int status = check_shape(*shape)) return status;
  if (!valid_plan(*shape, *plan)) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  const neoxfuse_fused_layer& t = *layer;
  const std::initializer_list<const void*> pointers = {
      t.x,        t.ln1_weight,   t.ln1_bias,     t.ln2_weight,    t.ln2_bias,    t.qkv_weight, t.qkv_bias,
      t.dense_weight, t.dense_bias, t.fc_in_weight, t.fc_in_bias, t.fc_out_weight, t.fc_out_bias, t.k_cache,
      t.v_cache,  t.position,     t.attn,         t.mlp,           t.y};
  if (any_null(pointers) || static_cast<const void*>(t.x) == static_cast<const void*>(t.y)) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (!all_vec_aligned(pointers)) return NEOXFUSE_ERR_MISALIGNED;

  const neoxfuse_fused_grid &first = plan->attn_mlp_in, &second = plan->out_proj;
  const bool pdl = use_pdl != 0;
  return with_layer_kernel_types(*shape, [&](auto head_dim, auto type) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    using T = decltype(type);
    const LayerParams<T> params = {
        t.x,
        static_cast<const T*>(t.ln1_weight),
        static_cast<const T*>(t.ln1_bias),
        static_cast<const T*>(t.ln2_weight),
        static_cast<const T*>(t.ln2_bias),
        static_cast<const T*>(t.qkv_weight),
        static_cast<const T*>(t.qkv_bias),
        static_cast<const T*>(t.dense_weight),
        static_cast<const T*>(t.dense_bias),
        static_cast<const T*>(t.fc_in_weight),
        static_cast<const T*>(t.fc_in_bias),
        static_cast<const T*>(t.fc_out_weight),
        static_cast<const T*>(t.fc_out_bias),
        static_cast<T*>(t.k_cache),
        static_cast<T*>(t.v_cache),
        t.position,
        t.attn,
        t.mlp,
        t.y,
        shape->hidden,
        shape->heads,
        shape->ffn,
        shape->max_seq,
        shape->rotary_dims,
        shape->eps,
        shape->rotary_base,
        1.0f / std::sqrt(static_cast<float>(shape->head_dim)),
    };
    const size_t attn_mlp_in_smem = AttnMlpInLayout<kHeadDim, T>::bytes(shape->hidden);
    const size_t out_proj_smem = OutProjLayout::bytes(shape->hidden, shape->ffn, second.cluster_size, second.clusters);
    if (int status = launch(attn_mlp_in_kernel<kHeadDim, T>, first.clusters * first.cluster_size, first.cluster_size,
                            attn_mlp_in_smem, pdl, stream, params)) {
      return status;
    }
    if (int status = launch(out_proj_kernel<T>, second.clusters * second.cluster_size, second.cluster_size, out_proj_smem,
                            pdl, stream, params)) {
      return status;
    }
    return NEOXFUSE_CHECK_LAUNCH();
  });
}

NEOXFUSE_API int neoxfuse_fused_lm_head(const float* x, const void* ln_weight, const void* ln_bias, const void* embed_out,
                                        int dtype, float* logits, int hidden, int vocab, float eps, int blocks,
                                        int use_pdl, cudaStream_t stream) {
  using namespace neoxfuse;
  using namespace neoxfuse::fused_decoder;
  if (any_null({x, ln_weight, ln_bias, embed_out, logits}) || hidden < 1 || vocab < 1 || !(eps > 0.0f) || blocks < 1) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (hidden % kChunkElems != 0 || hidden > kMaxHidden) return NEOXFUSE_ERR_UNSUPPORTED;
  if (!all_vec_aligned({x, ln_weight, ln_bias, embed_out, logits})) return NEOXFUSE_ERR_MISALIGNED;
  const size_t smem = sizeof(float) * static_cast<size_t>(hidden);  // <= 32 KiB: no opt-in needed
  return with_dtype(dtype, [&](auto type) {
    using T = decltype(type);
    if (int status = launch(lm_head_kernel<T>, blocks, /*cluster_size=*/0, smem, use_pdl != 0, stream, x,
                            static_cast<const T*>(ln_weight), static_cast<const T*>(ln_bias),
                            static_cast<const T*>(embed_out), logits, hidden, vocab, eps)) {
      return status;
    }
    return NEOXFUSE_CHECK_LAUNCH();
  });
}

NEOXFUSE_API int neoxfuse_fused_sample_token(const float* logits, int vocab, float temperature, int top_k, float top_p,
                                             int64_t* rng, int64_t* token, cudaStream_t stream) {
  using namespace neoxfuse;
  using namespace neoxfuse::fused_decoder;
  if (any_null({logits, rng, token}) || vocab < 1 || !(temperature > 0.0f && std::isfinite(temperature)) || top_k < 0 ||
      !(top_p > 0.0f && top_p <= 1.0f)) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (vocab > NEOXFUSE_FUSED_SAMPLE_MAX_VOCAB) return NEOXFUSE_ERR_UNSUPPORTED;
  if (int status = launch(sample_token_kernel, kSampleClusterSize, kSampleClusterSize, sizeof(SampleShared),
                          /*pdl=*/false, stream, logits, vocab, temperature, top_k, top_p, rng, token)) {
    return status;
  }
  return NEOXFUSE_CHECK_LAUNCH();
}
