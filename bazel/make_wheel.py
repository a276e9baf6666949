"""Writes a wheel (PEP 427): the files given, plus dist-info METADATA, WHEEL, entry_points.txt, RECORD."""

import argparse
import base64
import hashlib
import zipfile

# A fixed timestamp keeps the wheel byte-for-byte reproducible.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--distribution", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--platform", required=True)
    p.add_argument("--summary", default="")
    p.add_argument("--package", required=True)
    p.add_argument("--strip-prefix", required=True)
    p.add_argument("--requires", action="append", default=[])
    p.add_argument("--console-script", action="append", default=[])
    p.add_argument("--native-lib", action="append", default=[])
    p.add_argument("--src", action="append", default=[])
    a = p.parse_args()

    files: dict[str, bytes] = {}
    prefix = a.strip_prefix.rstrip("/") + "/"
    for src in a.src:
        rel = src[src.index(prefix) + len(prefix) :]
        files[rel] = open(src, "rb").read()
    for lib in a.native_lib:
        files[f"{a.package}/lib/{lib.rsplit('/', 1)[-1]}"] = open(lib, "rb").read()

    dist_info = f"{a.distribution}-{a.version}.dist-info"
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {a.distribution}",
        f"Version: {a.version}",
        f"Summary: {a.summary}",
        "Requires-Python: >=3.10",
    ] + [f"Requires-Dist: {r}" for r in a.requires]
    files[f"{dist_info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    wheel = ["Wheel-Version: 1.0", "Generator: neoxfuse bazel/make_wheel.py", "Root-Is-Purelib: false", f"Tag: py3-none-{a.platform}"]
    files[f"{dist_info}/WHEEL"] = ("\n".join(wheel) + "\n").encode()
    if a.console_script:
        scripts = "[console_scripts]\n" + "".join(f"{s.replace('=', ' = ', 1)}\n" for s in a.console_script)
        files[f"{dist_info}/entry_points.txt"] = scripts.encode()

    record = [_record_line(name, data) for name, data in sorted(files.items())]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()

    with zipfile.ZipFile(a.out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(files.items()):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            zf.writestr(info, data)


if __name__ == "__main__":
    main()
