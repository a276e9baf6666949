/* status.h — the status codes every neoxfuse C ABI function returns, and the export macro.
 *
 * Every exported function returns an int: NEOXFUSE_OK, or one of the codes below. On
 * NEOXFUSE_ERR_CUDA, neoxfuse_last_error() (library.h) holds CUDA's message. Python
 * (neoxfuse/_lib.py) turns a non-zero status into an exception that says what was wrong.
 */
#pragma once

#ifdef __cplusplus
#define NEOXFUSE_EXTERN_C extern "C"
#else
#define NEOXFUSE_EXTERN_C
#endif
#define NEOXFUSE_API NEOXFUSE_EXTERN_C __attribute__((visibility("default")))

enum neoxfuse_status {
  NEOXFUSE_OK = 0,
  NEOXFUSE_ERR_INVALID_ARGUMENT = 1, /* a null pointer, a size out of range */
  NEOXFUSE_ERR_MISALIGNED = 2,       /* a pointer or size off the kernel's vector width */
  NEOXFUSE_ERR_UNSUPPORTED = 3,      /* a shape or dtype the kernel was not built for */
  NEOXFUSE_ERR_CUDA = 4,             /* a CUDA call or launch failed; see neoxfuse_last_error() */
  NEOXFUSE_ERR_NO_DEVICE = 5,        /* no usable CUDA device or driver */
};
