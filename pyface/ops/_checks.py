"""Argument checks shared by every public op.

Errors name the argument, what was expected and what was given, e.g.::

    ValueError: planes: expected shape (B, 3, C, H, W), got (2, 4, 32, 64, 64): dim 1 must be 3
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
import torch.autograd.forward_ad as fwAD


def _fmt(shape: Iterable) -> str:
    shape = tuple(shape)
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


#: largest tri-plane height / width, every backend and entry point alike: texel coordinates are
#: float32 in the kernels (exact integers up to 2^24; the CPU kernel's 32-bit texel indices
#: overflowed at 2^31)
MAX_PLANE_SIZE = 2**24


def check_plane_size(planes, name: str = "planes") -> None:
    """ValueError unless ``planes`` (B, 3, C, H, W) has H, W <= :data:`MAX_PLANE_SIZE` (an
    expanded, stride-0 plane can be that wide without memory): the one check of
    ``triplane_sample``, ``render_triplane`` and the registered ops' fake and Triton kernels."""
    if len(planes.shape) == 5 and max(planes.shape[3:]) > MAX_PLANE_SIZE:
        raise ValueError(f"{name}: expected H, W <= 2^24 = {MAX_PLANE_SIZE} (texel coordinates "
                         f"are computed in float32), got shape {_fmt(planes.shape)}")


#: the floating dtypes the ops take
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ShapeChecker:
    """Checks tensors against symbolic shape specs and binds named dims across arguments.

    >>> chk = ShapeChecker()
    >>> chk.tensor("planes", planes, "B 3 C H W")      # binds B, C, H, W
    >>> chk.tensor("points", points, "B N 3")           # B must match planes
    >>> chk.dims["N"]

    A spec is space separated: integers are literal sizes, names bind (the first tensor that
    uses a name fixes it), ``*`` matches any size.
    """

    def __init__(self) -> None:
        self.dims: dict[str, int] = {}
        self._bound_by: dict[str, str] = {}
        self.device: torch.device | None = None
        self._device_of: str | None = None

    def tensor(self, name: str, t, spec: str, *, floating: bool = True,
               dtypes: tuple[torch.dtype, ...] | None = None, same_device: bool = True) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape ({', '.join(spec.split())}),"
                            f" got {type(t).__name__}")
        parts = spec.split()
        doc = "(" + ", ".join(parts) + ")"
        if t.dim() != len(parts):
            raise ValueError(f"{name}: expected shape {doc} ({len(parts)} dims), got "
                             f"{_fmt(t.shape)} ({t.dim()} dims)")
        for i, (p, s) in enumerate(zip(parts, t.shape)):
            if p == "*":
                continue
            if p.lstrip("-").isdigit():
                if s != int(p):
                    raise ValueError(f"{name}: expected shape {doc}, got {_fmt(t.shape)}: "
                                     f"dim {i} must be {p}")
            elif p in self.dims:
                if s != self.dims[p]:
                    raise ValueError(
                        f"{name}: expected shape {doc}, got {_fmt(t.shape)}: {p} = {s} does not "
                        f"match {p} = {self.dims[p]} of {self._bound_by[p]}")
            else:
                self.dims[p] = int(s)
                self._bound_by[p] = name
        if dtypes is not None:
            if t.dtype not in dtypes:
                raise TypeError(f"{name}: expected dtype in "
                                f"{[str(d).replace('torch.', '') for d in dtypes]}, got "
                                f"{str(t.dtype).replace('torch.', '')}")
        elif floating and not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype "
                            f"{str(t.dtype).replace('torch.', '')}")
        elif floating and t.dtype not in FLOAT_DTYPES:
            # (float8 and the other exotic floating dtypes: no kernel, reference or compiled,
            # computes in them; the ops answered with torch's "not implemented for" errors)
            raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got "
                            f"{str(t.dtype).replace('torch.', '')}")
        if same_device:
            if self.device is None:
                self.device, self._device_of = t.device, name
            elif t.device != self.device:
                raise ValueError(f"{name}: expected a tensor on {self.device} (the device of "
                                 f"{self._device_of}), got {t.device}")


