"""Op registration layer: torch.library custom ops for the C++ kernels (fake kernels, autograd,
autocast) and ``torch.library.triton_op`` wrappers for the Triton kernels.

``pyface._backend`` calls ``register_cpp()`` of every family listed in
``pyface._opspecs.FAMILIES`` once, when ``pyface._C`` loads. Nothing here imports
``pyface._backend`` or ``pyface.ops`` (imports go one way). Models never import this package:
they use ``pyface.ops``.
"""
from __future__ import annotations

import functools
import os
import threading
import warnings

import torch


def triton_interpret() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``, tests)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def define_once(define):
    """Memoizes ``define`` (no arguments; defines ``torch.library`` ops and returns them) so
    that it runs once per process, also when several threads make their first call at once
    (``nn.DataParallel``, a thread pool): a second definition of an op raises. Later calls
    return the first result without taking the lock, a lookup that ``torch.compile`` traces
    (dynamo ignores ``functools.lru_cache`` and would trace into the definition itself); the
    definition runs outside the graph (a first eager call, or a graph break without
    ``fullgraph``)."""
    lock = threading.Lock()
    result: list = []

    @torch.compiler.disable
    def _define_locked():
        with lock:
            if not result:
                result.append(define())

    @functools.wraps(define)
    def get():
        if not result:
            _define_locked()
        return result[0]

    return get


def register_autocast_float32(op: str) -> None:
    """Autocast rule of an op whose kernels compute in float32 / float64 only (torchvision's
    rule for roi_align): under ``torch.autocast`` its float16 / bfloat16 inputs are cast to
    float32 (float64 stays), and it returns float32."""
    for device_type in ("cpu", "cuda"):
        torch.library.register_autocast(op, device_type, torch.float32)


def alert_nondeterministic(what: str, alternative: str) -> None:
    """torch's rule for a kernel that accumulates with atomics, called where it runs (the
    backward): an error under ``torch.use_deterministic_algorithms(True)``, a warning with
    ``warn_only=True``, nothing otherwise."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{what} accumulates with atomics and has no deterministic implementation, but "
           f"torch.use_deterministic_algorithms(True) is set; use {alternative} (deterministic), "
           f"or backend=None, which picks it under deterministic mode")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(msg)


def fused_backward(op: str, *, atomics: tuple[str, ...] = (), triton: bool = False):
    """Decorates the backward of a fused op (``register_autograd``):

    * where the kernel that runs accumulates with atomics (``atomics``: ``"cuda"`` for the CUDA
      kernels, ``"triton"`` for the Triton ones), it alerts under deterministic mode
      (:func:`alert_nondeterministic`), as torch's and torchvision's kernels do;
    * its gradients cannot be differentiated again: under ``create_graph=True`` they are marked
      so that a second differentiation raises an error naming the op (instead of the silent
      zeros of an op without an autograd kernel).
    """
    def deco(backward):
        @functools.wraps(backward)
        def wrapped(ctx, *grads):
            tensors = [g for g in grads if isinstance(g, torch.Tensor)]
            path = "triton" if triton else (tensors[0].device.type if tensors else "cpu")
            if path in atomics:
                alert_nondeterministic(f"pyface.ops.{op} backward ({path} backend)",
                                       "backend='reference' (or backend='cpu' on CPU tensors)")
            if not torch.is_grad_enabled():
                return backward(ctx, *grads)
            # the saved tensors are unpacked once, here, and handed to ``backward`` through
            # ``_SavedOnce``: a second ``ctx.saved_tensors`` raises inside a
            # ``torch.utils.checkpoint`` region (render_triplane's recompute=True chunks)
            saved = ctx.saved_tensors
            deps = [t for t in (*saved, *tensors) if t is not None and t.requires_grad]
            with torch.no_grad():
                out = backward(_SavedOnce(ctx, saved), *grads)
            if not deps:
                return out
            single = not isinstance(out, tuple)
            out = tuple(_DoubleBackwardGuard.apply(f"{op} ({path} backend)", o, *deps)
                        if isinstance(o, torch.Tensor) else o
                        for o in ((out,) if single else out))
            return out[0] if single else out
        return wrapped
    return deco


class _SavedOnce:
    """``ctx`` of an autograd backward whose ``saved_tensors`` were already unpacked: every
    other attribute is the context's own."""

    def __init__(self, ctx, saved: tuple) -> None:
        self._ctx = ctx
        self.saved_tensors = saved

    def __getattr__(self, name):
        return getattr(self._ctx, name)


class _DoubleBackwardGuard(torch.autograd.Function):
    """Identity on ``x`` that depends on ``deps``; its backward raises: marks gradients computed
    by a kernel that has no derivative of its own."""

    @staticmethod
    def forward(ctx, name, x, *deps):
        ctx.name = name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"pyface.ops.{ctx.name}: double backward is not supported (the backward is a fused "
            f"kernel without a derivative of its own); use backend='reference' for gradients "
            f"of gradients, e.g. an R1 penalty through this op")
