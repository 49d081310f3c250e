"""Build script for pyface.

The C++/CUDA extension ``pyface._C`` is compiled ahead of time against the torch that is already
installed, so install with::

    pip install -e . --no-build-isolation

Environment switches (all optional):

* ``PYFACE_BUILD_NO_CUDA=1``  build the CPU kernels only, even if CUDA is available.
* ``FORCE_CUDA=1``            fail unless the CUDA kernels are built (no silent CPU-only build).
* ``TORCH_CUDA_ARCH_LIST``    e.g. ``"8.0;9.0"``; default: the local GPU, else ``8.0;9.0``.
* ``PYFACE_DEBUG=1``          ``-O0 -g`` host code and ``-G`` device code.
* ``NVCC_FLAGS``              extra nvcc flags, space separated.
* ``MAX_JOBS``                parallel compile jobs; default derived from cores and free memory.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only on a misconfigured machine
    sys.exit(
        "pyface: torch must be installed before building pyface, and the build must see it.\n"
        "  pip install torch\n"
        "  pip install -e . --no-build-isolation\n"
        "(build isolation hides the installed torch from setup.py)"
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _banner(lines: list[str]) -> None:
    width = max(len(line) for line in lines) + 4
    print("*" * width, file=sys.stderr)
    for line in lines:
        print(f"* {line.ljust(width - 4)} *", file=sys.stderr)
    print("*" * width, file=sys.stderr)


def cuda_decision() -> tuple[bool, str]:
    """Decide whether the CUDA kernels are built. Returns (build_cuda, reason)."""
    force = _env_flag("FORCE_CUDA")
    if _env_flag("PYFACE_BUILD_NO_CUDA"):
        if force:
            sys.exit("pyface: PYFACE_BUILD_NO_CUDA=1 and FORCE_CUDA=1 contradict each other")
        return False, "PYFACE_BUILD_NO_CUDA=1 was set"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
        if force:
            sys.exit(f"pyface: FORCE_CUDA=1 but {reason}; install a CUDA build of torch")
        return False, reason
    if CUDA_HOME is None:
        reason = "nvcc / CUDA_HOME was not found"
        if force:
            sys.exit(f"pyface: FORCE_CUDA=1 but {reason}; set CUDA_HOME")
        return False, reason
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def cuda_archs() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:
        return archs
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}.{minor}"
    else:
        archs = "8.0;9.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch.utils.cpp_extension
    return archs


def max_jobs() -> None:
    """Bound parallel compile jobs by cores and free memory (about 2 GB per nvcc job)."""
    if "MAX_JOBS" in os.environ:
        return
    jobs = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        jobs = max(1, min(jobs, info.get("MemAvailable", 0) // (2 * 1024 * 1024)))
    except (OSError, ValueError):
        pass
    os.environ["MAX_JOBS"] = str(jobs)


def build_params() -> dict:
    """Everything the extension build depends on, computed in one place."""
    with_cuda, reason = cuda_decision()
    debug = _env_flag("PYFACE_DEBUG")
    csrc = os.path.join(ROOT, "csrc")
    cpp = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    # *_cuda.cpp files are torch glue for the CUDA kernels; csrc/tests holds standalone C++ tests.
    glue = [p for p in cpp if p.endswith("_cuda.cpp")]
    cpp = [p for p in cpp if p not in glue and os.sep + "tests" + os.sep not in p]
    cu = sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
    sources = cpp + (glue + cu if with_cuda else [])
    cxx = ["-fopenmp", "-fvisibility=hidden"]  # the C++ standard is the one torch requires
    cxx += ["-O0", "-g"] if debug else ["-O3"]
    nvcc = ["--expt-relaxed-constexpr", "-lineinfo"]
    nvcc += ["-O0", "-G"] if debug else ["-O3"]
    nvcc += os.environ.get("NVCC_FLAGS", "").split()
    macros = [("PYFACE_WITH_CUDA", "1")] if with_cuda else []
    return {
        "with_cuda": with_cuda,
        "cuda_reason": reason,
        "archs": cuda_archs() if with_cuda else None,
        "sources": [os.path.relpath(s, ROOT) for s in sources],
        "cxx": cxx,
        "nvcc": nvcc,
        "macros": macros,
        "debug": debug,
    }


PARAMS = build_params()


class PyfaceBuildExtension(BuildExtension):
    """Ninja build that records what was built into ``pyface/_build_config.json``."""

    def run(self):
        max_jobs()
        if PARAMS["with_cuda"]:
            _banner([f"pyface: building CPU + CUDA kernels for archs {PARAMS['archs']}",
                     PARAMS["cuda_reason"]])
        else:
            _banner(["pyface: building the CPU (C++/OpenMP) kernels ONLY - no CUDA kernels",
                     f"reason: {PARAMS['cuda_reason']}",
                     "CUDA tensors will use the Triton or reference backends (see `pyface info`)."])
        super().run()
        config = {
            "version": VERSION,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "with_cuda": PARAMS["with_cuda"],
            "cuda_reason": PARAMS["cuda_reason"],
            "cuda_archs": PARAMS["archs"],
            "openmp": True,
            "debug": PARAMS["debug"],
            "backends": ["cpu", "cuda"] if PARAMS["with_cuda"] else ["cpu"],
        }
        targets = {os.path.join(ROOT, "pyface")}
        if not self.inplace:
            targets.add(os.path.join(self.build_lib, "pyface"))
        for target in targets:
            if os.path.isdir(target):
                with open(os.path.join(target, "_build_config.json"), "w") as f:
                    json.dump(config, f, indent=2)


def extension():
    kwargs = dict(
        name="pyface._C",
        sources=PARAMS["sources"],
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=PARAMS["macros"],
        extra_link_args=["-fopenmp"],
    )
    if PARAMS["with_cuda"]:
        return CUDAExtension(extra_compile_args={"cxx": PARAMS["cxx"], "nvcc": PARAMS["nvcc"]},
                             **kwargs)
    return CppExtension(extra_compile_args={"cxx": PARAMS["cxx"]}, **kwargs)


packages = find_packages(include=["pyface", "pyface.*"]) + ["pyface.kernels"]

setup(
    name="pyface-engine",
    version=VERSION,
    description="Fused Triton/CUDA kernels and trainable 3D-aware portrait-animation models",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(
        os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",   # pyface's own code; see LICENSE and README "Licence and provenance"
    python_requires=">=3.10",
    packages=packages,
    # The repository folder kernels/ (Triton) is installed as pyface.kernels, never as `kernels`.
    package_dir={"pyface.kernels": "kernels"},
    package_data={"pyface": ["_build_config.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": PyfaceBuildExtension.with_options(use_ninja=True)},
    install_requires=[
        "torch>=2.5",
        "numpy",
        "safetensors",
        "tqdm",
        "pyyaml",
        "scipy",   # pyface.face: built-in head model construction, BFM .mat loader
        "pillow",  # pyface.data: PNG frames
    ],
    extras_require={
        "triton": ["triton==3.6.0"],
        "train": ["tensorboard", "imageio", "imageio-ffmpeg", "pillow"],
        # lpips / pytorch-fid: reference packages the metric tests compare against; torchvision
        # pinned to the release built for torch 2.13 (CI's torch) so pip does not replace torch.
        "test": ["pytest", "pytest-benchmark", "triton==3.6.0", "scipy", "scikit-image", "lpips",
                 "pytorch-fid", "torchvision==0.28.*"],
        # `pyface data prepare`: PyAV (decoder) and MediaPipe 0.10.21, the last release whose
        # wheel ships the legacy face-mesh / face-detection / selfie-segmentation models (runs
        # offline). It pins numpy<2 and protobuf<5; tensorboard 2.20's generated code needs
        # protobuf>=5.26 (google.protobuf.runtime_version), so with this extra tensorboard stays
        # below 2.20 (2.19.0 works with protobuf 4.25).
        # CI installs it into a virtualenv of its own, so the rest of the suite keeps numpy 2.
        # PyAV 14.1 added VideoFrame.rotation (portrait phone videos are decoded sideways
        # without it).
        "prepare": ["mediapipe==0.10.21", "av>=14.1", "tensorboard<2.20"],
    },
    entry_points={"console_scripts": ["pyface=pyface.cli:main"]},
)
