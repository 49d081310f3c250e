"""Testing helpers shipped with pyface: the central dtype -> tolerance table and comparisons of
an op against its reference, forward and backward with random cotangents."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# (rtol, atol) for comparing a kernel with its reference, by the dtype of the compared tensors.
# float32: summation-order differences of fused kernels (atomics, different accumulation order)
# stay within a few ulps of the magnitudes involved; float16/bfloat16: half of one ulp at 1.0
# plus accumulated rounding of the low-precision output. An op may override an entry, next to
# the test, with the reason.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol * scale, "atol": atol * scale}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 scale: float = 1.0, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: actual's)."""
    tol = tolerance(dtype or actual.dtype, scale)
    torch.testing.assert_close(actual, expected.to(actual.dtype), equal_nan=True,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None, **tol)


def grads(fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
          cotangents: Sequence[torch.Tensor] | None = None, *, seed: int = 0):
    """Runs ``fn(*inputs)`` and returns (outputs, gradients of <outputs, cotangents>).

    Cotangents are drawn from N(0, 1) with ``seed`` when not given. Inputs that do not require
    grad get ``None``.
    """
    outs = fn(*inputs)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    diff = [o for o in outs if o.requires_grad]
    if cotangents is None:
        gen = torch.Generator().manual_seed(seed)
        cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o)
                      for o in diff]
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    g = torch.autograd.grad(diff, wrt, cotangents, allow_unused=True) if diff and wrt else ()
    it = iter(g)
    out_grads = [next(it) if isinstance(x, torch.Tensor) and x.requires_grad else None
                 for x in inputs]
    return outs, out_grads, cotangents


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 120.0) -> None:
    """Run the Python file ``script`` (with ``args``) on ``nproc`` local CPU processes through
    ``torch.distributed.run --standalone`` (one thread each) and fail with the tail of its
    output unless every rank exits 0. For tests of code that behaves differently under
    torchrun (all-reduced statistics, collectives)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", str(script), *map(str, args)],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
