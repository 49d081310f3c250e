# Provenance: reproduces the network layout of MODNet (ZHKKKe/MODNet, Apache-2.0; Ke et al.,
# "MODNet: Real-Time Trimap-Free Portrait Matting via Objective Decomposition", AAAI 2022), whose
# parameter names and shapes follow its released ``modnet_photographic_portrait_matting.ckpt``
# (a ``torch.nn.DataParallel`` state dict), and its documented inference recipe. Our own
# implementation, written from the paper and the upstream's documented structure; no upstream code
# is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""MODNet portrait matting (trimap-free): image -> alpha matte.

Structure (``hr`` = 32 channels, encoder widths 16, 24, 32, 96, 1280 at 1/2 ... 1/32):

* ``backbone.model.features``: MobileNetV2 (width 1.0, expansion 6): a 3x3/2 conv-BN-ReLU6 stem
  (32), seventeen inverted residual blocks (``t, c, n, s`` = 1,16,1,1 / 6,24,2,2 / 6,32,3,2 /
  6,64,4,2 / 6,96,3,1 / 6,160,3,2 / 6,320,1,1; expansion-1 blocks have no 1x1 expansion conv;
  a residual where stride 1 and widths agree) and a 1x1 conv-BN-ReLU6 to 1280. Features after
  indices 1, 3, 6, 13 and 18 are the encoder outputs at 1/2, 1/4, 1/8, 1/16 and 1/32.
* ``lr_branch`` (semantic, 1/8): squeeze-excitation on the 1/32 feature (1280 -> 320 -> 1280, no
  biases), x2 bilinear up, 5x5 conv to 96, x2 up, 5x5 conv to 32 (``lr8x``); ``conv_lr`` (3x3/2
  to one channel) gives the training-time semantic output only.
* ``hr_branch`` (detail, 1/4 then 1/2): the 1/2 and 1/4 encoder features reduced to 32 channels,
  concatenated with the image at 1/2 and 1/4 and with ``lr8x`` up-sampled, three then four 3x3
  convs; ``conv_hr`` gives the training-time detail output only.
* ``f_branch`` (fusion): ``lr8x`` up x2, 5x5 conv (32), up x2, concat with the detail feature,
  3x3 conv (32), up x2, concat with the image, 3x3 conv (16), 1x1 conv (1), sigmoid -> matte.

Every conv of the branches is ``layers.0`` (conv with bias) + ``layers.1`` (IBNorm: BatchNorm on
the first half of the channels, affine-free InstanceNorm on the second half) + ReLU, except the
three output convs (conv only). Up/down-sampling is bilinear (``align_corners=False``).

Input: ``(B, 3, H, W)`` in [-1, 1] (the upstream normalises with mean 0.5, std 0.5), H and W
multiples of 32. :func:`matte_image` applies the upstream's resizing recipe to a uint8 image.

The released checkpoint holds the MobileNetV2 weights twice (``backbone.*`` and
``lr_branch.backbone.*``: one module referenced by both); :func:`modnet_state` checks the two
copies agree and keeps one.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn._pretrained import plain_state_dict

#: MobileNetV2 inverted-residual settings (expansion t, width c, repeats n, first stride s).
MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
ENC_CHANNELS = (16, 24, 32, 96, 1280)
_STAGE_ENDS = (2, 4, 7, 14, 19)          # feature indices after which the encoder outputs are taken
REF_SIZE = 512                            # the upstream inference recipe's reference short side


class _IBNorm(nn.Module):
    """BatchNorm on the first half of the channels, InstanceNorm (no affine) on the rest."""

    def __init__(self, channels: int):
        super().__init__()
        if channels % 2:
            raise ValueError(f"channels: expected an even number, got {channels}")
        self.half = channels // 2
        self.bnorm = nn.BatchNorm2d(self.half)
        self.inorm = nn.InstanceNorm2d(channels - self.half, affine=False)

    def forward(self, x):
        return torch.cat([self.bnorm(x[:, :self.half]), self.inorm(x[:, self.half:])], 1)


class _ConvIBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, norm_act: bool = True):
        super().__init__()
        mods = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=True)]
        if norm_act:
            mods += [_IBNorm(cout), nn.ReLU()]
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU6()]


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = int(round(cin * expansion))
        self.residual = stride == 1 and cin == cout
        mods = [] if expansion == 1 else _conv_bn_relu6(cin, hidden, 1)
        mods += _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        mods += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*mods)

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y


