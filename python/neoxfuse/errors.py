"""The exceptions neoxfuse raises. Each says what was wrong and, where it can, what to do."""


class NeoxfuseError(Exception):
    """Base of every neoxfuse error."""


class LibraryNotFoundError(NeoxfuseError, RuntimeError):
    """The shared library libneoxfuse.so is missing, of another ABI version, or does not load."""


class NoGPUError(NeoxfuseError, RuntimeError):
    """A CUDA device is needed and none is usable (no GPU, no driver, or a CPU build of torch)."""


class UnsupportedDeviceError(NeoxfuseError, RuntimeError):
    """A GPU the kernels cannot run on: the library holds no code for its arch, or it lacks what a kernel needs."""


class KernelError(NeoxfuseError, RuntimeError):
    """A kernel call returned a non-zero status."""

    def __init__(self, function: str, status: int, message: str):
        super().__init__(f"{function} failed: {message}")
        self.function = function
        self.status = status


class InvalidInputError(NeoxfuseError, ValueError):
    """A tensor or argument of the wrong dtype, shape, device, layout or range."""


class CheckpointNotFoundError(InvalidInputError, FileNotFoundError):
    """A checkpoint directory, its config.json, or its weight files are missing."""


class SequenceTooLongError(InvalidInputError):
    """A position past the KV cache's capacity."""




class UnknownModelError(NeoxfuseError, ValueError):
    """A model name neoxfuse does not know."""


class UnsupportedModelError(NeoxfuseError, ValueError):
    """A checkpoint or model that is not GPT-NeoX, or of sizes a kernel was not built for."""
