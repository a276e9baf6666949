/* copy_probe.h — device-to-device copy at full memory bandwidth: the project's floor.
 *
 * Benchmarks state every figure against bytes / the copy rate this kernel reaches in the
 * same run (read + write bytes per second). Python: neoxfuse.device.copy_bandwidth().
 */
#pragma once

#include <stddef.h>

#include "kernels/common/status.h"

typedef struct CUstream_st* cudaStream_t;

/* dst[0:bytes] = src[0:bytes] on `stream`. dst and src: device pointers, 16-byte aligned,
 * not overlapping. NEOXFUSE_ERR_MISALIGNED if a pointer is off 16 bytes. */
NEOXFUSE_API int neoxfuse_device_copy(void* dst, const void* src, size_t bytes, cudaStream_t stream);
