# Provenance: reproduces the upfirdn2d and filtered-resizing semantics of the torch_utils ops
# shipped with EG3D (NVlabs/eg3d, commit 7cf1fd1, NVIDIA Source Code License, non-commercial). Our
# own implementation, written from the papers and the upstream's documented behaviour; no upstream
# code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""Antialiased resampling in plain PyTorch: FIR filtering with up/down-sampling (``upfirdn2d``)
and filtered resizing. Every op is a composition of differentiable torch ops, so double backward
(R1) works on every device."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def setup_filter(f: Sequence[float] | torch.Tensor = (1, 3, 3, 1), *, normalize: bool = True,
                 device=None) -> torch.Tensor:
    """A separable 1D kernel -> its normalised 2D outer product (fh, fw), float32."""
    f = torch.as_tensor(f, dtype=torch.float32, device=device)
    if f.ndim == 1:
        f = f.outer(f)
    if f.ndim != 2:
        raise ValueError(f"setup_filter: expected a 1D or 2D filter, got {tuple(f.shape)}")
    if normalize:
        f = f / f.sum()
    return f


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, *, up: int = 1, down: int = 1,
              padding: Sequence[int] = (0, 0, 0, 0), gain: float = 1.0,
              flip_filter: bool = False) -> torch.Tensor:
    """Upsample by zero insertion, pad, filter with ``f`` (true convolution unless
    ``flip_filter``), downsample by keeping every ``down``-th pixel.

    Args:
        x: (N, C, H, W).
        f: (fh, fw) filter.
        padding: (x0, x1, y0, y1); negative values crop.
    Returns:
        (N, C, (H*up + y0 + y1 - fh + 1) // down, (W*up + x0 + x1 - fw + 1) // down), rounded up.
    """
    N, C, H, W = x.shape
    if up > 1:
        x = x.reshape(N, C, H, 1, W, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(N, C, H * up, W * up)
    x0, x1, y0, y1 = padding
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0): x.shape[2] - max(-y1, 0), max(-x0, 0): x.shape[3] - max(-x1, 0)]
    f = (f * gain).to(x.dtype)
    if not flip_filter:
        f = f.flip([0, 1])
    w = f[None, None].expand(C, 1, *f.shape)
    x = F.conv2d(x, w, groups=C)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2, padding: int = 0,
               gain: float = 1.0) -> torch.Tensor:
    """x (N, C, H, W) -> (N, C, H*up, W*up), filtered by the 2-D FIR filter f (fh, fw) (gain
    ``up**2`` keeps the DC level)."""
    fh, fw = f.shape
    p = [padding + (fw + up - 1) // 2, padding + (fw - up) // 2,
         padding + (fh + up - 1) // 2, padding + (fh - up) // 2]
    return upfirdn2d(x, f, up=up, padding=p, gain=gain * up * up)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2, padding: int = 0,
                 gain: float = 1.0) -> torch.Tensor:
    """x (N, C, H, W) -> (N, C, H/down, W/down), low-pass filtered first by the 2-D FIR filter
    f (fh, fw)."""
    fh, fw = f.shape
    p = [padding + (fw - down + 1) // 2, padding + (fw - down) // 2,
         padding + (fh - down + 1) // 2, padding + (fh - down) // 2]
    return upfirdn2d(x, f, down=down, padding=p, gain=gain)


def filtered_resize(x: torch.Tensor, size: int | tuple[int, int],
                    antialias: bool = True) -> torch.Tensor:
    """Bilinear resize with an antialiasing filter when shrinking (EG3D ``filtered_resizing``).

    x: (N, C, H, W) -> (N, C, *size); ``size``: ``S`` or ``(H', W')``, positive integers."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected a tensor of shape (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    size = (size, size) if isinstance(size, numbers.Integral) else tuple(size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0
                             for s in size):
        raise ValueError(f"size: expected a positive integer or (H, W) of positive integers, got "
                         f"{size!r}")
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with std ``sigma`` pixels (EG3D's discriminator blur); identity for 0."""
    if sigma <= 0:
        return x
    r = int(3 * sigma + 0.5)
    k = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    f = setup_filter(k / k.sum(), device=x.device).to(x.dtype)     # symmetric: no flip needed
    # the conv's own zero padding (= upfirdn2d with padding r): no padded copy is kept for the
    # backward, which lowers a training step's peak memory
    C = x.shape[1]
    return F.conv2d(x, f[None, None].expand(C, 1, *f.shape), padding=r, groups=C)
