// fused_decoder.cu — the fused decoder's C ABI: argument checks, the launch plan, the launches.
//
// The kernels are in fused_decoder.cuh (what they compute and how work is split). Here: every
// argument is checked before anything is launched; the plan picks the cluster size C (the
// largest <= 8 whose heads * C blocks fit the SMs in one wave, all clusters co-resident);
// launches go through cudaLaunchKernelEx with the cluster dimension and, when asked, the
// programmatic-stream-serialization attribute (PDL).
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

int check_shape(const neoxfuse_fused_shape& s) {
  if (s.heads < 1 || s.hidden < 1 || s.ffn < 1 || s.max_seq < 1 || s.rotary_dims < 0 || !(s.eps > 0.0f) ||
      !(s.rotary_base > 0.0f)) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  const bool supported = (s.head_dim == 64 || s.head_dim == 80 || s.head_dim == 96 || s.head_dim == 128 ||
                          s.head_dim == 256) &&
                         s.hidden == s.heads * s.head_dim &&
                         s.hidden % kChunkElems == 0 && s.hidden <= kMaxHidden && s.ffn % kChunkElems == 0 &&
                         s.rotary_dims % 2 == 0 && s.rotary_dims <= s.head_dim;
  return supported ? NEOXFUSE_OK : NEOXFUSE_ERR_UNSUPPORTED;
}

// f(std::integral_constant<int, head_dim>) for the head dims the kernels are built for.
template <typename F>
int with_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 80:
      return f(std::integral_constant<int, 80>{});
    case 96:
      return f(std::integral_constant<int, 96>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    case 256:
      return f(std::integral_constant<int, 256>{});
    default:
      return NEOXFUSE_ERR_UNSUPPORTED;
  }
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

  return with_head_dim(shape->head_dim, [&](auto head_dim) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    const auto attn_mlp_in = attn_mlp_in_kernel<kHeadDim>;
    size_t attn_mlp_in_limit = 0, out_proj_limit = 0;
    if (int status = raise_dynamic_smem_limit(reinterpret_cast<const void*>(attn_mlp_in), smem_optin, &attn_mlp_in_limit)) {
      return status;
    }
    if (int status = raise_dynamic_smem_limit(reinterpret_cast<const void*>(out_proj_kernel), smem_optin, &out_proj_limit)) {
      return status;
    }
    const size_t attn_mlp_in_smem = AttnMlpInLayout<kHeadDim>::bytes(shape->hidden);
    if (attn_mlp_in_smem > attn_mlp_in_limit) return static_cast<int>(NEOXFUSE_ERR_UNSUPPORTED);

    const bool forced = cluster_size > 0;
    for (int size = forced ? cluster_size : kMaxClusterSize; size >= 1; --size) {
      const size_t out_proj_smem = OutProjLayout::bytes(shape->hidden, shape->ffn, size, shape->heads);
      if (out_proj_smem > out_proj_limit) {
        if (forced) return static_cast<int>(NEOXFUSE_ERR_UNSUPPORTED);
        continue;
      }
      cudaLaunchAttribute attrs[2];
      const cudaLaunchConfig_t config =
          launch_config(shape->heads * size, attn_mlp_in_smem, nullptr, attrs, size, /*pdl=*/false);
      int active = 0;
      const cudaError_t occupancy = cudaOccupancyMaxActiveClusters(&active, attn_mlp_in, &config);
      if (occupancy != cudaSuccess) {
        if (forced) return check_cuda(occupancy);
        (void)cudaGetLastError();  // this size cannot run here; try a smaller one
        continue;
      }
      const bool one_wave = shape->heads * size <= sms && active >= shape->heads;
      if (!forced && size > 1 && !one_wave) continue;
      plan->cluster_size = size;
      plan->clusters = shape->heads;
      plan->max_active_clusters = active;
      plan->attn_mlp_in_smem = static_cast<int>(attn_mlp_in_smem);
      plan->out_proj_smem = static_cast<int>(out_proj_smem);
      return static_cast<int>(NEOXFUSE_OK);
    }
    return static_cast<int>(NEOXFUSE_ERR_UNSUPPORTED);
  });
}

