// cluster_test.cu — the cluster primitives of cluster.cuh on their own, for tests/test_cluster.py.
//
// One cluster of C blocks (256 threads each). Block r loads row r of `in` [C, n] into its shared
// memory, then runs every primitive and writes what it got:
//   sum[r, :]     = ClusterReduce<Sum> over all n      (all-reduce)
//   max[r, :]     = ClusterReduce<Max> over all n
//   gathered[r, :] = ClusterGather (block q contributes in[q, split_range(n, C, q)])
//   scattered[split_range(n, C, r)] = ClusterReduce<Sum> over block r's slice only (reduce-scatter)
// so a test can check every block's view against a sequential fold in rank order, bit for bit.
//
// C ABI (no header: only the tests call it):
//   int neoxfuse_cluster_test(const float* in, float* sum, float* max, float* gathered,
//                             float* scattered, int n, int cluster_size, cudaStream_t stream);
// in, sum, max, gathered: device [cluster_size, n] fp32; scattered: [n]. 1 <= n <= 4096,
// 1 <= cluster_size <= 8 (NEOXFUSE_ERR_INVALID_ARGUMENT otherwise).
#include "kernels/common/cluster.cuh"
#include "kernels/common/status.cuh"

namespace neoxfuse {
namespace {

constexpr int kTestThreads = 256;
constexpr int kTestMaxN = 4096;

__global__ void __launch_bounds__(kTestThreads)
    cluster_test_kernel(const float* __restrict__ in, float* __restrict__ sum, float* __restrict__ max,
                        float* __restrict__ gathered, float* __restrict__ scattered, int n) {
  extern __shared__ float shared[];
  float* mine = shared;        // [n] this block's row of `in`
  float* result = shared + n;  // [n] what a primitive hands this block
  const int rank = cluster_rank(), ranks = cluster_size();
  const size_t row = static_cast<size_t>(rank) * n;

  for (int i = threadIdx.x; i < n; i += blockDim.x) mine[i] = in[row + i];
  cluster_sync();

  auto copy_out = [&](float* dst, int begin, int end) {
    __syncthreads();
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) dst[i] = result[i];
    __syncthreads();
  };
  ClusterReduce<float, ClusterSum>{}(mine, result, 0, n);
  copy_out(sum + row, 0, n);
  ClusterReduce<float, ClusterMax>{}(mine, result, 0, n);
  copy_out(max + row, 0, n);
  ClusterGather<float>{}(mine, result, n);
  copy_out(gathered + row, 0, n);
  const IndexRange slice = split_range(n, ranks, rank);
  ClusterReduce<float, ClusterSum>{}(mine, result, slice.begin, slice.end);
  copy_out(scattered, slice.begin, slice.end);

  cluster_sync();  // no block leaves while another may still read its `mine`
}

}  // namespace
}  // namespace neoxfuse

NEOXFUSE_API int neoxfuse_cluster_test(const float* in, float* sum, float* max, float* gathered, float* scattered, int n,
                                       int cluster_size, cudaStream_t stream) {
  using namespace neoxfuse;
  if (in == nullptr || sum == nullptr || max == nullptr || gathered == nullptr || scattered == nullptr) {
    return NEOXFUSE_ERR_INVALID_ARGUMENT;
  }
  if (n < 1 || n > kTestMaxN || cluster_size < 1 || cluster_size > kMaxClusterSize) return NEOXFUSE_ERR_INVALID_ARGUMENT;

  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster_size);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(cluster_size));
  config.blockDim = dim3(kTestThreads);
  config.dynamicSmemBytes = 2 * sizeof(float) * static_cast<size_t>(n);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  if (int status = check_cuda(cudaLaunchKernelEx(&config, cluster_test_kernel, in, sum, max, gathered, scattered, n))) {
    return status;
  }
  return NEOXFUSE_CHECK_LAUNCH();
}
