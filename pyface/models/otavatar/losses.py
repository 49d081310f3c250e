# Provenance: reproduces the semantics of OTAvatar's training losses (theEricMa/OTAvatar, commit
# c8c484f, CC BY-NC-SA 4.0; trainers/otavatar_trainer.py and its loss modules) as documented in
# shared/reference/specs/otavatar-goha.md section 1.1: VGG19 perceptual + Gram, SmoothL1, mouth
# and eye RoI L1 (the reference's eye-RoI bug kept behind a flag), ArcFace identity. Our own
# implementation; no upstream code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""OTAvatar's reconstruction losses on one rendered batch.

:class:`OTAvatarLoss` ``(out, target, landmarks, sr=...)``: ``out`` is the generator's dict
(``image_raw`` (N, 3, r, r), optionally ``image`` (N, 3, H, W)), ``target`` (N, 3, R, R) in
[-1, 1], ``landmarks`` (N, 68, 2) pixels at R or None. Targets are area-resized to each
prediction's size, landmarks scaled with them.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn.roi import roi_align
from pyface.train.model import check_choice

log = logging.getLogger("pyface.models.otavatar")

MOUTH = slice(48, 68)
EYE_L = slice(36, 42)
EYE_R = slice(42, 48)


def landmark_box(landmarks: torch.Tensor, part: slice, size: float, pad: float) -> torch.Tensor:
    """landmarks (N, 68, 2) pixels -> (N, 4) boxes x0, y0, x1, y1: a square of side ``size``
    centred on the landmarks' bounding-box centre, grown by ``pad`` on each side."""
    if landmarks.dim() != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmarks: expected shape (N, 68, 2), got {tuple(landmarks.shape)}")
    p = landmarks[:, part].float()
    c = (p.min(1).values + p.max(1).values) / 2
    half = size / 2 + pad
    return torch.cat([c - half, c + half], dim=-1)


#: the reference's RoIs (``loss/local.py``): part, padding in pixels per 512 of image size and
#: the roi_align output size (fixed, whatever the image size)
ROI_PARTS = (("mouth", MOUTH, 10, 120), ("eye_l", EYE_L, 20, 80), ("eye_r", EYE_R, 20, 80))
#: ``roi_box``: "landmarks", the reference's boxes (:data:`ROI_PARTS`); "square", a 120/512 H
#: square around each part's centre with int(10/512 H) padding, resampled to round(120/512 H)
#: bins (at least 4): pyface's earlier boxes, which ``tiny`` keeps (measured better there)
ROI_BOXES = ("landmarks", "square")


def landmark_bbox(landmarks: torch.Tensor, part: slice, pad: int) -> torch.Tensor:
    """landmarks (N, 68, 2) pixels -> (N, 4) boxes x0, y0, x1, y1: the bounding box of the
    part's landmarks (coordinates truncated to whole pixels, as the reference does), grown by
    ``pad`` pixels on each side (OTAvatar's RoI)."""
    if landmarks.dim() != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmarks: expected shape (N, 68, 2), got {tuple(landmarks.shape)}")
    p = landmarks[:, part].float().trunc()
    return torch.cat([p.min(1).values - pad, p.max(1).values + pad], dim=-1)


