"""Reference 3D-flow warping: face-vid2vid's dense-motion semantics (``modules/dense_motion.py``,
``modules/util.py``) written with ``F.grid_sample`` 5-D and explicit K+1 sparse motions.

Conventions shared by every op of the family:

* a 3D grid's last dim is (x -> W, y -> H, z -> D), as ``F.grid_sample`` 5-D;
* the identity grid of a (D, H, W) volume is face-vid2vid's ``make_coordinate_grid``: the
  inclusive linspace ``2 i / (n - 1) - 1`` (``grid_align_corners=True``), or pixel centres
  ``(2 i + 1) / n - 1`` (``grid_align_corners=False``). A size-1 axis has the coordinate 0 (the
  inclusive linspace is undefined there; face-vid2vid would produce NaN);
* sparse motion k (k = 1..K) maps an identity coordinate z to ``J_k (z - kp_driving_k) +
  kp_source_k`` (``J_k`` the identity without jacobians); motion 0 is the identity (background).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _axis(n: int, align_corners: bool, device, dtype) -> torch.Tensor:
    i = torch.arange(n, device=device, dtype=dtype)
    if n == 1:
        return torch.zeros(1, device=device, dtype=dtype)
    if align_corners:
        return 2 * (i / (n - 1)) - 1
    return (2 * i + 1) / n - 1


def make_coordinate_grid(spatial_size: tuple[int, int, int], *, align_corners: bool = True,
                         device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Identity grid of a (D, H, W) volume -> (D, H, W, 3), last dim (x, y, z).

    ``align_corners=True`` is face-vid2vid's ``make_coordinate_grid`` (inclusive linspace);
    ``False`` gives voxel-centre coordinates, the identity of ``F.grid_sample(...,
    align_corners=False)``.
    """
    d, h, w = spatial_size
    z = _axis(d, align_corners, device, dtype).view(d, 1, 1).expand(d, h, w)
    y = _axis(h, align_corners, device, dtype).view(1, h, 1).expand(d, h, w)
    x = _axis(w, align_corners, device, dtype).view(1, 1, w).expand(d, h, w)
    return torch.stack([x, y, z], dim=-1)


def combine_jacobians(jacobian_source: torch.Tensor, jacobian_driving: torch.Tensor
                      ) -> torch.Tensor:
    """FOMM / face-vid2vid first-order term: ``J_source @ inverse(J_driving)``.

    Args:
        jacobian_source: (B, K, 3, 3).
        jacobian_driving: (B, K, 3, 3).
    Returns:
        (B, K, 3, 3), the ``jacobian`` argument of the warp ops.
    """
    return torch.matmul(jacobian_source, torch.inverse(jacobian_driving))


def sparse_motions_reference(kp_source: torch.Tensor, kp_driving: torch.Tensor,
                             spatial_size: tuple[int, int, int], *,
                             jacobian: torch.Tensor | None = None,
                             grid_align_corners: bool = True) -> torch.Tensor:
    """face-vid2vid's ``create_sparse_motions``: (B, K+1, D, H, W, 3), motion 0 the identity.

    Args:
        kp_source: (B, K, 3), kp_driving: (B, K, 3) keypoints in [-1, 1], (x, y, z).
        jacobian: optional (B, K, 3, 3), applied to ``z - kp_driving_k``.
    """
    B, K, _ = kp_source.shape
    d, h, w = spatial_size
    grid = make_coordinate_grid(spatial_size, align_corners=grid_align_corners,
                                device=kp_source.device, dtype=kp_source.dtype)
    grid = grid.view(1, 1, d, h, w, 3)
    coords = grid - kp_driving.view(B, K, 1, 1, 1, 3)
    if jacobian is not None:
        coords = torch.matmul(jacobian.view(B, K, 1, 1, 1, 3, 3), coords.unsqueeze(-1)).squeeze(-1)
    driving_to_source = coords + kp_source.view(B, K, 1, 1, 1, 3)
    identity = grid.expand(B, 1, d, h, w, 3)
    return torch.cat([identity, driving_to_source], dim=1)


def warp_volume_reference(volume: torch.Tensor, grid: torch.Tensor, *,
                          align_corners: bool = False) -> torch.Tensor:
    """Trilinear sampling with zero padding: ``F.grid_sample`` 5-D.

    Args:
        volume: (B, C, D, H, W).
        grid: (B, D', H', W', 3), last dim (x -> W, y -> H, z -> D) in [-1, 1].
    Returns:
        (B, C, D', H', W') in the dtype of ``volume`` (low precision is sampled in float32).
    """
    work = _work_dtype(volume, grid)
    out = F.grid_sample(volume.to(work), grid.to(work), mode="bilinear", padding_mode="zeros",
                        align_corners=align_corners)
    return out.to(volume.dtype)


