"""The op table: every public op, its backends and the default backend per device type.

Data only. This module imports nothing from pyface, so ``pyface._backend``, ``pyface.ops``,
``pyface.info`` and the bench read the same table whatever has been imported before.

Default-backend policy (one rule for every family):

* A compiled backend becomes a default on a device type only after its ``gpu`` / CPU tests have
  passed on that device. ``DEFAULTS[op][device]`` lists the order and ``why`` records the
  evidence (or its absence).
* CPU: the C++ kernels run in every CPU test run (``tests/test_<family>.py``), so ``cpu`` leads.
* CUDA: no pyface kernel (CUDA or Triton) has run on a GPU yet; the CUDA kernels are
  compile-checked and the Triton kernels run only in the interpreter. So every CUDA default is
  the reference, and the kernels are opt-in with ``backend="cuda"`` / ``backend="triton"``.
  To promote one: run ``pytest -m gpu tests/test_<family>.py`` on the GPU, then put the backend
  first in the op's ``cuda`` order and write the GPU, date and command into ``why``.
"""
from __future__ import annotations

import dataclasses

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Modules ``pyface._ops.<family>`` that register fake kernels / autograd for the C++ ops
# (``register_cpp()``), called once when ``pyface._C`` loads.
FAMILIES = ("triplane", "raster", "render", "warp")


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """How an op can run.

    Attributes:
        name: public name (``pyface.ops.<name>``).
        family: the op family (``pyface/ops/<family>.py``, ``pyface/_ops/<family>.py``).
        backends: the backends implemented for this op.
        compiled_op: the ``torch.ops.pyface`` op the ``cpu`` / ``cuda`` backends run (its kernel
            for the dispatch key tells whether the build has that backend).
        dtypes: per backend, the input dtypes it supports (absent: every floating dtype).
        atomic_backward: backends whose backward accumulates with atomics (not deterministic):
            skipped by the default choice under ``torch.use_deterministic_algorithms(True)``, and
            their backward raises there when chosen explicitly.
        note: how the kernels work (shown by ``pyface info``; no numbers: those come from the
            bench JSON, see ``bench``).
        bench: (shape, provider) of the bench row ``pyface info`` quotes: the forward median of
            the compiled CPU path at that shape, read from the newest JSON in bench/results/.
    """

    name: str
    family: str
    backends: tuple[str, ...]
    compiled_op: str | None = None
    dtypes: dict[str, tuple[torch.dtype, ...]] = dataclasses.field(default_factory=dict)
    atomic_backward: tuple[str, ...] = ()
    note: str = ""
    bench: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class Default:
    """The default order of backends of an op on one device type, and why it is that order."""

    order: tuple[str, ...]
    why: str


_F32_64 = (torch.float32, torch.float64)
_LOW = (torch.float32, torch.float16, torch.bfloat16)
_ALL = ("reference", "cpu", "cuda", "triton")
_COMPILED = ("reference", "cpu", "cuda")

_WARP_NOTE = ("CPU: C++ (fused, channels-last slabs). CUDA kernels and Triton kernels (tested "
              "under the Triton interpreter) are opt-in until their gpu tests pass on a GPU.")

OPS: dict[str, OpSpec] = {s.name: s for s in (
    OpSpec("triplane_sample", "triplane", _ALL, "triplane_sample",
           dtypes={"triton": _LOW}, atomic_backward=("cuda", "triton"),
           note="Fused forward and backward (3 planes x 4 taps per point); the CPU backward "
                "accumulates the plane gradient in disjoint (batch, plane, channel-range) slices "
                "(no atomics, deterministic).",
           bench=("eg3d", "cpu")),
    OpSpec("rasterize_mesh", "raster", _COMPILED, "raster_mesh", atomic_backward=("cuda",),
           note="CPU: tiled z-buffer. CUDA: one thread per face, 64-bit atomicMin on packed "
                "depth|face, then a resolve pass.",
           bench=("head512", "cpu")),
    OpSpec("splat_points", "raster", _COMPILED, "splat_points_index", atomic_backward=("cuda",),
           note="CPU: row-band z-buffer. CUDA: 64-bit atomicMin on packed depth|index + resolve.",
           bench=("small", "cpu")),
    OpSpec("points_to_triplane", "raster", _COMPILED, "points_to_triplane_index",
           atomic_backward=("cuda",),
           note="Uniform-grid binning + outward column search with per-column envelopes and "
                "early exit, O(N + H W) memory (the reference is GOHA's brute force).",
           bench=("128", "cpu")),
    OpSpec("mip_composite", "render", _COMPILED, "mip_composite", dtypes={"cpu": _F32_64,
                                                                         "cuda": _F32_64},
           note="One pass per ray; the backward recomputes the transmittance in forward order "
                "(no cumprod stored).",
           bench=("eg3d64", "cpu")),
    OpSpec("sample_importance", "render", _COMPILED, "sample_importance",
           dtypes={"cpu": _F32_64, "cuda": _F32_64},
           note="One pass per ray (smoothing, cdf, branch-free search); no gradient, as EG3D.",
           bench=("eg3d64", "cpu")),
    OpSpec("render_triplane", "render", _ALL, "mip_composite",
           dtypes={"cpu": _F32_64, "cuda": _F32_64, "triton": (torch.float32,)},
           atomic_backward=("cuda", "triton"),
           note="cpu/cuda: the compiled ops over ray chunks, recomputed in the backward. triton: "
                "one fused kernel per ray (OSG decoder weights only).",
           bench=("eg3d64", "fused")),
    *(OpSpec(name, "warp", _ALL, name, dtypes={"triton": _LOW},
             atomic_backward=("cuda", "triton"), note=_WARP_NOTE,
             bench=(shape, "cpu"))
      for name, shape in (("warp_volume", "B4"), ("keypoint_flow", "B4-K15"),
                          ("warp_by_keypoints", "B4-K15"),
                          ("motion_field_input", "B4-K15-C4"))),
)}

_CPU_WHY = "C++ kernels tested on CPU in every test run ({test})"
_CUDA_WHY = ("the {what} have not run on a GPU yet (no passed `pytest -m gpu {test}`); "
             "opt in with {opt}")

_TESTS = {"triplane": "tests/test_triplane.py", "raster": "tests/test_raster_*.py",
          "render": "tests/test_render.py", "warp": "tests/test_warp*.py"}


def _cuda_default(spec: OpSpec) -> Default:
    gpu = [b for b in ("cuda", "triton") if b in spec.backends]
    what = " and ".join({"cuda": "CUDA kernels (compile-checked)",
                         "triton": "Triton kernels (interpreter-tested)"}[b] for b in gpu)
    opt = " or ".join(f"backend={b!r}" for b in gpu)
    return Default(("reference",), _CUDA_WHY.format(what=what, test=_TESTS[spec.family],
                                                    opt=opt))


# CUDA defaults backed by a passed GPU test run: op -> Default(order, "GPU, date, command").
# Empty: no pyface kernel has run on a GPU yet.
GPU_VERIFIED: dict[str, Default] = {}

DEFAULTS: dict[str, dict[str, Default]] = {
    name: {"cpu": Default(("cpu", "reference"), _CPU_WHY.format(test=_TESTS[spec.family])),
           "cuda": GPU_VERIFIED.get(name, _cuda_default(spec))}
    for name, spec in OPS.items()
}