NEOXFUSE_API int neoxfuse_fused_decoder_layer(const neoxfuse_fused_shape* shape, const neoxfuse_fused_layer* layer,
                                              const neoxfuse_fused_plan* plan, int use_pdl, cudaStream_t stream) {
  using namespace neoxfuse;
  using namespace neoxfuse::fused_decoder;
  if (shape == nullptr || layer == nullptr || plan == nullptr) return NEOXFUSE_ERR_INVALID_ARGUMENT;
  if (int status = check_shape(*shape)) return status;
  if (plan->cluster_size < 1 || plan->cluster_size > kMaxClusterSize || plan->clusters != shape->heads) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  const neoxfuse_fused_layer& t = *layer;
  const std::initializer_list<const void*> pointers = {
      t.x,        t.ln1_weight,   t.ln1_bias,     t.ln2_weight,    t.ln2_bias,    t.qkv_weight, t.qkv_bias,
      t.dense_weight, t.dense_bias, t.fc_in_weight, t.fc_in_bias, t.fc_out_weight, t.fc_out_bias, t.k_cache,
      t.v_cache,  t.position,     t.attn,         t.mlp,           t.y};
  if (any_null(pointers) || static_cast<const void*>(t.x) == static_cast<const void*>(t.y)) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (!all_vec_aligned(pointers)) return NEOXFUSE_ERR_MISALIGNED;

  const LayerParams params = {
      t.x,
      static_cast<const __half*>(t.ln1_weight),
      static_cast<const __half*>(t.ln1_bias),
      static_cast<const __half*>(t.ln2_weight),
      static_cast<const __half*>(t.ln2_bias),
      static_cast<const __half*>(t.qkv_weight),
      static_cast<const __half*>(t.qkv_bias),
      static_cast<const __half*>(t.dense_weight),
      static_cast<const __half*>(t.dense_bias),
      static_cast<const __half*>(t.fc_in_weight),
      static_cast<const __half*>(t.fc_in_bias),
      static_cast<const __half*>(t.fc_out_weight),
      static_cast<const __half*>(t.fc_out_bias),
      static_cast<__half*>(t.k_cache),
      static_cast<__half*>(t.v_cache),
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
  const int size = plan->cluster_size, blocks = shape->heads * size;
  const bool pdl = use_pdl != 0;
  return with_head_dim(shape->head_dim, [&](auto head_dim) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    const size_t attn_mlp_in_smem = AttnMlpInLayout<kHeadDim>::bytes(shape->hidden);
    const size_t out_proj_smem = OutProjLayout::bytes(shape->hidden, shape->ffn, size, shape->heads);
    if (int status = launch(attn_mlp_in_kernel<kHeadDim>, blocks, size, attn_mlp_in_smem, pdl, stream, params)) {
      return status;
    }
    if (int status = launch(out_proj_kernel, blocks, size, out_proj_smem, pdl, stream, params)) return status;
    return NEOXFUSE_CHECK_LAUNCH();
  });
}

NEOXFUSE_API int neoxfuse_fused_lm_head(const float* x, const void* ln_weight, const void* ln_bias, const void* embed_out,
                                        float* logits, int hidden, int vocab, float eps, int blocks, int use_pdl,
                                        cudaStream_t stream) {
  using namespace neoxfuse;
  using namespace neoxfuse::fused_decoder;
  if (any_null({x, ln_weight, ln_bias, embed_out, logits}) || hidden < 1 || vocab < 1 || !(eps > 0.0f) || blocks < 1) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (hidden % kChunkElems != 0 || hidden > kMaxHidden) return NEOXFUSE_ERR_UNSUPPORTED;
  if (!all_vec_aligned({x, ln_weight, ln_bias, embed_out, logits})) return NEOXFUSE_ERR_MISALIGNED;
  const size_t smem = sizeof(float) * static_cast<size_t>(hidden);  // <= 32 KiB: no opt-in needed
  if (int status = launch(lm_head_kernel, blocks, /*cluster_size=*/0, smem, use_pdl != 0, stream, x,
                          static_cast<const __half*>(ln_weight), static_cast<const __half*>(ln_bias),
                          static_cast<const __half*>(embed_out), logits, hidden, vocab, eps)) {
    return status;
  }
  return NEOXFUSE_CHECK_LAUNCH();
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
