"""Backend discovery and selection.

Backends of an op, in the order the layering goes:

* ``reference`` - pure PyTorch twin shipped in the package (``pyface.ops.reference``); always there.
* ``cpu``       - C++/OpenMP kernels in the compiled extension ``pyface._C``.
* ``cuda``      - CUDA kernels in ``pyface._C`` (only in a build against a CUDA torch with nvcc).
* ``triton``    - Triton kernels (``pyface.kernels``); CUDA tensors, or CPU tensors when
                  ``TRITON_INTERPRET=1`` (the Triton interpreter, for tests).

Which backend an op takes by default is data: the table in :mod:`pyface._opspecs`; this module
only applies it (:func:`select_backend`, the one function that chooses).

Nothing here runs at ``import pyface``: the extension and Triton load on first use, and every
failure is kept as a readable reason that ``python -m pyface.info`` prints.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import threading
import warnings
from types import ModuleType

import torch

from pyface._ops import triton_interpret
from pyface._opspecs import BACKENDS, DEFAULTS, FAMILIES, OPS, Default, OpSpec

__all__ = ["BACKENDS", "OpSpec", "Default", "BackendUnavailableError", "PyfaceFallbackWarning",
           "build_config", "extension", "extension_reason", "load_library",
           "has_compiled_kernel", "triton_interpret", "triton_version", "triton_available",
           "registered_ops", "default_order", "backend_status", "select_backend"]

log = logging.getLogger("pyface")
_lock = threading.RLock()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class PyfaceFallbackWarning(UserWarning):
    """An op runs on the slow reference backend because no compiled backend is available."""


# --------------------------------------------------------------------------------------------
# Build metadata and the compiled extension
# --------------------------------------------------------------------------------------------

def build_config() -> dict | None:
    """What ``pip install`` built (torch/CUDA versions, archs, backends), or None if not built."""
    path = os.path.join(os.path.dirname(__file__), "_build_config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _load_extension() -> tuple[ModuleType | None, str]:
    cfg = build_config()
    if cfg is not None and cfg.get("torch") != torch.__version__:
        return None, (f"pyface._C was built against torch {cfg.get('torch')} but torch "
                      f"{torch.__version__} is installed; rebuild with "
                      "`pip install -e . --no-build-isolation`")
    try:
        module = importlib.import_module("pyface._C")
    except ImportError as exc:
        return None, (f"pyface._C is not built or failed to load ({exc}); build it with "
                      "`pip install -e . --no-build-isolation`")
    _register_compiled_ops()
    return module, "loaded"


def extension() -> ModuleType | None:
    """The compiled extension (loading it on first call), or None."""
    with _lock:
        return _load_extension()[0]


def extension_reason() -> str:
    with _lock:
        return _load_extension()[1]


def _register_compiled_ops() -> None:
    """Register fake kernels, autograd and autocast for the C++ ops of every family."""
    for family in FAMILIES:
        importlib.import_module(f"pyface._ops.{family}").register_cpp()


def load_library() -> ModuleType:
    """Load ``pyface._C`` and register its ``torch.ops.pyface.*`` ops (fake kernels, autograd,
    autocast); idempotent. Raises :class:`BackendUnavailableError` with the reason when the
    extension is not built or does not load."""
    module = extension()
    if module is None:
        raise BackendUnavailableError(f"pyface._C cannot be loaded: {extension_reason()}")
    return module


def has_compiled_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``torch.ops.pyface.<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if extension() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyface::{op}", dispatch_key)


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _triton_import() -> tuple[str | None, str]:
    try:
        triton = importlib.import_module("triton")
    except ImportError as exc:
        return None, f"triton is not installed ({exc}); `pip install triton`"
    return triton.__version__, "importable"


def triton_version() -> str | None:
    return _triton_import()[0]


def triton_available(device_type: str) -> tuple[bool, str]:
    version, reason = _triton_import()
    if version is None:
        return False, reason
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, f"triton {version}"
    if device_type == "cpu":
        if triton_interpret():
            return True, f"triton {version} interpreter (TRITON_INTERPRET=1)"
        return False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (for tests)"
    return False, f"Triton kernels do not support device type {device_type!r}"


# --------------------------------------------------------------------------------------------
# Op table and selection
# --------------------------------------------------------------------------------------------

_warned: set[tuple[str, str]] = set()


def registered_ops() -> dict[str, OpSpec]:
    """Every public op's spec (the table in :mod:`pyface._opspecs`; independent of imports)."""
    return dict(OPS)


def default_order(op: str, device_type: str) -> Default:
    """The default backend order of ``op`` on ``device_type`` and why (``pyface._opspecs``)."""
    return DEFAULTS[op].get(device_type, Default(("reference",), "no compiled backend for "
                                                                 f"{device_type} tensors"))


