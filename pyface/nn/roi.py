"""RoI-align (own implementation on ``grid_sample``; no torchvision) and the mouth/eye RoI L1."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pyface.nn._reduce import l1_or_zero
from pyface.ops._checks import has_values


def roi_align(x: torch.Tensor, boxes: torch.Tensor, output_size: int | tuple[int, int],
              sampling_ratio: int = 2, aligned: bool = True) -> torch.Tensor:
    """Average of bilinear samples on a regular grid inside each box.

    Args:
        x: (N, C, H, W) features.
        boxes: (K, 5) rows ``(batch_index, x0, y0, x1, y1)`` in pixels (x to the right, y down).
        output_size: (oh, ow) bins per box.
        sampling_ratio: samples per bin along each axis (> 0).
        aligned: pixel centres at ``i + 0.5`` (``aligned=True`` in torchvision's terms).
    Returns:
        (K, C, oh, ow). Samples outside the image are clamped to the border. No boxes (K = 0)
        give an empty result that is still connected to ``x`` (backward gives it zeros).
    """
    if x.ndim != 4:
        raise ValueError(f"x: expected shape (N, C, H, W), got {tuple(x.shape)}")
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes: expected shape (K, 5), got {tuple(boxes.shape)}")
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio: expected > 0, got {sampling_ratio}")
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    N, C, H, W = x.shape
    K = boxes.shape[0]
    if K == 0:     # no elements, but part of x's graph (a loss over it can still backward)
        return x[:0].sum((2, 3), keepdim=True).expand(0, C, oh, ow)
    boxes = boxes.to(x.dtype)
    idx = boxes[:, 0].long()
    if has_values(idx) and ((idx < 0).any() or (idx >= N).any()):
        raise ValueError(f"boxes[:, 0]: batch indices must be in [0, {N}), got "
                         f"{idx.min().item()}..{idx.max().item()}")
    off = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (boxes[:, i] - off for i in range(1, 5))
    sr = sampling_ratio
    ty = (torch.arange(oh * sr, device=x.device, dtype=x.dtype) + 0.5) / (oh * sr)
    tx = (torch.arange(ow * sr, device=x.device, dtype=x.dtype) + 0.5) / (ow * sr)
    py = y0[:, None] + (y1 - y0)[:, None] * ty[None]          # (K, oh*sr) pixel coords
    px = x0[:, None] + (x1 - x0)[:, None] * tx[None]
    gy = (py + 0.5) / H * 2 - 1                                # align_corners=False mapping
    gx = (px + 0.5) / W * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, oh * sr, -1),
                        gy[:, :, None].expand(-1, -1, ow * sr)], dim=-1)
    # one box per image, in batch order (the RoI losses): sample x itself, not a gathered copy
    # (grid_sample keeps its input for the backward, so the copy would stay alive until then)
    same = K == N and has_values(idx) and bool((idx == torch.arange(N, device=idx.device)).all())
    samples = F.grid_sample(x if same else x[idx], grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
    return F.avg_pool2d(samples, sr)


def roi_l1_loss(pred: torch.Tensor, target: torch.Tensor, boxes: dict[str, torch.Tensor],
                output_size: int = 32, weights: dict[str, float] | None = None) -> torch.Tensor:
    """Weighted L1 between RoI crops of ``pred`` and of ``target`` (the *same* boxes on both).

    Args:
        pred, target: (B, C, H, W).
        boxes: name -> (B, 4) pixel boxes ``(x0, y0, x1, y1)``, e.g. ``{"mouth": ..., "eye_l": ...}``.
    Returns:
        a scalar; an empty batch (B = 0) and no boxes at all (``boxes == {}``) give 0, still
        connected to ``pred`` (backward gives it a zero gradient).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred/target: shapes differ, {tuple(pred.shape)} vs "
                         f"{tuple(target.shape)}")
    if not boxes:           # the empty sum: 0, part of pred's graph
        return pred.flatten()[:0].sum()
    total = pred.new_zeros(())
    B = pred.shape[0]
    bidx = torch.arange(B, device=pred.device, dtype=pred.dtype)[:, None]
    for name, b in boxes.items():
        if b.shape != (B, 4):
            raise ValueError(f"boxes[{name!r}]: expected shape ({B}, 4), got {tuple(b.shape)}")
        rois = torch.cat([bidx, b.to(pred.dtype)], dim=1)
        w = 1.0 if weights is None else weights.get(name, 1.0)
        total = total + w * l1_or_zero(roi_align(pred, rois, output_size),
                                       roi_align(target, rois, output_size).detach())
    return total
