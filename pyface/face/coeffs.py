# Provenance: reproduces the 257-dim coefficient layout of Deep3DFaceRecon
# (sicxu/Deep3DFaceRecon_pytorch, MIT) and the 70-dim motion windows of OTAvatar
# (theEricMa/OTAvatar, commit c8c484f, CC BY-NC-SA 4.0). Our own implementation, written from the
# papers and the upstream's documented behaviour; no upstream code is copied. pyface's code is
# licensed under Apache-2.0 (LICENSE).
"""Deep3DFaceRecon 3DMM coefficient layout (257) and OTAvatar's 70-dim motion windows.

Layout of one 257-dim coefficient vector (BFM 2009 + expression basis, as Deep3DFaceRecon,
GOHA, OTAvatar and PIRenderer store it):

========  ===========  ====================================================================
slice     name         meaning
========  ===========  ====================================================================
0:80      ``id``       identity (shape) coefficients
80:144    ``exp``      expression coefficients
144:224   ``tex``      albedo (texture) coefficients
224:227   ``angles``   Euler angles (pitch, yaw, roll) in radians, see
                       :func:`pyface.face.cameras.euler_to_rotation`
227:254   ``gamma``    SH lighting, 27 = 3 colours (R, G, B) x 9 bands, colour-major
254:257   ``trans``    translation (BFM units)
========  ===========  ====================================================================

OTAvatar's motion vector is ``exp ‖ angles ‖ trans`` (70); its controller reads a window of 27
frames (radius 13) around the target frame, indices clamped at the video ends.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

COEFF_DIM = 257
LAYOUT: dict[str, slice] = {
    "id": slice(0, 80),
    "exp": slice(80, 144),
    "tex": slice(144, 224),
    "angles": slice(224, 227),
    "gamma": slice(227, 254),
    "trans": slice(254, 257),
}
ID_DIM, EXP_DIM, TEX_DIM, GAMMA_DIM = 80, 64, 80, 27
MOTION_DIM = 70
MOTION_WINDOW = 27
MOTION_RADIUS = (MOTION_WINDOW - 1) // 2


def _check_last(name: str, x: torch.Tensor, n: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (..., {n}), got {type(x).__name__}")
    if x.shape[-1:] != (n,):
        raise ValueError(f"{name}: expected shape (..., {n}), got {tuple(x.shape)}")


@dataclass
class Coeffs:
    """A split coefficient vector; every field has shape ``(..., n)`` with the sizes of
    :data:`LAYOUT`. ``Coeffs.split(x)`` / ``c.merge()`` convert from/to ``(..., 257)``."""

    id: torch.Tensor
    exp: torch.Tensor
    tex: torch.Tensor
    angles: torch.Tensor
    gamma: torch.Tensor
    trans: torch.Tensor

    @classmethod
    def split(cls, coeffs: torch.Tensor) -> "Coeffs":
        return cls(**split_coeffs(coeffs))

    def merge(self) -> torch.Tensor:
        return merge_coeffs(**self.__dict__)

    @classmethod
    def zeros(cls, *batch: int, dtype=None, device=None) -> "Coeffs":
        return cls.split(torch.zeros(*batch, COEFF_DIM, dtype=dtype, device=device))


def split_coeffs(coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``coeffs: (..., 257)`` -> dict of views ``id (..., 80)``, ``exp (..., 64)``,
    ``tex (..., 80)``, ``angles (..., 3)``, ``gamma (..., 27)``, ``trans (..., 3)``."""
    _check_last("coeffs", coeffs, COEFF_DIM)
    return {k: coeffs[..., s] for k, s in LAYOUT.items()}


def merge_coeffs(id, exp, tex, angles, gamma, trans) -> torch.Tensor:
    """Inverse of :func:`split_coeffs` ``(..., 257)``; leading dims broadcast."""
    parts = {"id": id, "exp": exp, "tex": tex, "angles": angles, "gamma": gamma, "trans": trans}
    for k, v in parts.items():
        _check_last(k, v, LAYOUT[k].stop - LAYOUT[k].start)
    try:
        batch = torch.broadcast_shapes(*(v.shape[:-1] for v in parts.values()))
    except RuntimeError:
        raise ValueError("id, exp, tex, angles, gamma, trans: leading (batch) dims do not "
                         "broadcast: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in parts.items())
                         ) from None
    return torch.cat([v.expand(*batch, v.shape[-1]) for v in parts.values()], dim=-1)


def motion_from_coeffs(coeffs: torch.Tensor) -> torch.Tensor:
    """OTAvatar's 70-dim motion ``(..., 70)`` = exp (64) ‖ angles (3) ‖ trans (3) of
    ``coeffs: (..., 257)`` (PIRenderer's 73 adds 3 crop parameters, which OTAvatar drops)."""
    c = split_coeffs(coeffs)
    return torch.cat([c["exp"], c["angles"], c["trans"]], dim=-1)


def window_indices(index, length: int, radius: int = MOTION_RADIUS) -> torch.Tensor:
    """Frame indices ``(..., 2 * radius + 1)`` of the window centred on ``index`` (int or
    int tensor), clamped to ``[0, length - 1]`` at the video ends (OTAvatar). ``length`` > 0
    frames, ``radius`` >= 0."""
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length <= 0:
        raise ValueError(f"length: expected an integer > 0, got {length!r}")
    if isinstance(radius, bool) or not isinstance(radius, numbers.Integral) or radius < 0:
        raise ValueError(f"radius: expected an integer >= 0, got {radius!r}")
    idx = torch.as_tensor(index)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"index: expected an int or an integer tensor, got {index!r}")
    idx = idx.to(torch.int64)
    if ((idx < 0) | (idx >= length)).any():
        raise IndexError(f"index: expected values in [0, {length - 1}], got {idx.tolist()}")
    offsets = torch.arange(-radius, radius + 1, dtype=torch.int64)
    return (idx.unsqueeze(-1) + offsets).clamp(0, length - 1)


def motion_window(coeffs: torch.Tensor, index, radius: int = MOTION_RADIUS) -> torch.Tensor:
    """OTAvatar's controller input ``(70, 2 * radius + 1)`` (``(B, 70, 27)`` for a batch of
    indices) from a video's ``coeffs: (T, 257)``, T >= 1, around frame ``index`` (an int or an
    integer tensor ``(B,)``, B = 0 works)."""
    _check_last("coeffs", coeffs, COEFF_DIM)
    if coeffs.dim() != 2 or coeffs.shape[0] == 0:
        raise ValueError(f"coeffs: expected shape (T, 257) with T >= 1 frames, got "
                         f"{tuple(coeffs.shape)}")
    motion = motion_from_coeffs(coeffs)                               # (T, 70)
    idx = window_indices(index, coeffs.shape[0], radius)            # (..., W)
    return motion[idx].transpose(-1, -2)                              # (..., 70, W)
