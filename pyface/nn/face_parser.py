# Provenance: reproduces the BiSeNet face-parsing network layout of face-parsing.PyTorch
# (zllrunning/face-parsing.PyTorch, commit d2e684c, MIT licence), whose parameter names and shapes
# follow its released ``79999_iter.pth`` (CelebAMask-HQ, 19 classes), and the expression-region
# mask GOHA (NVlabs/GOHA, commit 102abbf, NVIDIA Source Code License) builds from it. BiSeNet is
# Yu et al., ECCV 2018. Our own implementation, written from the papers and the upstream's
# documented behaviour; no upstream code is copied. pyface's code is licensed under Apache-2.0
# (LICENSE).
"""Face parser: BiSeNet in face-parsing.PyTorch's layout (19 CelebAMask-HQ classes).

* Context path ``cp``: ResNet-18 (``cp.resnet``: 7x7/2 stem, max-pool, four stages of two basic
  blocks: features at 1/8 (128 ch), 1/16 (256) and 1/32 (512)); a global-average branch
  (``conv_avg``), attention refinement (``arm32`` on 1/32, ``arm16`` on 1/16: conv-BN-ReLU, then
  a channel gate sigmoid(BN(1x1 conv(global mean)))), nearest up-sampling and ``conv_head32`` /
  ``conv_head16`` (conv-BN-ReLU) -> context features at 1/8 and 1/16 (128 ch each).
* Spatial path: as in face-parsing.PyTorch, the ResNet's 1/8 feature (stage 2, 128 ch) stands in
  for BiSeNet's three-convolution spatial path (no separate ``sp`` weights).
* Feature fusion ``ffm``: concat(spatial, context 1/8) -> conv-BN-ReLU 1x1 (256) ->
  ``x + x * sigmoid(conv2(relu(conv1(mean(x)))))``.
* Heads ``conv_out`` (on the fusion), ``conv_out16`` / ``conv_out32`` (auxiliary, on the 1/8 and
  1/16 context features): conv-BN-ReLU 3x3 then 1x1 to the classes, bilinearly up-sampled
  (align_corners=True) to the input size.

Classes (face-parsing.PyTorch / CelebAMask-HQ order): see :data:`FACE_PARSER_CLASSES`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn._pretrained import plain_state_dict

FACE_PARSER_CLASSES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g",
                       "l_ear", "r_ear", "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck",
                       "neck_l", "cloth", "hair", "hat")
BROWS, EYES, MOUTH, LIPS = (2, 3), (4, 5), (11,), (12, 13)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        r = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(s + r)


class _ResNet18(nn.Module):
    """x (B, 3, H, W) -> features at 1/8 (B, 128), 1/16 (B, 256), 1/32 (B, 512)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = (64, 64, 128, 256, 512)
        for i in range(1, 5):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(_BasicBlock(widths[i - 1], widths[i], stride),
                                                     _BasicBlock(widths[i], widths[i])))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


class _AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, cout, 3, 1, 1)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        gate = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))
        return feat * gate


