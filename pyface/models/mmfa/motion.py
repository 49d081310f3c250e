"""MMFA's motion decomposition: rotation, scale / translation, expression -> posed keypoints.

MMFA (Li et al. 2026; no code released) is built here from the paper's description and our
specification (docs/models/mmfa.md); the code is our own.

* :func:`deep3d_to_keypoint_rotation` / :func:`deep3d_to_keypoint_degrees`: the one place where
  Deep3DFaceRecon angles (radians, ``R = Rz Ry Rx``, camera frame x right / y up / z towards the
  camera) become keypoint-space rotations (degrees, ``R = Rx(pitch) Ry(yaw) Rz(roll)`` of
  :func:`pyface.nn.motion.euler_to_rotation`, grid frame x right / y down / z away from the
  camera).
* :class:`ImageEncoder`: image -> a feature vector (the scale / translation head and the
  expression encoder are two of them).
* :class:`ExpressionDecoder`: ``(f_exp, x_c)`` -> per-keypoint deformations ``delta``.
* :func:`pose_keypoints`: ``x = s R (x_c + delta) + (t_x, t_y, 0)`` through
  :func:`pyface.nn.motion.transform_keypoints` (scaled, orthographic).
* :func:`placement_from_label`: the head's image placement (log scale, translation) from a
  frame's camera label, the target of the placement term.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pyface.face.cameras import FFHQ_RADIUS, project_label
from pyface.face.cameras import euler_to_rotation as deep3d_rotation
from pyface.nn.fv2v import DownBlock2d, ResBlock2d, SameBlock2d
from pyface.nn.motion import KeypointTransformConfig, euler_to_rotation, transform_keypoints

__all__ = ["FLIP", "deep3d_to_keypoint_rotation", "deep3d_to_keypoint_degrees",
           "keypoint_rotation_from_degrees", "ImageEncoder", "ExpressionDecoder",
           "pose_keypoints", "placement_from_label", "SCALED_ORTHOGRAPHIC"]

#: Deep3D camera frame (y up, z towards the camera) -> keypoint grid frame (y down, z away from
#: the camera): a 180 degree rotation about x, its own inverse.
FLIP = torch.diag(torch.tensor([1.0, -1.0, -1.0]))

SCALED_ORTHOGRAPHIC = KeypointTransformConfig(mode="scaled", orthographic=True)


def deep3d_to_keypoint_rotation(angles: torch.Tensor) -> torch.Tensor:
    """Deep3DFaceRecon angles -> the head's rotation in keypoint space.

    Args:
        angles: (..., 3) ``coeffs[224:227]``: (pitch, yaw, roll) in radians, ``R = Rz Ry Rx``.
    Returns:
        (..., 3, 3) ``F R F`` with ``F = diag(1, -1, -1)`` (:data:`FLIP`): the same physical
        rotation expressed in the keypoint grid's axes. Equal to
        ``euler_to_rotation(**deep3d_to_keypoint_degrees(angles))``.
    """
    if angles.shape[-1] != 3:
        raise ValueError(f"angles: expected shape (..., 3) (Deep3D pitch, yaw, roll in radians), "
                         f"got {tuple(angles.shape)}")
    f = FLIP.to(device=angles.device, dtype=angles.dtype)
    return f @ deep3d_rotation(angles) @ f


def deep3d_to_keypoint_degrees(angles: torch.Tensor) -> dict[str, torch.Tensor]:
    """Deep3DFaceRecon angles (..., 3) radians -> keypoint-space Euler angles in degrees,
    ``{"pitch", "yaw", "roll"}`` each (...,), such that
    ``euler_to_rotation(pitch=, yaw=, roll=) == deep3d_to_keypoint_rotation(angles)``
    (``Rx Ry Rz`` decomposition; unique for |yaw| < 90 degrees)."""
    r = deep3d_to_keypoint_rotation(angles)
    yaw = torch.asin(r[..., 0, 2].clamp(-1.0, 1.0))
    pitch = torch.atan2(-r[..., 1, 2], r[..., 2, 2])
    roll = torch.atan2(-r[..., 0, 1], r[..., 0, 0])
    deg = 180.0 / math.pi
    return {"pitch": pitch * deg, "yaw": yaw * deg, "roll": roll * deg}


def keypoint_rotation_from_degrees(pitch, yaw, roll, *, batch: int | None = None,
                                   device=None) -> torch.Tensor:
    """Keypoint-space rotation ``Rx(pitch) Ry(yaw) Rz(roll)`` from degrees given as numbers or
    (B,) tensors -> (B, 3, 3) (B = ``batch`` when all are numbers)."""
    vals = [torch.as_tensor(v, dtype=torch.float32, device=device) for v in (pitch, yaw, roll)]
    n = max([v.numel() for v in vals] + [batch or 1])
    vals = [v.reshape(-1).expand(n) if v.numel() == 1 else v.reshape(-1) for v in vals]
    return euler_to_rotation(pitch=vals[0], yaw=vals[1], roll=vals[2])


class ImageEncoder(nn.Module):
    """Image -> feature vector: 7x7 SameBlock2d, ``len(channels)`` DownBlock2d (each halves the
    size), a ResBlock2d, global average pooling and a linear layer.

    ``forward(image)``: image (B, 3, H, W) -> (B, out_dim).
    """

    def __init__(self, channels: list[int], out_dim: int, *, first: int | None = None):
        super().__init__()
        first = first or channels[0]
        self.first = SameBlock2d(3, first, kernel_size=7, padding=3)
        blocks, cin = [], first
        for c in channels:
            blocks.append(DownBlock2d(cin, c))
            cin = c
        self.down = nn.Sequential(*blocks)
        self.res = ResBlock2d(cin)
        self.fc = nn.Linear(cin, out_dim)
        self.out_dim = out_dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image: expected shape (B, 3, H, W), got {tuple(image.shape)}")
        x = self.res(self.down(self.first(image)))
        return self.fc(x.mean((2, 3)))


class ExpressionDecoder(nn.Module):
    """``concat(f_exp, x_c)`` -> (FC + BatchNorm + ReLU) x ``layers`` -> FC -> ``delta``.

    ``forward(f_exp, kp_canonical)``: f_exp (B, exp_dim), kp_canonical (B, K, 3) -> delta
    (B, K, 3). The last layer starts at zero (no deformation at initialisation).
    """

    def __init__(self, exp_dim: int, num_kp: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.exp_dim, self.num_kp = exp_dim, num_kp
        mods, cin = [], exp_dim + 3 * num_kp
        for _ in range(layers):
            mods += [nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            cin = hidden
        self.mlp = nn.Sequential(*mods)
        self.out = nn.Linear(cin, 3 * num_kp)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, f_exp: torch.Tensor, kp_canonical: torch.Tensor) -> torch.Tensor:
        B = f_exp.shape[0]
        if f_exp.dim() != 2 or f_exp.shape[1] != self.exp_dim:
            raise ValueError(f"f_exp: expected shape (B, {self.exp_dim}), got "
                             f"{tuple(f_exp.shape)}")
        if kp_canonical.shape != (B, self.num_kp, 3):
            raise ValueError(f"kp_canonical: expected shape ({B}, {self.num_kp}, 3), got "
                             f"{tuple(kp_canonical.shape)}")
        x = torch.cat([f_exp, kp_canonical.reshape(B, -1)], dim=1)
        return self.out(self.mlp(x)).view(B, self.num_kp, 3)


def pose_keypoints(kp_canonical: torch.Tensor, rotation: torch.Tensor, scale: torch.Tensor,
                   translation: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x = s R (x_c + delta) + (t_x, t_y, 0)``.

    Args:
        kp_canonical: (B, K, 3); rotation: (B, 3, 3) keypoint space
            (:func:`deep3d_to_keypoint_rotation`); scale: (B,); translation: (B, 2) (t_x, t_y);
        delta: (B, K, 3).
    Returns:
        (B, K, 3) posed keypoints.
    """
    B = kp_canonical.shape[0]
    if translation.shape != (B, 2):
        raise ValueError(f"translation: expected shape ({B}, 2), got {tuple(translation.shape)}")
    if scale.shape != (B,):
        raise ValueError(f"scale: expected shape ({B},), got {tuple(scale.shape)}")
    t3 = F.pad(translation, (0, 1))
    return transform_keypoints(kp_canonical, rotation, t3, delta, scale=scale,
                               config=SCALED_ORTHOGRAPHIC)


def placement_from_label(label: torch.Tensor,
                         reference_depth: float = FFHQ_RADIUS) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's placement in the image from the frame's camera: where the head's origin (the
    centre of its rotation, the world origin of the rendered head) projects, and how large the
    head appears.

    Args:
        label: (B, 25) EG3D camera label of the frame (``camera``; the synthetic engine's exact
            camera, or a fit's).
        reference_depth: the camera depth of the head's origin at which the scale is 1 (2.7, the
            synthetic engine's camera with no head translation).
    Returns:
        log_scale (B,) = log(reference_depth / depth of the origin) (perspective size, the
        scaled-orthographic ``log s``); translation (B, 2): the origin's projection (x, y) on
        the [-1, 1] grid (x right, y down; the keypoint space's ``(t_x, t_y)``).
    """
    if label.dim() != 2 or label.shape[1] != 25:
        raise ValueError(f"label: expected shape (B, 25) (EG3D camera), got "
                         f"{tuple(label.shape)}")
    origin = label.new_zeros(label.shape[0], 1, 3)
    uv, depth = project_label(origin, label)
    return (reference_depth / depth[:, 0, 0]).log(), uv[:, 0] * 2 - 1
