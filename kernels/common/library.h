/* library.h — what the shared library is and what it runs on: ABI version, build, devices. */
#pragma once

#include <stddef.h>

#include "kernels/common/status.h"

/* Bumped whenever an exported signature changes; Python refuses a library of another version. */
#define NEOXFUSE_ABI_VERSION 2

typedef struct {
  char name[256];
  int sm_major, sm_minor; /* compute capability */
  int multiprocessors;
  size_t total_memory_bytes;
  size_t l2_cache_bytes;
  int driver_version;  /* CUDA driver API version, e.g. 13000 */
  int runtime_version; /* the statically linked CUDA runtime's version */
} neoxfuse_device_info;

NEOXFUSE_API int neoxfuse_abi_version(void);

/* "abi=2 cuda=13.0 archs=sm_90a,sm_120,compute_120": what this library was built with. */
NEOXFUSE_API const char* neoxfuse_build_info(void);

/* The message of the last NEOXFUSE_ERR_CUDA on this thread ("" if none). */
NEOXFUSE_API const char* neoxfuse_last_error(void);

/* Number of CUDA devices the driver shows; NEOXFUSE_ERR_NO_DEVICE (count 0) with no driver. */
NEOXFUSE_API int neoxfuse_device_count(int* count);

NEOXFUSE_API int neoxfuse_get_device_info(int device, neoxfuse_device_info* info);
