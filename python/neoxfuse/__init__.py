"""neoxfuse: batch-1 decoding of GPT-NeoX models (the Pythia suite) at the speed of GPU memory.

Kernels live in one shared library with a C ABI (neoxfuse._lib); neoxfuse.ops exposes them
as torch custom ops; neoxfuse.reference is the fp32 oracle; neoxfuse.Engine decodes.
"""

__version__ = "0.1.0"
