"""neoxfuse's kernels as torch.library custom ops (namespace `neoxfuse`), one module per family.

Each op checks its arguments (neoxfuse.checks), calls the C ABI through neoxfuse._lib on the
current CUDA stream, and has a fake implementation so torch.compile and CUDA graphs see it.
Importing a module registers its ops: `import neoxfuse.ops.copy` -> torch.ops.neoxfuse.device_copy.
"""
