"""Metrics that need user-supplied pretrained weights, and the message shown without them.

pyface never downloads weights: each of these metrics reads a local file that the user passes
(``pyface eval ... --weights lpips=PATH``). :data:`METRICS_NEEDING_WEIGHTS` says, per metric
name, which file that is and where it comes from; :func:`require_weights` turns a missing or
non-existent path into a :class:`MissingWeightsError` with that text.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


class MissingWeightsError(ValueError):
    """A metric that needs pretrained weights was asked for without a usable weights file."""


@dataclass(frozen=True)
class WeightSpec:
    metric: str        # metric name as used in --metrics / the JSON (lpips, fid, kid, csim)
    what: str          # the network the file holds
    file: str          # the expected file (upstream's name)
    source: str        # where users get it
    formats: str = ".pth / .pt (read with torch.load(weights_only=True)) or .safetensors"


METRICS_NEEDING_WEIGHTS: dict[str, WeightSpec] = {
    "lpips": WeightSpec(
        "lpips",
        "the ImageNet backbone of LPIPS: torchvision's AlexNet (default; also VGG16 or "
        "SqueezeNet 1.1, detected from the file)",
        "alexnet-owt-7be5be79.pth (torchvision AlexNet_Weights.IMAGENET1K_V1); or "
        "vgg16-397923af.pth / squeezenet1_1-b8a52dc0.pth",
        "torchvision's model weights (torchvision.models.alexnet(weights='IMAGENET1K_V1') saves "
        "it under ~/.cache/torch/hub/checkpoints/). The linear heads are read from the installed "
        "`lpips` package (pip install lpips) or from --weights lpips_heads=PATH"),
    "fid": WeightSpec(
        "fid",
        "the FID Inception-v3 (TensorFlow 2015-12-05 graph ported to PyTorch by pytorch-fid)",
        "pt_inception-2015-12-05-6726825d.pth",
        "the pytorch-fid project's release assets (the file pytorch-fid itself downloads)"),
    "kid": WeightSpec(
        "kid",
        "the FID Inception-v3 (the same file as fid)",
        "pt_inception-2015-12-05-6726825d.pth",
        "the pytorch-fid project's release assets (the file pytorch-fid itself downloads)"),
    "csim": WeightSpec(
        "csim",
        "an ArcFace IResNet-100 (insightface arcface_torch; r50 / r34 / r18 also load)",
        "backbone.pth of an arcface_torch model, e.g. ms1mv3_arcface_r100_fp16",
        "insightface's arcface_torch model zoo (non-commercial research licence on the weights)"),
    "aed_id": WeightSpec(
        "aed_id",
        "the ArcFace IResNet of csim (the same file as csim)",
        "backbone.pth of an arcface_torch model, e.g. ms1mv3_arcface_r100_fp16",
        "insightface's arcface_torch model zoo (non-commercial research licence on the weights)"),
}


def missing_weights_message(metric: str, path: str | None = None) -> str:
    """The text telling the user what to pass for ``metric`` (``path``: what they passed)."""
    if metric not in METRICS_NEEDING_WEIGHTS:
        raise KeyError(f"metric: expected one of {sorted(METRICS_NEEDING_WEIGHTS)}, got "
                       f"{metric!r}")
    s = METRICS_NEEDING_WEIGHTS[metric]
    head = (f"metric {metric!r} needs {s.what}, and no weights file was given" if path is None
            else f"metric {metric!r}: weights file {path!r} does not exist")
    return (f"{head}. Pass --weights {metric}=PATH with PATH = {s.file} ({s.formats}); get it "
            f"from {s.source}. pyface never downloads weights.")


def require_weights(metric: str, path: str | None) -> str:
    """Return ``path`` if it names an existing file or folder, else raise MissingWeightsError."""
    if path is None or not os.path.exists(path):
        raise MissingWeightsError(missing_weights_message(metric, path))
    return path


def parse_weights(items) -> dict[str, str]:
    """``["lpips=PATH", "csim=PATH"]`` (the CLI's ``--weights``) -> ``{"lpips": PATH, ...}``.
    Keys: the metric names above, plus ``lpips_heads`` (the LPIPS linear-head file); fid and
    kid name one file, and so do csim and aed_id (either key sets both)."""
    from pyface.cli import parse_name_paths

    out = parse_name_paths(items, names=set(METRICS_NEEDING_WEIGHTS) | {"lpips_heads"})
    if "fid" in out and "kid" not in out:
        out["kid"] = out["fid"]      # the same Inception file
    elif "kid" in out and "fid" not in out:
        out["fid"] = out["kid"]
    if "csim" in out and "aed_id" not in out:
        out["aed_id"] = out["csim"]      # the same ArcFace file
    elif "aed_id" in out and "csim" not in out:
        out["csim"] = out["aed_id"]
    return out


def load_weighted_metric(metric: str, weights: dict[str, str], *,
                         device: str | None = None):
    """The network of ``metric`` built from ``weights`` (as from :func:`parse_weights`), frozen
    on ``device``: lpips -> ``LPIPS`` (call ``(x, y)``), fid / kid -> ``FIDInception`` (use
    ``.features``), csim / aed_id -> ``CSIM`` (aed_id uses ``.embed``). Raises
    MissingWeightsError without a usable file."""
    alias = {"fid": "kid", "kid": "fid", "csim": "aed_id", "aed_id": "csim"}.get(metric)
    path = require_weights(metric, weights.get(metric, weights.get(alias)))
    if metric == "lpips":
        from pyface.eval.lpips import LPIPS
        m = LPIPS(path, heads=weights.get("lpips_heads"))
    elif metric in ("fid", "kid"):
        from pyface.eval.fid import FIDInception
        m = FIDInception(path, metric=metric)
    else:
        from pyface.eval.identity import CSIM
        m = CSIM(path)
    return m.to(device) if device is not None else m
