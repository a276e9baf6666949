"""`cpu_emulated_library`: the kernels' C ABI built for the CPU, over tests/emulator/neoxemu.h.

The kernel sources are translated (tests/emulator/translate.py) into C++ under `<name>_gen/`,
then each translated .cu and the emulator's runtime are compiled by the host g++ and linked
into one shared library with the exported functions of libneoxfuse.so. Tests load it to run
the real kernel code on CPU tensors (tests/conftest.py: the `emulated` fixture).
"""

load("//bazel:cuda.bzl", "CUDA_PATH")

CXX_FLAGS = [
    "-std=c++17",
    "-O2",
    "-fno-strict-aliasing",  # kernels read vectors through other types (uint4 as __half2, ...), as CUDA code does
    "-fPIC",
    "-fvisibility=hidden",
    "-Wno-attributes",  # CUDA's headers annotate host functions with attributes g++ does not know
    "-fsanitize=alignment",  # a misaligned typed access fails the launch, as on the GPU (neoxemu.h)
]

def _cpu_emulated_library_impl(ctx):
    gen_dir = ctx.label.name + "_gen"
    include_root = "%s/%s" % (ctx.label.package, gen_dir)  # as the sources #include it, from the bin dir
    translated = []
    for src in ctx.files.srcs:
        path = src.short_path  # from the repository root: kernels/<family>/<file>, tests/emulator/<file>
        if path.endswith(".cu"):
            path = path[:-len(".cu")] + ".cc"
        translated.append(ctx.actions.declare_file("%s/%s" % (gen_dir, path)))
    out_dir = "%s/%s/%s" % (ctx.bin_dir.path, ctx.label.package, gen_dir)
    ctx.actions.run_shell(
        command = 'python3 "$@"',
        arguments = [ctx.file.translator.path, "--out", out_dir, "--include-root", include_root] +
                    [src.path for src in ctx.files.srcs],
        inputs = ctx.files.srcs + [ctx.file.translator],
        outputs = translated,
        mnemonic = "EmulatorTranslate",
        progress_message = "translating the kernels for the CPU emulator",
        use_default_shell_env = True,
    )

    headers = [f for f in translated if not f.path.endswith(".cc")] + ctx.files.runtime_hdrs
    objects = []
    for src in [f for f in translated if f.path.endswith(".cc")] + ctx.files.runtime_srcs:
        obj = ctx.actions.declare_file("%s_objs/%s.o" % (ctx.label.name, src.short_path.replace("/", "_")))
        ctx.actions.run_shell(
            command = 'g++ "$@"',
            arguments = CXX_FLAGS + ["-I.", "-I" + ctx.bin_dir.path, "-I" + CUDA_PATH + "/include", "-c", src.path, "-o", obj.path],
            inputs = [src] + headers,
            outputs = [obj],
            mnemonic = "EmulatorCompile",
            progress_message = "g++ %s (CPU emulator)" % src.short_path,
            use_default_shell_env = True,
        )
        objects.append(obj)

    library = ctx.actions.declare_file(ctx.label.name)
    ctx.actions.run_shell(
        command = 'g++ "$@"',
        arguments = ["-shared", "-fsanitize=alignment", "-o", library.path] + [o.path for o in objects] + ["-lpthread"],
        inputs = objects,
        outputs = [library],
        mnemonic = "EmulatorLink",
        progress_message = "linking %s" % library.short_path,
        use_default_shell_env = True,
    )
    return [DefaultInfo(files = depset([library]), runfiles = ctx.runfiles(files = [library]))]

cpu_emulated_library = rule(
    implementation = _cpu_emulated_library_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu", ".cuh", ".h"], doc = "every kernel source and header (and test kernels)"),
        "runtime_srcs": attr.label_list(allow_files = [".cc"]),
        "runtime_hdrs": attr.label_list(allow_files = [".h"]),
        "translator": attr.label(allow_single_file = [".py"]),
    },
)