def backend_status(spec: OpSpec, backend: str, device_type: str) -> tuple[bool, str]:
    """Whether ``backend`` can run ``spec`` on ``device_type``, with the reason."""
    if backend not in spec.backends:
        return False, f"{spec.name} has no {backend!r} backend"
    if backend == "reference":
        return True, "pure PyTorch"
    if backend == "cpu":
        if device_type != "cpu":
            return False, "C++ CPU kernels take CPU tensors"
        if extension() is None:
            return False, extension_reason()
        if spec.compiled_op and not has_compiled_kernel(spec.compiled_op, "CPU"):
            return False, f"pyface._C has no CPU kernel for {spec.compiled_op}"
        return True, "pyface._C (C++/OpenMP)"
    if backend == "cuda":
        if device_type != "cuda":
            return False, "CUDA kernels take CUDA tensors"
        if extension() is None:
            return False, extension_reason()
        cfg = build_config() or {}
        if not cfg.get("with_cuda"):
            return False, f"pyface._C was built without CUDA: {cfg.get('cuda_reason', 'unknown')}"
        if spec.compiled_op and not has_compiled_kernel(spec.compiled_op, "CUDA"):
            return False, f"pyface._C has no CUDA kernel for {spec.compiled_op}"
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, f"pyface._C (CUDA, archs {cfg.get('cuda_archs')})"
    if backend == "triton":
        return triton_available(device_type)
    return False, f"unknown backend {backend!r}"


def _dtype_status(spec: OpSpec, backend: str, dtype: torch.dtype | None) -> tuple[bool, str]:
    allowed = spec.dtypes.get(backend)
    if dtype is None or allowed is None or dtype in allowed:
        return True, ""
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    return False, f"supports {names}, not {str(dtype).replace('torch.', '')}"


#: backend forced on every op by ``pyface.ops.use_backend`` (process-wide; None: not forced)
_forced: str | None = None
#: the open ``use_backend`` blocks, (token, name) in the order they were entered; ``_forced``
#: is the name of the last one
_forcing: list[tuple[object, str | None]] = []


def select_backend(op: str, device: torch.device, backend: str | None,
                   dtype: torch.dtype | None = None) -> str:
    """Pick the backend that runs ``op`` on ``device``: the one function that decides.

    An explicit ``backend`` is honoured or raises. ``None`` takes the backend forced by
    ``pyface.ops.use_backend`` or the ``PYFACE_BACKEND`` environment variable (honoured or raises
    like an explicit one), else the first available backend of the op's default order
    (``pyface._opspecs.DEFAULTS``); under ``torch.use_deterministic_algorithms(True)`` backends
    whose backward uses atomics are skipped (as torchvision falls back to its deterministic
    path). A fall back to ``reference`` past an available-in-principle compiled backend is
    announced once per op and device. The choice depends only on the arguments, the
    installation, the forced backend and the deterministic flag, so ``torch.compile`` evaluates
    it once while tracing and treats it as a constant; the forced backend is read here, in
    traced code, so that a compiled function guards on it (and recompiles inside a
    ``use_backend`` block instead of running the backend it was traced with), as torch guards
    on the deterministic flag.
    """
    if backend is None:
        backend = _forced or os.environ.get("PYFACE_BACKEND") or None
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"PYFACE_BACKEND: expected one of {BACKENDS}, got {backend!r}")
    return _select(op, device, backend, dtype)


@torch.compiler.assume_constant_result
def _select(op: str, device: torch.device, backend: str | None,
            dtype: torch.dtype | None) -> str:
    """:func:`select_backend` once the forced backend (if any) is in ``backend``."""
    spec = OPS[op]
    device_type = device.type
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
        ok, reason = backend_status(spec, backend, device_type)
        if ok:
            ok, reason = _dtype_status(spec, backend, dtype)
        if not ok:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} cannot run on {device_type} tensors: {reason}")
        return backend
    deterministic = torch.are_deterministic_algorithms_enabled()
    reasons = []
    for b in default_order(op, device_type).order:
        if deterministic and b in spec.atomic_backward:
            continue
        ok, reason = backend_status(spec, b, device_type)
        if ok:
            ok, reason = _dtype_status(spec, b, dtype)
        if ok:
            if b == "reference" and reasons:
                _announce_fallback(op, device_type, reasons)
            return b
        reasons.append(f"{b}: {reason}")
    _announce_fallback(op, device_type, reasons)
    return "reference"


def _announce_fallback(op: str, device_type: str, reasons: list[str]) -> None:
    key = (op, device_type)
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    msg = (f"pyface.ops.{op} on {device_type} tensors falls back to the (slower) PyTorch reference "
           f"because no compiled backend is available: " + "; ".join(reasons)
           + ". Run `python -m pyface.info` for details.")
    log.warning(msg)
    warnings.warn(msg, PyfaceFallbackWarning, stacklevel=3)
