"""`py_wheel`: a wheel of a Python package plus native libraries, built without rules_python.

The wheel holds the package's .py files (paths taken relative to `strip_prefix`), each
native library under <package>/lib/, and dist-info METADATA, WHEEL, entry_points.txt and
RECORD written by bazel/make_wheel.py.
"""

def _py_wheel_impl(ctx):
    out = ctx.actions.declare_file("%s-%s-py3-none-%s.whl" % (ctx.attr.distribution, ctx.attr.version, ctx.attr.platform))
    args = ctx.actions.args()
    args.add("--out", out)
    args.add("--distribution", ctx.attr.distribution)
    args.add("--version", ctx.attr.version)
    args.add("--platform", ctx.attr.platform)
    args.add("--summary", ctx.attr.summary)
    args.add("--package", ctx.attr.package)
    args.add("--strip-prefix", ctx.attr.strip_prefix)
    args.add_all(ctx.attr.requires, before_each = "--requires")
    args.add_all(["%s=%s" % kv for kv in ctx.attr.console_scripts.items()], before_each = "--console-script")
    args.add_all(ctx.files.native_libs, before_each = "--native-lib")
    args.add_all(ctx.files.srcs, before_each = "--src")
    ctx.actions.run(
        executable = ctx.executable._make_wheel,
        arguments = [args],
        inputs = ctx.files.srcs + ctx.files.native_libs,
        outputs = [out],
        mnemonic = "PyWheel",
        progress_message = "Packing %s" % out.short_path,
    )
    return [DefaultInfo(files = depset([out]), runfiles = ctx.runfiles(files = [out]))]

py_wheel = rule(
    implementation = _py_wheel_impl,
    attrs = {
        "distribution": attr.string(mandatory = True),
        "version": attr.string(mandatory = True),
        "platform": attr.string(mandatory = True, doc = "platform tag, e.g. manylinux_2_34_x86_64"),
        "summary": attr.string(),
        "package": attr.string(mandatory = True, doc = "import name; native libraries go to <package>/lib/"),
        "strip_prefix": attr.string(mandatory = True, doc = "path prefix removed from srcs"),
        "srcs": attr.label_list(allow_files = [".py", ".typed"]),
        "native_libs": attr.label_list(allow_files = [".so"]),
        "requires": attr.string_list(),
        "console_scripts": attr.string_dict(),
        "_make_wheel": attr.label(default = "//bazel:make_wheel", executable = True, cfg = "host"),
    },
)
