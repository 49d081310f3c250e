"""Public 3D-flow warping ops (face-vid2vid / LivePortrait / MMFA dense motion).

Coordinates follow ``F.grid_sample`` 5-D: a grid's last dim is (x -> W, y -> H, z -> D), in
[-1, 1]. The identity grid of the keypoint ops is face-vid2vid's ``make_coordinate_grid`` (an
inclusive linspace, ``grid_align_corners=True``) or voxel centres (``grid_align_corners=False``);
see ``docs/warp.md`` for the half-voxel difference between the two.
"""
from __future__ import annotations

import torch

from pyface import _backend
from pyface.ops._checks import ShapeChecker, check_autodiff_mode, check_positive
from pyface.ops.reference.warp import (keypoint_flow_reference, motion_field_input_reference,
                                       warp_by_keypoints_reference, warp_volume_reference)


def _triton(name: str):
    from pyface._ops.warp import triton_ops

    return triton_ops()[name]


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected bool, got {type(value).__name__}")


def _check_volume(chk: ShapeChecker, volume) -> None:
    chk.tensor("volume", volume, "B C D H W")
    if min(volume.shape[1:]) < 1:
        raise ValueError(f"volume: expected shape (B, C, D, H, W) with C, D, H, W >= 1, got "
                         f"{tuple(volume.shape)}")


def _check_keypoints(chk: ShapeChecker, kp_source, kp_driving, jacobian) -> None:
    chk.tensor("kp_source", kp_source, "B K 3")
    chk.tensor("kp_driving", kp_driving, "B K 3")
    if jacobian is not None:
        chk.tensor("jacobian", jacobian, "B K 3 3")


def _check_masks(chk: ShapeChecker, masks) -> None:
    chk.tensor("masks", masks, "B * Do Ho Wo")
    K = chk.dims["K"]
    if masks.shape[1] != K + 1:
        raise ValueError(f"masks: expected shape (B, K+1, D, H, W) = (B, {K + 1}, D, H, W) for "
                         f"K = {K} keypoints, got {tuple(masks.shape)}")


def warp_volume(volume: torch.Tensor, grid: torch.Tensor, *, align_corners: bool = False,
                backend: str | None = None) -> torch.Tensor:
    """Trilinear 3D sampling with zero padding, identical to ``F.grid_sample`` 5-D.

    Args:
        volume: (B, C, D, H, W) features, any strides.
        grid: (B, D', H', W', 3) sample positions, last dim (x -> W, y -> H, z -> D) in [-1, 1];
            the output may have another size than the volume. Positions outside give zeros.
        align_corners: as in ``F.grid_sample``.
        backend: ``None`` (the default for the device), ``"reference"``, ``"cpu"``, ``"cuda"`` or
            ``"triton"``.

    Returns:
        (B, C, D', H', W') in the dtype of ``volume``. Differentiable w.r.t. ``volume`` and
        ``grid``. A NaN grid position gives NaN features (``F.grid_sample`` gives zeros).
    """
    chk = ShapeChecker()
    _check_volume(chk, volume)
    chk.tensor("grid", grid, "B Do Ho Wo 3")
    _check_bool("align_corners", align_corners)
    name = _backend.select_backend("warp_volume", volume.device, backend, volume.dtype)
    if name == "reference":
        return warp_volume_reference(volume, grid, align_corners=align_corners)
    check_autodiff_mode("warp_volume", name, volume, grid)
    if name == "triton":
        return _triton("warp_volume")(volume, grid, align_corners)
    return torch.ops.pyface.warp_volume(volume, grid, align_corners)


def keypoint_flow(kp_source: torch.Tensor, kp_driving: torch.Tensor, masks: torch.Tensor, *,
                  jacobian: torch.Tensor | None = None, grid_align_corners: bool = True,
                  backend: str | None = None) -> torch.Tensor:
    """Dense 3D flow from K keypoint pairs and K+1 masks (face-vid2vid's deformation)::

        flow(z) = masks_0(z) z + sum_k masks_k(z) (J_k (z - kp_driving_k) + kp_source_k)

    with z the identity grid of the masks' (D, H, W) and J_k the identity unless ``jacobian``
    is given. The masks need not sum to one.

    Args:
        kp_source: (B, K, 3) source keypoints (x, y, z) in [-1, 1].
        kp_driving: (B, K, 3) driving keypoints.
        masks: (B, K+1, D, H, W); channel 0 weighs the identity (background) motion.
        jacobian: optional (B, K, 3, 3) first-order term (FOMM form ``J_source @
            inverse(J_driving)``, see ``pyface.ops.reference.warp.combine_jacobians``).
        grid_align_corners: identity grid as an inclusive linspace (face-vid2vid) or at voxel
            centres.
        backend: ``None``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        flow: (B, D, H, W, 3) in the dtype of ``masks``. Differentiable w.r.t. keypoints, masks
        and jacobian.
    """
    chk = ShapeChecker()
    _check_keypoints(chk, kp_source, kp_driving, jacobian)
    _check_masks(chk, masks)
    _check_bool("grid_align_corners", grid_align_corners)
    name = _backend.select_backend("keypoint_flow", masks.device, backend, masks.dtype)
    if name == "reference":
        return keypoint_flow_reference(kp_source, kp_driving, masks, jacobian=jacobian,
                                       grid_align_corners=grid_align_corners)
    check_autodiff_mode("keypoint_flow", name, kp_source, kp_driving, masks, jacobian)
    if name == "triton":
        return _triton("keypoint_flow")(kp_source, kp_driving, masks, jacobian,
                                        grid_align_corners)
    return torch.ops.pyface.keypoint_flow(kp_source, kp_driving, masks, jacobian,
                                          grid_align_corners)


