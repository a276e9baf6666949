/* dtype.h — how a C ABI call names the element type of its tensors. */
#pragma once

enum neoxfuse_dtype {
  NEOXFUSE_FP32 = 0,
  NEOXFUSE_FP16 = 1,
  NEOXFUSE_BF16 = 2,
};
