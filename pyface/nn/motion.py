"""Keypoint-driven dense motion (face-vid2vid / LivePortrait / MMFA) on pyface's fused warp ops.

Provenance: reproduces the semantics of face-vid2vid's ``DenseMotionNetwork``, ``Hourglass`` and
``get_rotation_matrix`` (Wang et al. 2021) as in the open reimplementation
zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis (commit 9511d25, CC BY-NC 4.0)
and KwaiVGI/LivePortrait (commit 1986663, MIT), whose weight files
:func:`pyface.convert.convert_dense_motion` converts. The code is our own implementation, written
from the papers and the documented behaviour; no upstream code is copied.

* :class:`DenseMotion`: face-vid2vid's ``DenseMotionNetwork``: 1x1x1 compress conv + BatchNorm +
  ReLU, :func:`pyface.ops.motion_field_input` (the K+1 warped copies and heatmaps in one pass),
  a 3D hourglass, a 7x7x7 conv to K+1 mask logits + softmax, and an optional occlusion map.
* keypoint transforms: :func:`headpose_to_degrees` (66-bin head-pose decoding),
  :func:`euler_to_rotation` (pitch, yaw, roll -> R = Rx(pitch) Ry(yaw) Rz(roll)) and
  :func:`transform_keypoints` (face-vid2vid's ``R x_c + t + delta`` or the scaled form
  ``s R (x_c + delta) + t``, optionally orthographic: ``t_z = 0``).

Argument-order trap: face-vid2vid's ``DenseMotionNetwork.forward(feature, kp_driving,
kp_source)`` and ``get_rotation_matrix(yaw, pitch, roll)`` take their arguments in a different
order from pyface's. Here the keypoints of :meth:`DenseMotion.forward` / :meth:`DenseMotion.warp`
and the angles of :func:`euler_to_rotation` are keyword-only, so ported call sites fail loudly
instead of silently swapping source and driving (or pitch and yaw).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyface.ops import keypoint_flow, motion_field_input, warp_by_keypoints

# ------------------------------------------------------------------------------------------------
# keypoint transforms
# ------------------------------------------------------------------------------------------------

HEADPOSE_BINS = 66


def headpose_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """66-bin head-pose logits -> degrees: ``sum(softmax(logits) * idx) * 3 - 99``.

    Args:
        logits: (B, 66).
    Returns:
        (B,) angles in degrees, in [-99, 96].
    """
    if logits.shape[-1] != HEADPOSE_BINS:
        raise ValueError(f"logits: expected shape (B, {HEADPOSE_BINS}), got {tuple(logits.shape)}")
    idx = torch.arange(HEADPOSE_BINS, device=logits.device, dtype=logits.dtype)
    return (F.softmax(logits, dim=-1) * idx).sum(-1) * 3 - 99


#: face-vid2vid's value of pi in its degree -> radian conversion (``get_rotation_matrix``:
#: ``deg / 180 * 3.14``); pass ``pi=FACE_VID2VID_PI`` to :func:`euler_to_rotation` to reproduce its
#: rotations exactly (they differ from exact ones by about 5e-4 relative in the angle).
#: LivePortrait uses the exact value.
FACE_VID2VID_PI = 3.14


def euler_to_rotation(*, pitch: torch.Tensor, yaw: torch.Tensor, roll: torch.Tensor,
                      pi: float = math.pi) -> torch.Tensor:
    """Rotation matrices ``Rx(pitch) @ Ry(yaw) @ Rz(roll)`` from angles in degrees.

    Keyword-only: face-vid2vid's ``get_rotation_matrix(yaw, pitch, roll)`` takes yaw first, so a
    positional call ported from there would swap pitch and yaw.

    Args:
        pitch, yaw, roll: (B,) degrees.
        pi: the value of pi in ``deg * pi / 180``; :data:`FACE_VID2VID_PI` (3.14) reproduces
            face-vid2vid's checkpoints' rotations.
    Returns:
        (B, 3, 3).
    """
    if not (pitch.shape == yaw.shape == roll.shape):
        raise ValueError(f"pitch, yaw, roll: expected the same shape (B,), got "
                         f"{tuple(pitch.shape)}, {tuple(yaw.shape)}, {tuple(roll.shape)}")
    p, y, r = (a * (pi / 180) for a in (pitch, yaw, roll))
    one, zero = torch.ones_like(p), torch.zeros_like(p)
    rx = torch.stack([one, zero, zero, zero, p.cos(), -p.sin(), zero, p.sin(), p.cos()], -1)
    ry = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], -1)
    rz = torch.stack([r.cos(), -r.sin(), zero, r.sin(), r.cos(), zero, zero, zero, one], -1)
    shape = p.shape + (3, 3)
    return rx.view(shape) @ ry.view(shape) @ rz.view(shape)


@dataclasses.dataclass(frozen=True)
class KeypointTransformConfig:
    """How canonical keypoints are posed.

    Attributes:
        mode: ``"fv2v"``: ``x = R x_c + t + delta`` (face-vid2vid); ``"scaled"``:
            ``x = s R (x_c + delta) + t`` (the scaled-orthographic form used by MMFA).
        orthographic: drop ``t_z`` (the depth translation), as with a scaled-orthographic camera.
    """

    mode: str = "fv2v"
    orthographic: bool = False


def transform_keypoints(kp_canonical: torch.Tensor, rotation: torch.Tensor,
                        translation: torch.Tensor, expression: torch.Tensor, *,
                        scale: torch.Tensor | None = None,
                        config: KeypointTransformConfig = KeypointTransformConfig(),
                        jacobian: torch.Tensor | None = None):
    """Poses canonical 3D keypoints.

    Args:
        kp_canonical: (B, K, 3) canonical keypoints x_c.
        rotation: (B, 3, 3) R (see :func:`euler_to_rotation`).
        translation: (B, 3) t.
        expression: (B, K, 3) or (B, 3K) deformation delta.
        scale: (B,) or (B, 1) s; required for ``mode="scaled"``, must be None for ``"fv2v"``.
        config: the transform form.
        jacobian: optional (B, K, 3, 3) canonical jacobians, rotated as ``R J`` (and scaled by s).
    Returns:
        (B, K, 3) posed keypoints, and the (B, K, 3, 3) posed jacobians when given.
    """
    B, K, _ = kp_canonical.shape
    if config.mode not in ("fv2v", "scaled"):
        raise ValueError(f"config.mode: expected 'fv2v' or 'scaled', got {config.mode!r}")
    if rotation.shape != (B, 3, 3):
        raise ValueError(f"rotation: expected shape ({B}, 3, 3), got {tuple(rotation.shape)}")
    if translation.shape != (B, 3):
        raise ValueError(f"translation: expected shape ({B}, 3), got {tuple(translation.shape)}")
    if expression.numel() != B * K * 3:
        raise ValueError(f"expression: expected shape ({B}, {K}, 3) or ({B}, {3 * K}), got "
                         f"{tuple(expression.shape)}")
    delta = expression.reshape(B, K, 3)
    t = translation
    if config.orthographic:
        t = torch.cat([t[:, :2], torch.zeros_like(t[:, 2:])], dim=1)
    t = t.unsqueeze(1)
    if config.mode == "fv2v":
        if scale is not None:
            raise ValueError("scale: must be None for mode='fv2v' (face-vid2vid has no scale)")
        kp = torch.einsum("bij,bkj->bki", rotation, kp_canonical) + t + delta
        s = None
    else:
        if scale is None:
            raise ValueError("scale: required for mode='scaled'")
        s = scale.reshape(B, 1, 1)
        kp = s * torch.einsum("bij,bkj->bki", rotation, kp_canonical + delta) + t
    if jacobian is None:
        return kp
    jac = torch.einsum("bij,bkjl->bkil", rotation, jacobian)
    if s is not None:
        jac = s.unsqueeze(-1) * jac
    return kp, jac


# ------------------------------------------------------------------------------------------------
# dense motion
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DenseMotionConfig:
    """Hyper-parameters of :class:`DenseMotion`; defaults are face-vid2vid's vox-256 config.

    Attributes:
        num_kp: K keypoints (face-vid2vid 15, LivePortrait 21).
        feature_channel: channels of the appearance volume.
        block_expansion, num_blocks, max_features: the 3D hourglass (pooling over H, W only).
        reshape_depth: depth D of the volume (for the occlusion map's 2D conv).
        compress: channels of the compressed volume that is warped K+1 times.
        estimate_occlusion_map: also predict a (B, 1, H, W) occlusion map.
        heatmap_variance: of the keypoint Gaussians.
        align_corners: of the trilinear sampling (face-vid2vid: False).
        grid_align_corners: of the identity grid (face-vid2vid: True, an inclusive linspace).
    """

    num_kp: int = 15
    feature_channel: int = 32
    block_expansion: int = 32
    num_blocks: int = 5
    max_features: int = 1024
    reshape_depth: int = 16
    compress: int = 4
    estimate_occlusion_map: bool = True
    heatmap_variance: float = 0.01
    align_corners: bool = False
    grid_align_corners: bool = True


class DownBlock3d(nn.Module):
    """face-vid2vid's 3D down block: Conv3d 3x3x3 + BatchNorm + ReLU + average pool over H, W.
    x (B, cin, D, H, W) -> (B, cout, D, H/2, W/2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(cout, affine=True)

    def forward(self, x):
        return F.avg_pool3d(F.relu(self.norm(self.conv(x))), kernel_size=(1, 2, 2))


class UpBlock3d(nn.Module):
    """face-vid2vid's 3D up block: nearest x2 over H, W (depth kept) + Conv3d 3x3x3 + BatchNorm +
    ReLU. x (B, cin, D, H, W) -> (B, cout, D, 2H, 2W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(cout, affine=True)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=(1, 2, 2))
        return F.relu(self.norm(self.conv(x)))


class Hourglass3d(nn.Module):
    """face-vid2vid's 3D hourglass: U-Net with (1, 2, 2) pooling and skip concatenation.

    ``x: (B, in_features, D, H, W)`` with H, W divisible by ``2 ** num_blocks`` ->
    ``(B, out_filters, D, H, W)``, ``out_filters = block_expansion + in_features``.
    """

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3,
                 max_features: int = 256):
        super().__init__()

        def width(i):
            return min(max_features, block_expansion * (2 ** i))
        self.down = nn.ModuleList(
            [DownBlock3d(in_features if i == 0 else width(i), width(i + 1))
             for i in range(num_blocks)])
        self.up = nn.ModuleList(
            [UpBlock3d((1 if i == num_blocks - 1 else 2) * width(i + 1), width(i))
             for i in reversed(range(num_blocks))])
        self.out_filters = block_expansion + in_features
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_filters, affine=True)

    def forward(self, x):
        skips = [x]
        for down in self.down:
            skips.append(down(skips[-1]))
        out = skips.pop()
        for up in self.up:
            out = torch.cat([up(out), skips.pop()], dim=1)
        return F.relu(self.norm(self.conv(out)))


class DenseMotion(nn.Module):
    """face-vid2vid's dense motion network on the fused warp ops.

    ``forward(feature, *, kp_source, kp_driving)`` returns a dict with ``mask`` (B, K+1, D, H, W)
    (softmax over K+1), ``occlusion_map`` (B, 1, H, W) when configured, and ``deformation``
    (B, D, H, W, 3) only when ``return_deformation=True``. To warp the appearance volume without
    materialising the deformation, call :meth:`warp` (:func:`pyface.ops.warp_by_keypoints`).

    Args (forward):
        feature: (B, feature_channel, D, H, W) appearance volume; H, W divisible by
            ``2 ** num_blocks``.
        kp_source: (B, K, 3); kp_driving: (B, K, 3) posed keypoints in [-1, 1]; keyword-only
            (face-vid2vid's ``forward(feature, kp_driving, kp_source)`` has the reverse order).
        jacobian: optional (B, K, 3, 3) first-order term (``combine_jacobians``).

    State-dict keys differ from face-vid2vid's / LivePortrait's only inside the hourglass
    (``hourglass.encoder.down_blocks.i`` -> ``hourglass.down.i``,
    ``hourglass.decoder.up_blocks.i`` -> ``hourglass.up.i``, ``hourglass.decoder.{conv,norm}``
    -> ``hourglass.{conv,norm}``); ``pyface convert dense-motion`` does the renames.
    """

    def __init__(self, config: DenseMotionConfig = DenseMotionConfig()):
        super().__init__()
        self.config = c = config
        k1 = c.num_kp + 1
        self.hourglass = Hourglass3d(c.block_expansion, k1 * (c.compress + 1), c.num_blocks,
                                     c.max_features)
        self.mask = nn.Conv3d(self.hourglass.out_filters, k1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(c.feature_channel, c.compress, kernel_size=1)
        self.norm = nn.BatchNorm3d(c.compress, affine=True)
        self.occlusion = (nn.Conv2d(self.hourglass.out_filters * c.reshape_depth, 1,
                                    kernel_size=7, padding=3)
                          if c.estimate_occlusion_map else None)

    def forward(self, feature: torch.Tensor, *, kp_source: torch.Tensor, kp_driving: torch.Tensor,
                jacobian: torch.Tensor | None = None,
                return_deformation: bool = False) -> dict[str, torch.Tensor]:
        c = self.config
        if feature.dim() != 5 or feature.shape[1] != c.feature_channel:
            raise ValueError(f"feature: expected shape (B, {c.feature_channel}, D, H, W), got "
                             f"{tuple(feature.shape)}")
        for name, kp in (("kp_source", kp_source), ("kp_driving", kp_driving)):
            if kp.dim() != 3 or kp.shape[1:] != (c.num_kp, 3):
                raise ValueError(f"{name}: expected shape (B, {c.num_kp}, 3), got "
                                 f"{tuple(kp.shape)}")
        B, _, D, H, W = feature.shape
        x = F.relu(self.norm(self.compress(feature)))
        x = motion_field_input(x, kp_source, kp_driving, jacobian=jacobian,
                               heatmap_variance=c.heatmap_variance,
                               align_corners=c.align_corners,
                               grid_align_corners=c.grid_align_corners)
        prediction = self.hourglass(x)
        mask = F.softmax(self.mask(prediction), dim=1)
        out = {"mask": mask}
        if return_deformation:
            out["deformation"] = keypoint_flow(kp_source, kp_driving, mask, jacobian=jacobian,
                                               grid_align_corners=c.grid_align_corners)
        if self.occlusion is not None:
            out["occlusion_map"] = torch.sigmoid(self.occlusion(prediction.reshape(B, -1, H, W)))
        return out

    def warp(self, volume: torch.Tensor, *, kp_source: torch.Tensor, kp_driving: torch.Tensor,
             mask: torch.Tensor, jacobian: torch.Tensor | None = None) -> torch.Tensor:
        """``volume`` (B, C, D, H, W) warped by the dense motion of ``mask`` (B, K+1, D, H, W)
        (fused); keypoints (B, K, 3), keyword-only as in :meth:`forward`."""
        c = self.config
        return warp_by_keypoints(volume, kp_source, kp_driving, mask, jacobian=jacobian,
                                 align_corners=c.align_corners,
                                 grid_align_corners=c.grid_align_corners)
