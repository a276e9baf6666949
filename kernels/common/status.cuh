// status.cuh — host-side helpers for launchers: turn CUDA errors into neoxfuse status codes.
//
// A launcher checks its arguments, launches, then returns NEOXFUSE_CHECK_LAUNCH(): the
// launch error (if any) is recorded for neoxfuse_last_error() and NEOXFUSE_ERR_CUDA returned.
#pragma once

#include <cuda_runtime.h>

#include "kernels/common/status.h"

namespace neoxfuse {

// Records `err`'s message for neoxfuse_last_error(); returns the status to hand back.
int record_cuda_error(cudaError_t err);

inline int check_cuda(cudaError_t err) {
  return err == cudaSuccess ? NEOXFUSE_OK : record_cuda_error(err);
}

}  // namespace neoxfuse

#define NEOXFUSE_CHECK_LAUNCH() ::neoxfuse::check_cuda(cudaGetLastError())
