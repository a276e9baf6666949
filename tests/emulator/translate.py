"""Turns kernel sources (.cu, .cuh, .h under kernels/) into C++ for the CPU emulator (neoxemu.h).

    translate.py --out DIR --include-root ROOT FILE...   writes DIR/<FILE>, with .cu renamed .cc

FILE paths are relative to the repository root, as the sources #include each other.

The rewrites, each the smallest that makes CUDA source plain C++ over neoxemu.h:
  #include "kernels/X"              -> #include "<DIR as included>/kernels/X"   (the translated copy)
  #include <cooperative_groups.h>, <cuda_runtime.h>  -> neoxemu.h
  extern __shared__ [__align__(N)] T name[];  -> T* const name = ::neoxemu::dynamic_shared<T>();
  __shared__ T name[dims];         -> thread_local T name[dims]; ::neoxemu::fresh_static_shared(&name, sizeof(name));
  asm volatile("ptx" : operands);  -> ::neoxemu::ptx("ptx");
  kernel<<<grid, block[, smem[, stream]]>>>(args)  -> ::neoxemu::launch(kernel, grid, block, ...)(args)
and every .cu starts by including neoxemu.h. A construct not rewritten (another asm form, a
`<<<` not matched) fails here, not later in a confusing compile error.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

EMULATOR_HEADER = "tests/emulator/neoxemu.h"

_KERNEL_INCLUDE = re.compile(r'#include "(kernels/[^"]+)"')
_RUNTIME_INCLUDE = re.compile(r"#include <(cooperative_groups|cuda_runtime)\.h>")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:]*(?:\s+[A-Za-z_]\w*)*?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+([A-Za-z_][\w:]*(?:\s+[A-Za-z_]\w*)*?)\s+(\w+)((?:\s*\[[^\]]+\])*)\s*;")
_ASM = re.compile(r'asm\s+volatile\s*\(\s*"([^"]*)"[^;]*\)\s*;')
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;<>]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def translate(text: str, include_root: str, is_source: bool) -> str:
    text = _KERNEL_INCLUDE.sub(lambda m: f'#include "{include_root}/{m.group(1)}"', text)
    text = _RUNTIME_INCLUDE.sub(f'#include "{EMULATOR_HEADER}"', text)
    text = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)}* const {m.group(2)} = ::neoxemu::dynamic_shared<{m.group(1)}>();", text)
    text = _STATIC_SHARED.sub(
        lambda m: f"thread_local {m.group(1)} {m.group(2)}{m.group(3)}; ::neoxemu::fresh_static_shared(&{m.group(2)}, sizeof({m.group(2)}));",
        text,
    )
    text = _ASM.sub(lambda m: f'::neoxemu::ptx("{m.group(1)}");', text)
    text = _LAUNCH.sub(lambda m: f"::neoxemu::launch({m.group(1)}, {m.group(2)})(", text)
    code = _without_comments(text)
    for construct, pattern in (("asm", r"\basm\b"), ("<<<", "<<<"), ("__shared__", r"__shared__")):
        if re.search(pattern, code):
            raise ValueError(f"`{construct}` left untranslated")
    if is_source:
        text = f'#include "{EMULATOR_HEADER}"\n' + text
    return text


def _without_comments(text: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--include-root", required=True, help="how sources #include the output directory")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.files:
        is_source = path.suffix == ".cu"
        target = args.out / (path.with_suffix(".cc") if is_source else path)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.write_text(translate(path.read_text(), args.include_root, is_source))
        except ValueError as err:
            print(f"translate.py: {path}: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