def check_choice(name: str, value, choices: Iterable) -> None:
    """ValueError ``NAME: expected one of (CHOICES), got VALUE`` unless ``value`` is one of
    ``choices`` (made a tuple: the message shows it as one whatever iterable was given)."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def is_finite(value) -> bool:
    """``math.isfinite`` in comparisons (False for NaN and +-inf), so that ``torch.compile``
    traces it without a graph break when the number is symbolic (under ``dynamic=True`` a
    float argument, e.g. an op's default ``box_size``, is traced as a ``SymFloat``, which
    ``math.isfinite`` cannot take)."""
    return -math.inf < value < math.inf


def has_values(*tensors) -> bool:
    """Whether the checks of tensor values (finite cameras, indices in range) can run on
    ``tensors``: False for a tensor without data (a fake tensor of
    ``torch._subclasses.FakeTensorMode``, a tensor on the meta device) and inside an active
    FakeTensorMode (where even a real tensor's reductions are fake); such checks are skipped
    there, as the shape checks still run. Under ``torch.compile`` they run (a graph break: the
    compiled code checks the values as eager code does)."""
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not any(isinstance(t, torch.Tensor) and (t.is_meta or is_fake(t)) for t in tensors)


def is_number(value, *, integer: bool = False) -> bool:
    """Whether ``value`` is a real number (``integer``: an integer) that an op's number argument
    takes: a Python int / float or a NumPy scalar of that kind (``np.float32(0.5)`` from a
    config), not a bool. (The Python types are tested first: under ``torch.compile`` a traced
    ``SymFloat`` / ``SymInt`` passes as float / int.)"""
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int) or isinstance(value, numbers.Integral)
    return isinstance(value, (int, float)) or isinstance(value, numbers.Real)


def check_finite(name: str, value) -> None:
    """``value`` is a finite real number (int, float or a NumPy scalar; not a bool): a
    TypeError for anything else, a ValueError for NaN and +-inf."""
    if not is_number(value):
        raise TypeError(f"{name}: expected a finite number, got {value!r}")
    if not is_finite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


def check_positive(name: str, value, *, integer: bool = False) -> None:
    """``value`` is a positive int (``integer``) or a positive finite number (NaN and inf are
    refused here, as the C++ entry points refuse them, so every backend answers alike)."""
    if not is_number(value, integer=integer) or not value > 0 or (
            not integer and not is_finite(value)):
        what = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name}: expected {what}, got {value!r}")


_GRAD = torch._C._functorch.TransformType.Grad


def check_autodiff_mode(op: str, backend: str, *tensors) -> None:
    """Refuses, with an error naming the op, the autodiff modes that a compiled backend
    (``cpu`` / ``cuda`` / ``triton``) cannot serve and that would otherwise go wrong:

    * forward-mode AD (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``): the
      fused kernels have no forward derivative, and torch would silently drop the tangent (a
      zero Jacobian-vector product);
    * ``torch.func.grad`` / ``vjp`` / ``jacrev`` / ``hessian`` with respect to an input of the
      op: torch's autograd of a custom op is not a ``torch.func`` transform (torch's own error
      does not name the op). An op on constants of the differentiated function runs.

    ``torch.func.vmap`` works (one op call per batch element) and ``torch.autograd.grad`` is the
    reverse mode to use; the ``reference`` backend supports whatever its PyTorch ops support.
    Skipped under ``torch.compile`` (dynamo would not trace the checks).
    """
    if torch.compiler.is_compiling():
        return
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if fwAD._current_level >= 0 and any(fwAD.unpack_dual(t).tangent is not None
                                        for t in tensors):
        what = "forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad)"
    elif torch._C._functorch.peek_interpreter_stack() is not None and any(
            t.requires_grad and torch._C._functorch.is_functorch_wrapped_tensor(t)
            for t in tensors) and any(
            i.key() == _GRAD for i in torch._C._functorch.get_interpreter_stack()):
        # (a tensor that a transform merely lifted, a constant of the differentiated function,
        # does not require grad: the op then runs as a constant, which is right)
        what = "torch.func.grad / vjp / jacrev / hessian"
    else:
        return
    raise RuntimeError(
        f"pyface.ops.{op}: {what} is not supported by the {backend!r} backend (its fused "
        f"kernels have a reverse-mode backward only); use torch.autograd.grad, or "
        f"backend='reference' (pure PyTorch)")