def keypoint_flow_reference(kp_source: torch.Tensor, kp_driving: torch.Tensor,
                            masks: torch.Tensor, *, jacobian: torch.Tensor | None = None,
                            grid_align_corners: bool = True) -> torch.Tensor:
    """Dense flow ``sum_k masks_k * motion_k`` as face-vid2vid's ``DenseMotionNetwork``.

    Args:
        kp_source: (B, K, 3), kp_driving: (B, K, 3).
        masks: (B, K+1, D, H, W), channel 0 the background (identity motion).
        jacobian: optional (B, K, 3, 3).
    Returns:
        (B, D, H, W, 3) in the dtype of ``masks``.
    """
    work = _work_dtype(kp_source, kp_driving, masks)
    motions = sparse_motions_reference(kp_source.to(work), kp_driving.to(work), masks.shape[2:],
                                       jacobian=None if jacobian is None else jacobian.to(work),
                                       grid_align_corners=grid_align_corners)
    m = masks.to(work).unsqueeze(2)                              # (B, K+1, 1, D, H, W)
    flow = (motions.permute(0, 1, 5, 2, 3, 4) * m).sum(dim=1)    # (B, 3, D, H, W)
    return flow.permute(0, 2, 3, 4, 1).to(masks.dtype)


def warp_by_keypoints_reference(volume: torch.Tensor, kp_source: torch.Tensor,
                                kp_driving: torch.Tensor, masks: torch.Tensor, *,
                                jacobian: torch.Tensor | None = None, align_corners: bool = False,
                                grid_align_corners: bool = True, return_flow: bool = False):
    """Flow from keypoints and masks, then one trilinear warp of ``volume`` (face-vid2vid).

    Args:
        volume: (B, C, D, H, W); masks: (B, K+1, D', H', W'); kp_*: (B, K, 3);
        jacobian: optional (B, K, 3, 3).
    Returns:
        (B, C, D', H', W'), and the (B, D', H', W', 3) flow when ``return_flow``.
    """
    flow = keypoint_flow_reference(kp_source, kp_driving, masks, jacobian=jacobian,
                                   grid_align_corners=grid_align_corners)
    out = warp_volume_reference(volume, flow, align_corners=align_corners)
    return (out, flow) if return_flow else out


def keypoint_heatmaps_reference(kp: torch.Tensor, spatial_size: tuple[int, int, int], *,
                                variance: float = 0.01, grid_align_corners: bool = True
                                ) -> torch.Tensor:
    """face-vid2vid's ``kp2gaussian``: (B, K, 3) -> (B, K, D, H, W)."""
    B, K, _ = kp.shape
    grid = make_coordinate_grid(spatial_size, align_corners=grid_align_corners,
                                device=kp.device, dtype=kp.dtype)
    diff = grid.view(1, 1, *spatial_size, 3) - kp.view(B, K, 1, 1, 1, 3)
    return torch.exp(-0.5 * (diff ** 2).sum(-1) / variance)


def motion_field_input_reference(volume: torch.Tensor, kp_source: torch.Tensor,
                                 kp_driving: torch.Tensor, *,
                                 jacobian: torch.Tensor | None = None,
                                 heatmap_variance: float = 0.01, align_corners: bool = False,
                                 grid_align_corners: bool = True) -> torch.Tensor:
    """The dense-motion network input of face-vid2vid, built as it does: the volume repeated
    K+1 times and warped by each sparse motion, and the Gaussian heatmap differences.

    Args:
        volume: (B, C, D, H, W); kp_*: (B, K, 3); jacobian: optional (B, K, 3, 3).
    Returns:
        (B, (K+1)*(C+1), D, H, W): for k = 0..K, channel k*(C+1) is the heatmap difference
        (driving - source; zero for k = 0) and channels k*(C+1)+1 .. k*(C+1)+C the volume warped
        by motion k.
    """
    B, C, D, H, W = volume.shape
    K = kp_source.shape[1]
    work = _work_dtype(volume, kp_source, kp_driving)
    vol = volume.to(work)
    kps, kpd = kp_source.to(work), kp_driving.to(work)
    motions = sparse_motions_reference(kps, kpd, (D, H, W),
                                       jacobian=None if jacobian is None else jacobian.to(work),
                                       grid_align_corners=grid_align_corners)
    rep = vol.unsqueeze(1).repeat(1, K + 1, 1, 1, 1, 1).view(B * (K + 1), C, D, H, W)
    deformed = F.grid_sample(rep, motions.reshape(B * (K + 1), D, H, W, 3), mode="bilinear",
                             padding_mode="zeros", align_corners=align_corners)
    deformed = deformed.view(B, K + 1, C, D, H, W)
    heat = (keypoint_heatmaps_reference(kpd, (D, H, W), variance=heatmap_variance,
                                        grid_align_corners=grid_align_corners)
            - keypoint_heatmaps_reference(kps, (D, H, W), variance=heatmap_variance,
                                          grid_align_corners=grid_align_corners))
    heat = torch.cat([heat.new_zeros(B, 1, D, H, W), heat], dim=1).unsqueeze(2)
    out = torch.cat([heat, deformed], dim=2).view(B, (K + 1) * (C + 1), D, H, W)
    return out.to(volume.dtype)
