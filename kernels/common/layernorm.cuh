// layernorm.cuh — LayerNorm statistics in fp32 of a row spread over a group of threads, and the
// normalisation of one element.
//
//   mean = sum(h) / n,   var = sum((h - mean)^2) / n   (biased),   rstd = 1 / sqrt(var + eps)
//   y    = (h - mean) * rstd * weight + bias
//
// Two passes over values the threads already hold in registers: the second sums squared
// deviations from the exact mean, so it does not cancel the way E[h^2] - E[h]^2 does when
// |mean| >> std. The caller supplies the reduction over its group of threads (a warp, a block, a
// cluster), so kernels of every family share this one definition of LayerNorm.
#pragma once

namespace neoxfuse {

struct LayerNormStats {
  float mean;
  float rstd;  // 1 / sqrt(var + eps)
};

// values: this thread's N slots of the row; in_row(i): whether slot i holds a row element (false
// for slots past the row's end, whatever they hold). n: elements in the whole row.
// group_sum(v): the sum of v over every thread holding part of the row, returned to each of them;
// called twice in a row by every thread of the group.
template <int N, typename InRow, typename GroupSum>
__device__ __forceinline__ LayerNormStats layernorm_stats(const float (&values)[N], InRow in_row, int n, float eps,
                                                          GroupSum&& group_sum) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) sum += in_row(i) ? values[i] : 0.0f;
  const float mean = group_sum(sum) / static_cast<float>(n);

  float squared_deviations = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float deviation = values[i] - mean;
    squared_deviations += in_row(i) ? deviation * deviation : 0.0f;
  }
  const float var = group_sum(squared_deviations) / static_cast<float>(n);
  return {mean, rsqrtf(var + eps)};
}

__device__ __forceinline__ float layernorm_apply(float value, LayerNormStats stats, float weight, float bias) {
  return (value - stats.mean) * stats.rstd * weight + bias;
}

}  // namespace neoxfuse