class _MobileNetV2(nn.Module):
    def __init__(self, in_channels: int = 3):
        super().__init__()
        feats = [nn.Sequential(*_conv_bn_relu6(in_channels, 32, 3, 2))]
        cin = 32
        for t, c, n, s in MOBILENETV2_SETTINGS:
            for i in range(n):
                feats.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(nn.Sequential(*_conv_bn_relu6(cin, 1280, 1)))
        self.features = nn.Sequential(*feats)


class _Backbone(nn.Module):
    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.model = _MobileNetV2(in_channels)

    def forward(self, x) -> list[torch.Tensor]:
        out, start = [], 0
        for end in _STAGE_ENDS:
            for i in range(start, end):
                x = self.model.features[i](x)
            out.append(x)
            start = end
        return out


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(),
                                nn.Linear(channels // reduction, channels, bias=False), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


def _up2(x):
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def _down(x, k):
    return F.interpolate(x, scale_factor=1.0 / k, mode="bilinear", align_corners=False)


class _LRBranch(nn.Module):
    def __init__(self, enc=ENC_CHANNELS):
        super().__init__()
        self.se_block = _SqueezeExcite(enc[4], 4)
        self.conv_lr16x = _ConvIBNReLU(enc[4], enc[3], 5)
        self.conv_lr8x = _ConvIBNReLU(enc[3], enc[2], 5)
        self.conv_lr = _ConvIBNReLU(enc[2], 1, 3, stride=2, norm_act=False)

    def forward(self, enc32x):
        lr8x = self.conv_lr8x(_up2(self.conv_lr16x(_up2(self.se_block(enc32x)))))
        return lr8x


class _HRBranch(nn.Module):
    def __init__(self, hr: int = 32, enc=ENC_CHANNELS):
        super().__init__()
        self.tohr_enc2x = _ConvIBNReLU(enc[0], hr, 1)
        self.conv_enc2x = _ConvIBNReLU(hr + 3, hr, 3, stride=2)
        self.tohr_enc4x = _ConvIBNReLU(enc[1], hr, 1)
        self.conv_enc4x = _ConvIBNReLU(2 * hr, 2 * hr, 3)
        self.conv_hr4x = nn.Sequential(_ConvIBNReLU(3 * hr + 3, 2 * hr, 3),
                                       _ConvIBNReLU(2 * hr, 2 * hr, 3),
                                       _ConvIBNReLU(2 * hr, hr, 3))
        self.conv_hr2x = nn.Sequential(_ConvIBNReLU(2 * hr, 2 * hr, 3), _ConvIBNReLU(2 * hr, hr, 3),
                                       _ConvIBNReLU(hr, hr, 3), _ConvIBNReLU(hr, hr, 3))
        self.conv_hr = nn.Sequential(_ConvIBNReLU(hr + 3, hr, 3),
                                     _ConvIBNReLU(hr, 1, 1, norm_act=False))

    def forward(self, img, enc2x, enc4x, lr8x):
        e2 = self.tohr_enc2x(enc2x)
        hr4x = self.conv_enc2x(torch.cat([_down(img, 2), e2], 1))
        hr4x = self.conv_enc4x(torch.cat([hr4x, self.tohr_enc4x(enc4x)], 1))
        hr4x = self.conv_hr4x(torch.cat([hr4x, _up2(lr8x), _down(img, 4)], 1))
        return self.conv_hr2x(torch.cat([_up2(hr4x), e2], 1))


class _FusionBranch(nn.Module):
    def __init__(self, hr: int = 32, enc=ENC_CHANNELS):
        super().__init__()
        self.conv_lr4x = _ConvIBNReLU(enc[2], hr, 5)
        self.conv_f2x = _ConvIBNReLU(2 * hr, hr, 3)
        self.conv_f = nn.Sequential(_ConvIBNReLU(hr + 3, hr // 2, 3),
                                    _ConvIBNReLU(hr // 2, 1, 1, norm_act=False))

    def forward(self, img, lr8x, hr2x):
        lr2x = _up2(self.conv_lr4x(_up2(lr8x)))
        f2x = self.conv_f2x(torch.cat([lr2x, hr2x], 1))
        return torch.sigmoid(self.conv_f(torch.cat([_up2(f2x), img], 1)))


class MODNet(nn.Module):
    """MODNet (see the module docstring). ``forward(img: (B, 3, H, W) in [-1, 1])`` -> matte
    ``(B, 1, H, W)`` in [0, 1]; H, W multiples of 32. ``forward(img, all_outputs=True)`` also
    returns the training-time semantic ``(B, 1, H/16, W/16)`` and detail ``(B, 1, H, W)``
    predictions: ``(semantic, detail, matte)``."""

    def __init__(self, hr_channels: int = 32):
        super().__init__()
        self.backbone = _Backbone(3)
        self.lr_branch = _LRBranch()
        self.hr_branch = _HRBranch(hr_channels)
        self.f_branch = _FusionBranch(hr_channels)

    def forward(self, img: torch.Tensor, all_outputs: bool = False):
        if img.dim() != 4 or img.shape[1] != 3 or img.shape[2] % 32 or img.shape[3] % 32 \
                or img.shape[2] == 0 or img.shape[3] == 0:
            raise ValueError(f"img: expected shape (B, 3, H, W) with H, W positive multiples of "
                             f"32, got {tuple(img.shape)}")
        enc2x, enc4x, _, _, enc32x = self.backbone(img)
        lr8x = self.lr_branch(enc32x)
        hr2x = self.hr_branch(img, enc2x, enc4x, lr8x)
        matte = self.f_branch(img, lr8x, hr2x)
        if not all_outputs:
            return matte
        semantic = torch.sigmoid(self.lr_branch.conv_lr(lr8x))
        detail = torch.sigmoid(self.hr_branch.conv_hr(torch.cat([_up2(hr2x), img], 1)))
        return semantic, detail, matte


def inference_size(h: int, w: int, ref: int = REF_SIZE) -> tuple[int, int]:
    """The network input size of an ``h x w`` image in the upstream's recipe: images whose
    longer side is below ``ref`` or whose shorter side is above it get the shorter side ``ref``
    (aspect kept, truncated); then both sides are rounded down to multiples of 32."""
    if max(h, w) < ref or min(h, w) > ref:
        if w >= h:
            h, w = ref, int(w / h * ref)
        else:
            h, w = int(h / w * ref), ref
    return max(32, h - h % 32), max(32, w - w % 32)


@torch.no_grad()
def matte_image(model: MODNet, image: np.ndarray) -> np.ndarray:
    """Alpha matte ``(H, W)`` float32 in [0, 1] of ``image: (H, W, 3)`` uint8 RGB: scaled to
    [-1, 1], area-resized to :func:`inference_size`, the matte area-resized back."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected (H, W, 3) uint8, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    p = next(model.parameters())
    x = torch.from_numpy(np.array(image, copy=True)).to(p.device).permute(2, 0, 1)[None]
    x = x.to(p.dtype) / 127.5 - 1.0
    x = F.interpolate(x, size=inference_size(h, w), mode="area")
    m = F.interpolate(model(x), size=(h, w), mode="area")
    return m[0, 0].float().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def modnet_state(raw, where: str) -> dict[str, torch.Tensor]:
    """MODNet's released state dict (``module.`` prefixes from ``DataParallel``, bare, or under
    ``state_dict``) -> :class:`MODNet` keys. The duplicate ``lr_branch.backbone.*`` copy must
    equal ``backbone.*`` and is dropped; BatchNorm ``num_batches_tracked`` counters are filled in
    when absent. Checks every key and shape (an error names the file and the keys)."""
    from pyface.checkpoint import CheckpointError, check_state_dict

    raw = plain_state_dict(raw, where)
    if "f_branch.conv_f.1.layers.0.weight" not in raw:
        raise CheckpointError(f"{where}: not a MODNet state dict; missing "
                              "'f_branch.conv_f.1.layers.0.weight' (1, 16, 1, 1)")
    state = {}
    for k, v in raw.items():
        if k.startswith("lr_branch.backbone."):
            twin = k[len("lr_branch."):]
            if twin not in raw or tuple(raw[twin].shape) != tuple(v.shape) or \
                    not torch.equal(raw[twin], v):
                raise CheckpointError(f"{where}: {k} differs from {twin} (MODNet's two references "
                                      "to one backbone must hold the same tensors)")
            continue
        state[k] = v
    with torch.device("meta"):
        module = MODNet()
    for k in module.state_dict():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    check_state_dict(module, state, f"{where} (MODNet)")
    return state


def load_modnet(path: str, *, device: str | torch.device = "cpu") -> MODNet:
    """MODNet from a local weights file (the released ``modnet_photographic_portrait_matting.ckpt``
    or ``modnet_webcam_portrait_matting.ckpt``, read with ``torch.load(weights_only=True)``; or
    ``.safetensors``) -> :class:`MODNet` in eval mode, loaded strictly. Nothing is downloaded."""
    from pyface.checkpoint import load_module_state, load_weights_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"MODNet weights {path!r} do not exist (download "
                                "modnet_photographic_portrait_matting.ckpt from the MODNet "
                                "project and pass its path)")
    state = modnet_state(load_weights_file(path), path)
    model = MODNet()
    load_module_state(model, state, f"{path} (MODNet)")
    return model.eval().to(device)
