"""Syntax-checks the torch/CUDA glue files (csrc/**/*_cuda.cpp) on a machine whose torch is a
CPU build.

The glue is compiled for real only against a CUDA build of torch. A CPU torch wheel ships the c10
CUDA headers except one CMake-generated configuration header (c10/cuda/impl/cuda_cmake_macros.h),
so this script provides that one-line header in a temporary folder and runs
``g++ -fsyntax-only`` over every glue file with torch's and the CUDA toolkit's include paths.
Exit status 1 if any file fails.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig
import tempfile


def main() -> int:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "csrc", "**", "*_cuda.cpp"), recursive=True))
    cuda_home = CUDA_HOME or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if not os.path.isdir(os.path.join(cuda_home, "include")):
        print(f"check_cuda_glue: no CUDA toolkit headers under {cuda_home}; skipped")
        return 0
    with tempfile.TemporaryDirectory() as stub:
        os.makedirs(os.path.join(stub, "c10", "cuda", "impl"))
        with open(os.path.join(stub, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags = ["-std=c++20", "-fsyntax-only", "-DPYFACE_WITH_CUDA=1", f"-I{stub}",
                 f"-I{os.path.join(root, 'csrc')}", f"-I{os.path.join(cuda_home, 'include')}",
                 f"-I{sysconfig.get_paths()['include']}"]
        flags += [f"-I{p}" for p in include_paths()]
        failed = 0
        for path in files:
            rel = os.path.relpath(path, root)
            proc = subprocess.run(["g++", *flags, path], capture_output=True, text=True)
            errors = [line for line in proc.stderr.splitlines() if "error" in line]
            if proc.returncode != 0:
                failed += 1
                print(f"FAIL {rel}\n{proc.stderr}")
            else:
                print(f"ok   {rel}" + (f" ({len(errors)} error lines)" if errors else ""))
    print(f"check_cuda_glue: {len(files) - failed}/{len(files)} glue files compile "
          f"(torch {torch.__version__}, CUDA headers {cuda_home})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