def _area(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


def _pyramid_l1(pred: torch.Tensor, target: torch.Tensor, scales: int) -> torch.Tensor:
    total = pred.new_zeros(())
    for s in range(scales):
        if s:
            pred, target = F.avg_pool2d(pred, 2), F.avg_pool2d(target, 2)
        total = total + (pred - target).abs().mean()
        if pred.shape[-1] < 4:
            break
    return total


class OTAvatarLoss(nn.Module):
    """Perceptual (VGG19 + Gram, or the image-pyramid L1 that replaces it without weights),
    SmoothL1, mouth / eye RoI L1 and the ArcFace identity term
    (:class:`pyface.nn.arcface18.ArcFaceIdentityLoss`, with ``arcface_weights``) of one rendered
    batch (see the module docstring).

    Args: the ``w_*`` weights, ``style_weight``, ``vgg_weights``, ``eye_roi_bug`` and
    ``arcface_weights`` of :class:`~pyface.models.otavatar.config.OTAvatarConfig`; ``warn``:
    log the training warnings about missing weights (the inference pipeline says what they
    mean for its inversion instead). :meth:`missing_terms` names the terms that run without
    their weights.
    """

    RAW_SCALES = 2
    SR_SCALES = 4

    def __init__(self, *, w_perceptual: float = 1.0, style_weight: float = 250.0,
                 vgg_weights: str | None = None, w_smooth_l1: float = 1.0,
                 w_mouth: float = 10.0, w_eyes: float = 10.0, eye_roi_bug: bool = False,
                 w_identity: float = 1.0, arcface_weights: str | None = None,
                 warn: bool = True, roi_box: str = "landmarks", raw_terms: bool = True):
        super().__init__()
        check_choice("roi_box", roi_box, ROI_BOXES)
        self.w_perceptual, self.w_smooth_l1 = w_perceptual, w_smooth_l1
        self.w_mouth, self.w_eyes, self.eye_roi_bug = w_mouth, w_eyes, eye_roi_bug
        self.roi_box, self.raw_terms = roi_box, raw_terms
        self.vgg = {}
        if vgg_weights and w_perceptual:
            from pyface.nn.vgg import PerceptualLoss

            for name, scales in (("raw", self.RAW_SCALES), ("sr", self.SR_SCALES)):
                p = PerceptualLoss(weights=vgg_weights, scales=[0.5 ** i for i in range(scales)],
                                   style_weight=style_weight, style_scales=1).eval()
                p.requires_grad_(False)
                self.vgg[name] = p          # plain dict: not part of the model's state dict
        elif w_perceptual and warn:
            log.warning("otavatar: model.vgg_weights is not set; the VGG19 perceptual loss "
                        "(and its Gram term) is replaced by an image-pyramid L1 (2 scales on the "
                        "raw render, 4 on the super-resolved image)")
        self.w_identity = w_identity if arcface_weights else 0.0
        self.arcface = {}
        if arcface_weights and w_identity:
            from pyface.nn.arcface18 import ArcFaceIdentityLoss

            # plain dict: the frozen network is not part of the model's state dict
            self.arcface["net"] = ArcFaceIdentityLoss(weights=arcface_weights)
        self._identity_off = bool(w_identity and not arcface_weights)
        if self._identity_off and warn:
            log.warning("otavatar: model.arcface_weights is not set; the ArcFace identity loss "
                        "is disabled")

    def missing_terms(self) -> list[str]:
        """The terms that run without their weights: ``"vgg"`` (the VGG19 perceptual term,
        replaced by an image-pyramid L1) and ``"arcface"`` (the identity term, off)."""
        return ((["vgg"] if self.w_perceptual and not self.vgg else [])
                + (["arcface"] if self._identity_off else []))

    def _perceptual(self, pred: torch.Tensor, target: torch.Tensor, which: str) -> torch.Tensor:
        if which in self.vgg:
            p = self.vgg[which]
            if next(p.parameters()).device != pred.device:
                p.to(pred.device)
            return p(pred, target)
        return _pyramid_l1(pred, target, self.RAW_SCALES if which == "raw" else self.SR_SCALES)

    def roi(self, pred: torch.Tensor, target: torch.Tensor, landmarks: torch.Tensor,
            ) -> dict[str, torch.Tensor]:
        """Mouth and eye RoI L1 of pred / target (N, 3, H, W), landmarks (N, 68, 2) at H: the
        landmarks' bounding boxes grown by int(10/512 H) (mouth) / int(20/512 H) (eyes),
        resampled to 120 / 80 bins (:data:`ROI_PARTS`)."""
        H = pred.shape[-1]
        N = pred.shape[0]
        bidx = torch.arange(N, device=pred.device, dtype=pred.dtype)[:, None]
        out = {}
        for name, part, pad, out_size in ROI_PARTS:
            if self.roi_box == "square":
                size = 120 / 512 * H
                box = landmark_box(landmarks, part, size, int(10 / 512 * H))
                out_size = max(4, round(size))
            else:
                box = landmark_bbox(landmarks, part, int(pad / 512 * H))
            rois = torch.cat([bidx, box.to(pred.dtype)], 1)
            crop_t = roi_align(target, rois, out_size).detach()
            # the reference cuts the predicted eye crops from the target (eye_roi_bug)
            src = target if (self.eye_roi_bug and name != "mouth") else pred
            out[name] = F.l1_loss(roi_align(src, rois, out_size), crop_t)
        return out

    def forward(self, out: dict, target: torch.Tensor, landmarks: torch.Tensor | None, *,
                sr: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (total loss, detached terms). ``sr``: also the terms on ``out["image"]``."""
        if target.dim() != 4 or target.shape[1] != 3:
            raise ValueError(f"target: expected shape (N, 3, R, R), got {tuple(target.shape)}")
        R = target.shape[-1]
        total = target.new_zeros(())
        logs = {}
        preds = [("raw", out["image_raw"])] + ([("sr", out["image"])] if sr else [])
        for which, pred in preds:
            pred = pred.float()
            H = pred.shape[-1]
            tgt = _area(target.float(), H)
            if self.w_perceptual:
                p = self._perceptual(pred, tgt, which)
                total = total + self.w_perceptual * p
                logs[f"perceptual_{which}"] = p.detach()
            if self.w_smooth_l1:
                s = F.smooth_l1_loss(pred, tgt)
                total = total + self.w_smooth_l1 * s
                logs[f"smooth_l1_{which}"] = s.detach()
            # RoI and identity terms on every image of the pass, summed (the reference adds
            # them on the raw render and, in the super-resolved passes, on the SR output);
            # raw_terms=False: on the pass's final image only
            if not self.raw_terms and sr and which == "raw":
                continue
            if landmarks is not None and (self.w_mouth or self.w_eyes):
                r = self.roi(pred, tgt, landmarks.float() * (H / R))
                eyes = r["eye_l"] + r["eye_r"]
                total = total + self.w_mouth * r["mouth"] + self.w_eyes * eyes
                logs["mouth"] = logs.get("mouth", 0) + r["mouth"].detach()
                logs["eyes"] = logs.get("eyes", 0) + eyes.detach()
            if landmarks is not None and self.w_identity:
                net = self.arcface["net"]
                if next(net.parameters()).device != pred.device:
                    net.to(pred.device)
                ident = net(pred, tgt, landmarks.float() * (H / R))
                total = total + self.w_identity * ident
                logs["identity"] = logs.get("identity", 0) + ident.detach()
        return total, logs
