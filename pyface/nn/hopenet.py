# Provenance: reproduces the layout and output convention (not code) of Hopenet, "Fine-Grained
# Head Pose Estimation Without Keypoints" (Ruiz et al. 2018), natanielruiz/deep-head-pose
# (Apache-2.0): code/hopenet.py's Hopenet with torchvision's ResNet-50 Bottleneck, and the
# expected-angle read-out of its test scripts. Our own implementation, written from those facts;
# no upstream code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""Hopenet: a frozen head-pose network (ResNet-50 + three 66-bin angle heads).

Layout (upstream names in brackets, see :func:`hopenet_key`):

* backbone: :class:`pyface.nn.ResNetEncoder` ResNet-50 (``conv1``/``bn1`` stem, ``layer1``-
  ``layer4`` Bottlenecks [3, 4, 6, 3], stride on the 3x3 conv, ``downsample`` on each stage's
  first block), global average pooling (upstream: ``AvgPool2d(7)`` on the 7x7 map at 224^2);
* ``fc_yaw``, ``fc_pitch``, ``fc_roll``: Linear(2048, 66) logits over 3-degree bins;
* the angle of each head is the expected bin: ``sum(softmax(logits) * idx) * 3 - 99`` degrees
  (:func:`pyface.nn.motion.headpose_to_degrees`);
* upstream's ``fc_finetune`` (Linear(2051, 3)) is a vestigial layer its forward never uses; the
  converter drops it.

Input: RGB face crops; upstream resizes to 224, centre-crops 224 and normalises with the ImageNet
mean / std. :meth:`Hopenet.forward` takes images in [-1, 1] of any size and does the resize and
normalisation itself.

Angles: Hopenet's (yaw, pitch, roll) degrees are the ones face-vid2vid feeds to its rotation
``Rx(pitch) Ry(yaw) Rz(roll)``; that is the keypoint space of :mod:`pyface.nn.motion`, so
:meth:`Hopenet.rotation` is ``euler_to_rotation(pitch=, yaw=, roll=)``.
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn._pretrained import plain_state_dict
from pyface.nn.encoders import ResNetConfig, ResNetEncoder
from pyface.nn.motion import HEADPOSE_BINS, euler_to_rotation, headpose_to_degrees

__all__ = ["Hopenet", "hopenet_key", "hopenet_state", "load_hopenet", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Hopenet(nn.Module):
    """Hopenet head-pose network (see the module docstring).

    ``forward(image)``: image (B, 3, H, W) RGB in [-1, 1] -> dict: ``yaw``, ``pitch``, ``roll``
    (B, 66) logits and ``yaw_deg``, ``pitch_deg``, ``roll_deg`` (B,) degrees.
    ``rotation(image)`` -> (B, 3, 3) keypoint-space ``Rx(pitch) Ry(yaw) Rz(roll)``.
    """

    def __init__(self, input_size: int = 224):
        super().__init__()
        self.input_size = int(input_size)
        self.backbone = ResNetEncoder(ResNetConfig())        # ResNet-50
        d = self.backbone.cfg.widths[-1]
        self.fc_yaw = nn.Linear(d, HEADPOSE_BINS)
        self.fc_pitch = nn.Linear(d, HEADPOSE_BINS)
        self.fc_roll = nn.Linear(d, HEADPOSE_BINS)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image: expected shape (B, 3, H, W) RGB in [-1, 1], got "
                             f"{tuple(image.shape)}")
        x = (image + 1) / 2
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.input_size)
        x = (x - self.mean.to(x)) / self.std.to(x)
        f = self.backbone(x)
        out = {"yaw": self.fc_yaw(f), "pitch": self.fc_pitch(f), "roll": self.fc_roll(f)}
        for k in ("yaw", "pitch", "roll"):
            out[f"{k}_deg"] = headpose_to_degrees(out[k])
        return out

    def rotation(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) in [-1, 1] -> (B, 3, 3) keypoint-space rotation."""
        o = self(image)
        return euler_to_rotation(pitch=o["pitch_deg"], yaw=o["yaw_deg"], roll=o["roll_deg"])


_LAYER = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")


def hopenet_key(key: str) -> str | None:
    """An upstream Hopenet state-dict key -> the :class:`Hopenet` key, or None for the vestigial
    ``fc_finetune``. ``conv1``/``bn1`` -> ``backbone.stem.0``/``.1``; ``layerL.i.convJ`` /
    ``bnJ`` / ``downsample.N`` -> ``backbone.stages.(L-1).i.convJ`` / ``normJ`` / ``skip.N``;
    the three heads keep their names. Raises KeyError for anything else."""
    if key.startswith("fc_finetune."):
        return None
    if key.startswith(("fc_yaw.", "fc_pitch.", "fc_roll.")):
        return key
    if key.startswith("conv1."):
        return "backbone.stem.0." + key[len("conv1."):]
    if key.startswith("bn1."):
        return "backbone.stem.1." + key[len("bn1."):]
    m = _LAYER.match(key)
    if m:
        layer, block, rest = m.groups()
        rest = re.sub(r"^bn([123])\.", r"norm\1.", rest)
        rest = re.sub(r"^downsample\.([01])\.", r"skip.\1.", rest)
        if re.match(r"^(conv[123]|norm[123]|skip\.[01])\.", rest):
            return f"backbone.stages.{int(layer) - 1}.{block}.{rest}"
    raise KeyError(key)


def hopenet_state(raw, where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An upstream Hopenet state dict (bare, under ``state_dict``, or with ``module.`` prefixes)
    -> (:class:`Hopenet` state dict, dropped upstream keys). BatchNorm ``num_batches_tracked``
    counters are filled in when the file predates them. Every key and shape is checked; a
    :class:`pyface.nn.Hopenet` folder's own keys pass through unchanged."""
    from pyface.checkpoint import CheckpointError, check_state_dict

    raw = plain_state_dict(raw, where)
    state, dropped, unknown = {}, [], []
    for k, v in raw.items():
        if k.startswith("backbone."):          # already pyface-named
            state[k] = v
            continue
        try:
            new = hopenet_key(k)
        except KeyError:
            unknown.append(k)
            continue
        if new is None:
            dropped.append(k)
        else:
            state[new] = v
    if unknown:
        raise CheckpointError(f"{where}: not a Hopenet state dict; unexpected keys "
                              f"{', '.join(unknown[:6])}" +
                              (f" ... ({len(unknown)} in all)" if len(unknown) > 6 else ""))
    with torch.device("meta"):
        module = Hopenet()
    for k in module.state_dict():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    check_state_dict(module, state, f"{where} (Hopenet)")
    return state, dropped


def load_hopenet(path: str, *, device: str | torch.device = "cpu") -> Hopenet:
    """A ``pyface convert hopenet`` folder, or upstream's ``.pkl`` / ``.pth`` state dict (read
    with ``torch.load(weights_only=True)``) -> :class:`Hopenet` in eval mode with frozen
    parameters, loaded strictly. Nothing is downloaded."""
    from pyface.checkpoint import load_module_state, load_weights, load_weights_file

    if not path:
        raise ValueError("path: expected a Hopenet weights file or a `pyface convert hopenet` "
                         "folder, got an empty path")
    if os.path.isdir(path):
        state, _ = load_weights(path, kind="hopenet", device="cpu")
    else:
        state, _ = hopenet_state(load_weights_file(path), path)
    model = Hopenet()
    load_module_state(model, state, f"{path} (Hopenet)")
    model.requires_grad_(False)
    return model.eval().to(device)