class _ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = _ResNet18()
        self.arm16 = _AttentionRefinement(256, 128)
        self.arm32 = _AttentionRefinement(512, 128)
        self.conv_head32 = _ConvBNReLU(128, 128, 3, 1, 1)
        self.conv_head16 = _ConvBNReLU(128, 128, 3, 1, 1)
        self.conv_avg = _ConvBNReLU(512, 128, 1, 1, 0)

    def forward(self, x):
        f8, f16, f32 = self.resnet(x)
        avg = self.conv_avg(f32.mean(dim=(2, 3), keepdim=True))        # broadcast = nearest up
        up32 = F.interpolate(self.arm32(f32) + avg, size=f16.shape[-2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(f16) + up32, size=f8.shape[-2:], mode="nearest")
        up16 = self.conv_head16(up16)
        return f8, up16, up32


class _FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = _ConvBNReLU(cin, cout, 1, 1, 0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
        return feat + feat * gate


class _Head(nn.Module):
    def __init__(self, cin: int, mid: int, n_classes: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, mid, 3, 1, 1)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


@dataclass
class FaceParserConfig:
    num_classes: int = 19
    input_range: str = "[-1,1]"   # "[-1,1]" (pyface images) or "imagenet" (already normalised)
    size: int = 512               # parse(): resolution the network runs at (its training size)

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"FaceParserConfig.num_classes: expected >= 1, got "
                             f"{self.num_classes}")
        if self.input_range not in ("[-1,1]", "imagenet"):
            raise ValueError("FaceParserConfig.input_range: expected '[-1,1]' or 'imagenet', "
                             f"got {self.input_range!r}")


class FaceParser(nn.Module):
    """BiSeNet face parser (face-parsing.PyTorch layout; ``79999_iter.pth`` loads unchanged).

    forward(x (B, 3, H, W), aux=False) -> logits (B, num_classes, H, W); with ``aux`` also the
    two auxiliary heads' logits (same shape; for training). ``x`` is in [-1, 1] (normalised to
    ImageNet statistics inside) unless ``input_range="imagenet"``; H, W >= 32.
    parse(x (B, 3, H, W)) -> labels (B, H, W) int64, running the network at ``size``."""

    def __init__(self, cfg: FaceParserConfig | None = None, **overrides):
        super().__init__()
        self.cfg = cfg = cfg or FaceParserConfig(**overrides)
        self.cp = _ContextPath()
        self.ffm = _FeatureFusion(256, 256)
        self.conv_out = _Head(256, 256, cfg.num_classes)
        self.conv_out16 = _Head(128, 64, cfg.num_classes)
        self.conv_out32 = _Head(128, 64, cfg.num_classes)

    def forward(self, x: torch.Tensor, aux: bool = False):
        if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 32:
            raise ValueError(f"x: expected shape (B, 3, H, W) with H, W >= 32, got "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point image in [-1, 1] (or ImageNet-"
                            f"normalised), got dtype {str(x.dtype).replace('torch.', '')}")
        if self.cfg.input_range == "[-1,1]":
            mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = ((x + 1) * 0.5 - mean) / std
        size = x.shape[-2:]
        f8, c8, c16 = self.cp(x)
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=True)  # noqa
        out = up(self.conv_out(self.ffm(f8, c8)))
        if not aux:
            return out
        return out, up(self.conv_out16(c8)), up(self.conv_out32(c16))

    @torch.no_grad()
    def parse(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected shape (B, 3, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        s = self.cfg.size
        if (H, W) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                              antialias=True)
        logits = self(x)
        if (H, W) != (s, s):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        return logits.argmax(dim=1)


def dilate_mask(mask: torch.Tensor, kernel: int = 7, iterations: int = 1) -> torch.Tensor:
    """Binary dilation by a ``kernel`` x ``kernel`` square, ``iterations`` times (like OpenCV's
    ``dilate`` with its default border: outside the image never sets a pixel).
    mask: (B, C, H, W) float in [0, 1] -> same shape (grey values: the local maximum)."""
    _check_morph(mask, kernel, iterations)
    for _ in range(iterations):
        mask = F.max_pool2d(mask, kernel, 1, kernel // 2)
    return mask


def erode_mask(mask: torch.Tensor, kernel: int = 7, iterations: int = 1) -> torch.Tensor:
    """Binary erosion by a ``kernel`` x ``kernel`` square, ``iterations`` times (OpenCV's default
    border: outside the image never clears a pixel). GOHA erodes the appearance branch's source
    mask once by 7x7. mask: (B, C, H, W) float in [0, 1] -> same shape (the local minimum)."""
    _check_morph(mask, kernel, iterations)
    for _ in range(iterations):
        mask = -F.max_pool2d(-mask, kernel, 1, kernel // 2)
    return mask


def _check_morph(mask, kernel, iterations):
    if mask.ndim != 4 or not mask.is_floating_point():
        raise ValueError(f"mask: expected a float tensor of shape (B, C, H, W), got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if kernel < 1 or kernel % 2 == 0 or iterations < 0:
        raise ValueError(f"kernel: expected an odd size >= 1 and iterations >= 0, got {kernel}, "
                         f"{iterations}")


def expression_region_mask(parsing: torch.Tensor, dilate_eyes: int = 2,
                           kernel: int = 7) -> torch.Tensor:
    """GOHA's expression-region mask from face-parsing labels: brows, eyes, mouth and both lips;
    the eyes are dilated ``dilate_eyes`` times by a ``kernel`` x ``kernel`` square (GOHA: twice,
    7x7). The canonical branch sees ``image * (1 - mask)``.

    parsing: (B, H, W) or (B, 1, H, W) integer labels (:data:`FACE_PARSER_CLASSES` order)
    -> mask (B, 1, H, W) float32 in {0, 1}."""
    if parsing.ndim == 4 and parsing.shape[1] == 1:
        parsing = parsing[:, 0]
    if parsing.ndim != 3 or parsing.is_floating_point() or parsing.is_complex():
        raise ValueError(f"parsing: expected integer labels of shape (B, H, W) or (B, 1, H, W), "
                         f"got {parsing.dtype} {tuple(parsing.shape)}")
    if dilate_eyes < 0 or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"dilate_eyes >= 0 and an odd kernel >= 1 expected, got {dilate_eyes}, "
                         f"{kernel}")
    eyes = dilate_mask(region_mask(parsing, EYES), kernel, dilate_eyes)
    return torch.maximum(region_mask(parsing, BROWS + MOUTH + LIPS), eyes)


def region_mask(parsing: torch.Tensor, classes) -> torch.Tensor:
    """Pixels whose label is one of ``classes`` (indices or :data:`FACE_PARSER_CLASSES` names).
    parsing: (B, H, W) or (B, 1, H, W) integer labels -> (B, 1, H, W) float32 in {0, 1}."""
    if parsing.ndim == 4 and parsing.shape[1] == 1:
        parsing = parsing[:, 0]
    if parsing.ndim != 3 or parsing.is_floating_point() or parsing.is_complex():
        raise ValueError(f"parsing: expected integer labels of shape (B, H, W) or (B, 1, H, W), "
                         f"got {parsing.dtype} {tuple(parsing.shape)}")
    ids = []
    for c in classes:
        if isinstance(c, str):
            if c not in FACE_PARSER_CLASSES:
                raise ValueError(f"classes: unknown class {c!r}; expected one of "
                                 f"{', '.join(FACE_PARSER_CLASSES)}")
            c = FACE_PARSER_CLASSES.index(c)
        ids.append(int(c))
    out = torch.zeros_like(parsing, dtype=torch.bool)
    for c in ids:
        out |= parsing == c
    return out.unsqueeze(1).float()


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def face_parser_state(raw, where: str) -> dict[str, torch.Tensor]:
    """A face-parsing.PyTorch state dict (bare, under ``state_dict``, or with ``module.``
    prefixes) -> FaceParser keys; BatchNorm ``num_batches_tracked`` counters are filled in when
    the file predates them. Checks every key and shape."""
    from pyface.checkpoint import CheckpointError, check_state_dict

    raw = plain_state_dict(raw, where)
    head = raw.get("conv_out.conv_out.weight")
    if head is None or head.ndim != 4:
        raise CheckpointError(f"{where}: not a face-parsing BiSeNet state dict; missing "
                              "'conv_out.conv_out.weight' (num_classes, 256, 1, 1)")
    with torch.device("meta"):
        module = FaceParser(num_classes=int(head.shape[0]))
    state = dict(raw)
    for k, v in module.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    check_state_dict(module, state, f"{where} (face-parsing BiSeNet)")
    return state


def load_face_parser(path: str, *, device: str | torch.device = "cpu") -> FaceParser:
    """A ``pyface convert face-parser`` folder, or face-parsing.PyTorch's ``79999_iter.pth``
    (read with ``torch.load(weights_only=True)``) -> :class:`FaceParser` in eval mode, loaded
    strictly."""
    from pyface.checkpoint import load_module_state, load_weights, load_weights_file

    if os.path.isdir(path):
        state, meta = load_weights(path, kind="face_parser", device="cpu")
        cfg = FaceParserConfig(**meta.get("config", {}))
    else:
        state = face_parser_state(load_weights_file(path), path)
        cfg = FaceParserConfig(num_classes=int(state["conv_out.conv_out.weight"].shape[0]))
    model = FaceParser(cfg)
    load_module_state(model, state, f"{path} (FaceParser)")
    return model.eval().to(device)
