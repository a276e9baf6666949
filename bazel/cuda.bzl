"""`cuda_library`: CUDA sources compiled by the local nvcc into a cc_library.

Each .cu file becomes one position-independent object holding machine code for every
architecture in CUDA_GENCODE (and PTX for the newest, so later GPUs can JIT it); the
objects feed a `cc_library(alwayslink = 1)`, so they link into the project's one shared
library. The toolkit is found at CUDA_PATH (WORKSPACE exposes its headers and the static
runtime as @cuda).
"""

CUDA_PATH = "/usr/local/cuda"

# The one architecture list of the project: (virtual arch, real arch or PTX).
CUDA_GENCODE = [
    ("compute_90a", "sm_90a"),  # H100 / H200: Hopper, with wgmma / TMA / setmaxnreg
    ("compute_120", "sm_120"),  # RTX 5090: consumer Blackwell
    ("compute_120", "compute_120"),  # PTX, JIT-compiled by drivers of newer GPUs
]

NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-Xcompiler=-fPIC",
    "-Xcompiler=-fvisibility=hidden",
    "-Werror=all-warnings",
]

def _gencode_flags():
    return ["-gencode=arch=%s,code=%s" % pair for pair in CUDA_GENCODE]

def _arch_names():
    return ",".join([code for _, code in CUDA_GENCODE])

def _cuda_objects_impl(ctx):
    headers = depset(
        ctx.files.hdrs,
        transitive = [dep[CcInfo].compilation_context.headers for dep in ctx.attr.deps],
    )
    objects = []
    for src in ctx.files.srcs:
        obj = ctx.actions.declare_file("_cuda_objs/%s/%s.pic.o" % (ctx.label.name, src.basename[:-len(".cu")]))
        args = ctx.actions.args()
        args.add_all(NVCC_FLAGS)
        args.add_all(_gencode_flags())
        args.add("-DNEOXFUSE_CUDA_ARCHS=\"%s\"" % _arch_names())
        args.add_all(ctx.attr.copts)
        args.add("-I.")
        args.add("-I" + ctx.bin_dir.path)
        args.add_all(["-c", src.path, "-o", obj.path])
        ctx.actions.run(
            executable = CUDA_PATH + "/bin/nvcc",
            arguments = [args],
            inputs = depset([src], transitive = [headers]),
            outputs = [obj],
            mnemonic = "NvccCompile",
            progress_message = "nvcc %s (%s)" % (src.short_path, _arch_names()),
            use_default_shell_env = True,
        )
        objects.append(obj)
    return [DefaultInfo(files = depset(objects))]

_cuda_objects = rule(
    implementation = _cuda_objects_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu"]),
        "hdrs": attr.label_list(allow_files = [".h", ".cuh"]),
        "deps": attr.label_list(providers = [CcInfo]),
        "copts": attr.string_list(),
    },
)

def cuda_library(name, srcs, hdrs = [], deps = [], copts = [], visibility = None):
    """One kernel family: its .cu sources compiled for CUDA_GENCODE, as a cc_library.

    Args:
      name: the cc_library's name.
      srcs: .cu files, each compiled to one object.
      hdrs: the family's headers (.h for the C ABI, .cuh for device code).
      deps: other cuda_library / cc_library targets whose headers the sources include.
      copts: extra nvcc flags.
      visibility: as usual.

    Also defines `<name>_sources`, the family's sources and headers as they are (for
    tests/emulator, which runs the kernels on the CPU).
    """
    _cuda_objects(
        name = name + "_objects",
        srcs = srcs,
        hdrs = hdrs,
        deps = deps,
        copts = copts,
    )
    native.cc_library(
        name = name,
        srcs = [":" + name + "_objects"],
        hdrs = hdrs,
        deps = deps + ["@cuda//:cudart_static"],
        alwayslink = 1,
        visibility = visibility,
    )
    native.filegroup(
        name = name + "_sources",
        srcs = srcs + hdrs,
        visibility = visibility,
    )