def warp_by_keypoints(volume: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor,
                      masks: torch.Tensor, *, jacobian: torch.Tensor | None = None,
                      align_corners: bool = False, grid_align_corners: bool = True,
                      return_flow: bool = False, backend: str | None = None):
    """Fused ``warp_volume(volume, keypoint_flow(kp_source, kp_driving, masks))``.

    The flow of each output voxel is computed on the fly and the volume sampled once: neither
    the flow nor any per-keypoint tensor is materialised (forward or backward).

    Args:
        volume: (B, C, D, H, W) features, any strides.
        kp_source: (B, K, 3); kp_driving: (B, K, 3) keypoints in [-1, 1].
        masks: (B, K+1, D', H', W'); the output has the masks' spatial size.
        jacobian: optional (B, K, 3, 3), as in :func:`keypoint_flow`.
        align_corners: of the trilinear sampling (face-vid2vid: False).
        grid_align_corners: of the identity grid (face-vid2vid: True).
        return_flow: also return the (B, D', H', W', 3) flow (computed by a second op call,
            so it is materialised only when asked for).
        backend: ``None``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        (B, C, D', H', W') in the dtype of ``volume`` [and the flow]. Differentiable w.r.t.
        volume, keypoints, masks and jacobian.

    Example:
        >>> vol = torch.randn(2, 32, 16, 64, 64, requires_grad=True)
        >>> kp_s, kp_d = torch.rand(2, 15, 3) * 2 - 1, torch.rand(2, 15, 3) * 2 - 1
        >>> masks = torch.randn(2, 16, 16, 64, 64).softmax(1)
        >>> out = pyface.ops.warp_by_keypoints(vol, kp_s, kp_d, masks)   # (2, 32, 16, 64, 64)
    """
    chk = ShapeChecker()
    _check_volume(chk, volume)
    _check_keypoints(chk, kp_source, kp_driving, jacobian)
    _check_masks(chk, masks)
    _check_bool("align_corners", align_corners)
    _check_bool("grid_align_corners", grid_align_corners)
    _check_bool("return_flow", return_flow)
    name = _backend.select_backend("warp_by_keypoints", volume.device, backend, volume.dtype)
    if name == "reference":
        return warp_by_keypoints_reference(volume, kp_source, kp_driving, masks,
                                           jacobian=jacobian, align_corners=align_corners,
                                           grid_align_corners=grid_align_corners,
                                           return_flow=return_flow)
    check_autodiff_mode("warp_by_keypoints", name, volume, kp_source, kp_driving, masks,
                        jacobian)
    op = (_triton("warp_by_keypoints") if name == "triton"
          else torch.ops.pyface.warp_by_keypoints)
    out = op(volume, kp_source, kp_driving, masks, jacobian, align_corners, grid_align_corners)
    if not return_flow:
        return out
    flow = keypoint_flow(kp_source, kp_driving, masks, jacobian=jacobian,
                         grid_align_corners=grid_align_corners, backend=name)
    return out, flow


def motion_field_input(volume: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor,
                       *, jacobian: torch.Tensor | None = None, heatmap_variance: float = 0.01,
                       align_corners: bool = False, grid_align_corners: bool = True,
                       backend: str | None = None) -> torch.Tensor:
    """face-vid2vid's dense-motion network input in one pass, without the (K+1)x repeat.

    For k = 0..K the output holds, in face-vid2vid's channel order, the Gaussian heatmap
    difference ``exp(-|z - kp_driving_k|^2 / (2 var)) - exp(-|z - kp_source_k|^2 / (2 var))``
    (zero for k = 0) followed by the C channels of ``volume`` warped by sparse motion k
    (k = 0 the identity grid, k >= 1 ``J_k (z - kp_driving_k) + kp_source_k``).

    Args:
        volume: (B, C, D, H, W) (face-vid2vid: the 4-channel compressed feature volume).
        kp_source: (B, K, 3); kp_driving: (B, K, 3).
        jacobian: optional (B, K, 3, 3), as in :func:`keypoint_flow` (not applied to heatmaps).
        heatmap_variance: of the Gaussians (face-vid2vid: 0.01).
        align_corners / grid_align_corners: as in :func:`warp_by_keypoints`.
        backend: ``None``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        (B, (K+1)*(C+1), D, H, W) in the dtype of ``volume``; channel ``k*(C+1)`` is heatmap k,
        channels ``k*(C+1)+1 .. k*(C+1)+C`` the warped volume. Differentiable w.r.t. volume,
        keypoints and jacobian.
    """
    chk = ShapeChecker()
    _check_volume(chk, volume)
    _check_keypoints(chk, kp_source, kp_driving, jacobian)
    check_positive("heatmap_variance", heatmap_variance)
    _check_bool("align_corners", align_corners)
    _check_bool("grid_align_corners", grid_align_corners)
    name = _backend.select_backend("motion_field_input", volume.device, backend, volume.dtype)
    if name == "reference":
        return motion_field_input_reference(volume, kp_source, kp_driving, jacobian=jacobian,
                                            heatmap_variance=heatmap_variance,
                                            align_corners=align_corners,
                                            grid_align_corners=grid_align_corners)
    check_autodiff_mode("motion_field_input", name, volume, kp_source, kp_driving, jacobian)
    op = (_triton("motion_field_input") if name == "triton"
          else torch.ops.pyface.motion_field_input)
    return op(volume, kp_source, kp_driving, jacobian, float(heatmap_variance), align_corners,
              grid_align_corners)
