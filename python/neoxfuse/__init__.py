"""neoxfuse: batch-1 decoding of GPT-NeoX models (the Pythia suite) at the speed of GPU memory.

Kernels live in one shared library with a C ABI (neoxfuse._lib); neoxfuse.ops exposes them
as torch custom ops; neoxfuse.reference is the fp32 oracle; neoxfuse.Engine decodes.
"""

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]


def __getattr__(name: str):
    # `import neoxfuse` stays light: the engine (torch, transformers) loads on first use.
    if name == "Engine":
        from neoxfuse.engine import Engine

        return Engine
    raise AttributeError(f"module 'neoxfuse' has no attribute {name!r}")
