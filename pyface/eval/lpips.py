# Provenance: reproduces the LPIPS metric of Zhang et al. 2018 as released in the `lpips` package
# (richzhang/PerceptualSimilarity, BSD-2-Clause) so that its shipped linear-head files
# (weights/v0.1/{alex,vgg,squeeze}.pth) load, and the feature layouts of torchvision's AlexNet,
# VGG16 and SqueezeNet 1.1 (pytorch/vision, BSD-3-Clause) so that their ImageNet state dicts load.
# Our own implementation, written from the paper and the upstreams' documented behaviour; no
# upstream code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""LPIPS (v0.1) with pyface's own backbones and user-supplied weights.

Protocol (identical to ``lpips.LPIPS(net=..., version='0.1')``, the paper's metric):

1. images ``(B, 3, H, W)`` in [-1, 1] are shifted and scaled per channel:
   ``(x - shift) / scale`` with shift = (-0.030, -0.088, -0.188), scale = (0.458, 0.448, 0.450);
2. the backbone's activations are taken after the ReLUs the paper uses
   (AlexNet: relu1..relu5; VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; SqueezeNet 1.1:
   the first ReLU and the outputs of the max-pool stages and Fire modules, 7 layers);
3. each activation is unit-normalised over channels (``f / (||f||_2 + 1e-10)``), the squared
   difference of the two images' activations is weighted by the layer's non-negative linear head
   (a 1x1 convolution to one channel), averaged over space, and summed over layers.

Weights: the backbone is a torchvision ImageNet state dict (``features.*`` keys; classifier keys
are ignored) given by the user; the heads are the ``lpips`` package's files, found in the
installed package (without importing it) or given by path. Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import torch
from torch import nn

from pyface.eval.weights import MissingWeightsError, missing_weights_message
from pyface.nn._pretrained import load_into, read_state

NETS = ("alex", "vgg", "squeeze")
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# indices into ``features`` after which an activation is tapped (torchvision's layer numbering)
TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29),
        "squeeze": (1, 4, 7, 9, 10, 11, 12)}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512),
            "squeeze": (64, 128, 256, 384, 384, 512, 512)}
TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                     "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def alexnet_features() -> nn.Sequential:
    """torchvision ``AlexNet.features`` (conv indices 0, 3, 6, 8, 10)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, 2))


def vgg16_features() -> nn.Sequential:
    """torchvision ``vgg16().features`` (configuration "D", no batch norm)."""
    mods, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"):
        if v == "M":
            mods.append(nn.MaxPool2d(2, 2))
        else:
            mods += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    return nn.Sequential(*mods)


class Fire(nn.Module):
    """SqueezeNet Fire module: squeeze 1x1, then concatenated expand 1x1 and 3x3 (ReLU each)."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], 1)


def squeezenet11_features() -> nn.Sequential:
    """torchvision ``squeezenet1_1().features``."""
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool(),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
        Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))


_BUILD = {"alex": alexnet_features, "vgg": vgg16_features, "squeeze": squeezenet11_features}


def detect_net(state: Mapping[str, torch.Tensor]) -> str:
    """Which backbone a torchvision state dict holds: 'alex', 'vgg' or 'squeeze'."""
    w0 = state.get("features.0.weight")
    if w0 is not None and tuple(w0.shape) == (64, 3, 11, 11):
        return "alex"
    if "features.3.squeeze.weight" in state:
        return "squeeze"
    if "features.28.weight" in state and "features.2.weight" in state:
        return "vgg"
    raise ValueError("backbone: not a torchvision AlexNet, VGG16 or SqueezeNet 1.1 state dict "
                     f"(first keys: {list(state)[:4]})")


class Backbone(nn.Module):
    """x: (B, 3, H, W), already LPIPS-scaled -> list of the tapped activations
    (B, C_l, H_l, W_l), C_l = CHANNELS[net][l]. ``features.*`` keys match torchvision."""

    def __init__(self, net: str):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net: expected one of {NETS}, got {net!r}")
        self.net = net
        self.features = _BUILD[net]()
        self.taps = TAPS[net]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, want = [], set(self.taps)
        for i, m in enumerate(self.features):
            x = m(x)
            if i in want:
                out.append(x)
            if i >= self.taps[-1]:
                break
        return out


def default_heads_path(net: str) -> str | None:
    """The linear-head file shipped in the installed ``lpips`` package, or None."""
    spec = importlib.util.find_spec("lpips")   # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", f"{net}.pth")
    return path if os.path.isfile(path) else None


def _as_state(x, what: str) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(x, Mapping):
        return dict(x), what
    return read_state(str(x)), str(x)


class LPIPS(nn.Module):
    """LPIPS distance. x, y: (B, 3, H, W) in [-1, 1] (H, W >= 32) -> (B,) float32.

    ``backbone``: torchvision state dict (path or mapping) of AlexNet / VGG16 / SqueezeNet 1.1;
    ``net`` is detected from it unless given. ``heads``: the ``lpips`` package's
    ``weights/v0.1/<net>.pth`` (path or mapping); default: the installed package's file."""

    def __init__(self, backbone, *, net: str | None = None, heads=None):
        super().__init__()
        if backbone is None or (isinstance(backbone, str) and not os.path.exists(backbone)):
            raise MissingWeightsError(missing_weights_message("lpips", backbone))
        state, src = _as_state(backbone, "LPIPS backbone state dict")
        found = detect_net(state)
        if net is not None and net != found:
            raise ValueError(f"net: {net!r} requested but {src} holds a {found!r} backbone")
        self.net_name = found
        self.backbone = Backbone(found)
        load_into(self.backbone, state, source=src,
                  rename=lambda k: k if k.startswith("features.") else None)
        if heads is None:
            heads = default_heads_path(found)
            if heads is None:
                raise MissingWeightsError(
                    f"metric 'lpips' needs the LPIPS linear heads weights/v0.1/{found}.pth: "
                    "install the `lpips` package (pip install lpips; its wheel ships them) or "
                    "pass --weights lpips_heads=PATH. pyface never downloads weights.")
        hstate, hsrc = _as_state(heads, "LPIPS heads state dict")
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS[found])
        load_into(self.heads, hstate, source=hsrc, rename=_head_key)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)   # a fixed metric

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise ValueError(f"x, y: expected equal shapes (B, 3, H, W), got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"x: expected H, W >= 32, got {tuple(x.shape[-2:])}")
        B = x.shape[0]
        z = (torch.cat([x, y]).float() - self.shift) / self.scale
        total = x.new_zeros(B, dtype=torch.float32)
        for f, head in zip(self.backbone(z), self.heads):
            f = f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + head((f[:B] - f[B:]).square()).mean((1, 2, 3))
        return total


def _head_key(k: str) -> str | None:
    # lpips files: lin<i>.model.1.weight (after a Dropout) or lin<i>.model.0.weight (without)
    parts = k.split(".")
    if len(parts) == 4 and parts[0].startswith("lin") and parts[1] == "model" and \
            parts[3] == "weight":
        return f"{parts[0][3:]}.weight"
    return None
