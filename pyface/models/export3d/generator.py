# Provenance: reproduces the semantics of Export3D's hybrid tri-plane generator (Ki et al., ECCV
# 2024; no code or weights were released): conv blocks, patch merging, ViT blocks with
# Expression-Adaptive LayerNorm, pixel shuffle, Gaussian low-pass, online EMA tri-plane. Sizes
# follow our design study (shared/reference/specs/export3d-mmfa.md section 1). Our own
# implementation; no upstream code is copied. pyface's code is licensed under Apache-2.0
# (LICENSE).
"""Export3D's tri-plane generator ``G(S, beta') -> T (B, 3, C, P, P)``.

source image (B, 3, H, W) in [-1, 1] ‖ pixel coordinates (B, 2, H, W)
-> conv stem: 3x3 conv, then ``stem_downs`` stride-2 conv + residual stages (widths
   ``stem_widths``) -> (B, stem_widths[-1], H / 2^s, H / 2^s)
-> patch merging (overlapping 3x3 conv, stride 2) -> tokens (B, h*w, dim), h = H / 2^(s+1)
-> :class:`pyface.nn.MiTStack` (``depth`` blocks, every LayerNorm adaptive on the expression
   condition: EAdaLN)
-> ``ups`` x [3x3 conv, PixelShuffle(2), + 1x1 projection of the stem map of that size]
-> 3x3 conv to 3 * C channels (+ optionally ``expr_planes`` learned tri-plane directions
   weighted by a linear map of the expression code: ``sum_k w_k(e) E_k``, E (k, 3 * C, P, P)
   zero-initialised; [D], see :class:`GeneratorConfig`) -> Gaussian low-pass (``blur_sigma``
   pixels)
-> G (B, 3, C, P, P), P = h * 2^ups; the tri-plane is ``T = G + T_EMA``, the online EMA
   tri-plane, updated in training as ``T_EMA <- m T_EMA + (1 - m) mean_B(G)`` (detached).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pyface.nn.resample import blur
from pyface.nn.vit import MiTStack


@dataclass
class GeneratorConfig:
    """Sizes of :class:`TriplaneGenerator`.

    Attributes:
        resolution: input size H (= W).
        stem_widths: widths of the conv stem; one stride-2 stage per entry after the first.
        dim: token width of the ViT.
        depth, heads: ViT blocks and attention heads.
        cond_dim: width of the expression condition fed to EAdaLN.
        ups: PixelShuffle(2) upsamplings after the ViT (P = H / 2^(len(stem_widths)) * 2^ups).
        up_widths: channels after each upsampling.
        plane_channels: C.
        blur_sigma: Gaussian low-pass std in plane pixels (0: off).
        ema_momentum: T_EMA <- m T_EMA + (1 - m) mean_B(G) in training (1: off).
        expr_planes: k learned tri-plane directions E (k, 3 * C, P, P) added to the generated
            planes as ``sum_k w_k(e) E_k`` with ``w = W e`` (B, k), e (B, expr_dim) the
            standardised expression code (the condition MLP's input), before the low-pass ([D],
            not in the paper; 0: off). E starts at zero (the initial planes do not depend on
            it), W is orthogonal (the rows orthonormal, so a unit-variance code gives w about
            unit variance) and E's gradient is the planes' gradient weighted by w(e): a spatial
            path from the expression to the volume that does not pass the ViT's per-channel
            EAdaLN modulation (docs/models/export3d-measured.md, "A spatial path for the
            expression").
            E is linear in e, so e must keep its training scale on new identities: true for
            ``cond=clebs`` and ``direct``, not for ``e2e`` (measured: 14x larger on held-out
            identities, and the output breaks).
        expr_dim: width of e (with ``expr_planes``).
    """

    resolution: int = 512
    stem_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 256])
    dim: int = 512
    depth: int = 8
    heads: int = 8
    cond_dim: int = 512
    ups: int = 3
    up_widths: list[int] = field(default_factory=lambda: [256, 128, 96])
    plane_channels: int = 32
    blur_sigma: float = 1.0
    ema_momentum: float = 0.999
    expr_planes: int = 0
    expr_dim: int = 64

    @property
    def token_resolution(self) -> int:
        return self.resolution // 2 ** len(self.stem_widths)

    @property
    def plane_resolution(self) -> int:
        return self.token_resolution * 2 ** self.ups


class _ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.c2(F.leaky_relu(self.c1(x), 0.2, inplace=True))


def coordinate_grid(B: int, H: int, W: int, device, dtype) -> torch.Tensor:
    """(B, 2, H, W) pixel-centre coordinates (x, y) in [-1, 1]."""
    ys = (torch.arange(H, device=device, dtype=dtype) + 0.5) / H * 2 - 1
    xs = (torch.arange(W, device=device, dtype=dtype) + 0.5) / W * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy]).expand(B, -1, -1, -1)


class TriplaneGenerator(nn.Module):
    """``encode(image) -> features`` (the expression-free part, cacheable per source) and
    ``decode(features, cond) -> planes (B, 3, C, P, P)``; ``forward(image, cond)`` both.

    image: (B, 3, H, W) in [-1, 1]; cond: (B, cond_dim); expr: (B, expr_dim) with
    ``expr_planes``.
    """

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = c = cfg
        s = len(c.stem_widths)
        if s < 1 or c.resolution % 2 ** s:
            raise ValueError(f"model.resolution: expected a multiple of 2^len(stem_widths) = "
                             f"{2 ** s}, got {c.resolution}")
        if len(c.up_widths) != c.ups:
            raise ValueError(f"up_widths: expected {c.ups} entries (one per upsampling), got "
                             f"{c.up_widths}")
        self.stem_in = nn.Conv2d(5, c.stem_widths[0], 3, padding=1)
        self.stem_in_block = _ResBlock(c.stem_widths[0])
        self.downs = nn.ModuleList()
        for i in range(1, s):
            self.downs.append(nn.Sequential(
                nn.Conv2d(c.stem_widths[i - 1], c.stem_widths[i], 3, stride=2, padding=1),
                nn.LeakyReLU(0.2, inplace=True), _ResBlock(c.stem_widths[i])))
        # patch merging: an overlapping stride-2 patch embedding to the token width
        self.patch = nn.Conv2d(c.stem_widths[-1], c.dim, 3, stride=2, padding=1)
        self.patch_norm = nn.LayerNorm(c.dim)
        self.vit = MiTStack(dim=c.dim, depth=c.depth, heads=c.heads, cond_dim=c.cond_dim)
        # pixel-shuffle upsampling with skips from the stem maps of the same size
        self.ups = nn.ModuleList()
        self.skips = nn.ModuleDict()
        cin = c.dim
        stem_res = {c.resolution // 2 ** i: c.stem_widths[i] for i in range(s)}
        r = c.token_resolution
        for j, w in enumerate(c.up_widths):
            self.ups.append(nn.Conv2d(cin, w * 4, 3, padding=1))
            r *= 2
            if r in stem_res:
                self.skips[str(j)] = nn.Conv2d(stem_res[r], w, 1)
            cin = w
        self.to_planes = nn.Conv2d(cin, 3 * c.plane_channels, 3, padding=1)
        P = c.plane_resolution
        if c.expr_planes < 0:
            raise ValueError(f"expr_planes: expected >= 0, got {c.expr_planes}")
        self.expr_weights = self.expr_basis = None
        if c.expr_planes:
            self.expr_weights = nn.Linear(c.expr_dim, c.expr_planes, bias=False)
            nn.init.orthogonal_(self.expr_weights.weight)
            self.expr_basis = nn.Parameter(torch.zeros(c.expr_planes, 3 * c.plane_channels,
                                                       P, P))
        self.register_buffer("planes_ema", torch.zeros(1, 3, c.plane_channels, P, P))

    def encode(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """image (B, 3, H, W) -> {"tokens": (B, h*w, dim), "stem": [maps (B, w_i, H/2^i, ..)]}."""
        c = self.cfg
        if image.dim() != 4 or image.shape[1:] != (3, c.resolution, c.resolution):
            raise ValueError(f"image: expected shape (B, 3, {c.resolution}, {c.resolution}), got "
                             f"{tuple(image.shape)}")
        B, _, H, W = image.shape
        x = torch.cat([image, coordinate_grid(B, H, W, image.device, image.dtype)], 1)
        x = self.stem_in_block(F.leaky_relu(self.stem_in(x), 0.2, inplace=True))
        stem = [x]
        for d in self.downs:
            x = d(x)
            stem.append(x)
        t = self.patch(x)
        tokens = self.patch_norm(t.flatten(2).transpose(1, 2))
        return {"tokens": tokens, "stem": stem}

    def decode(self, feats: dict, cond: torch.Tensor, expr: torch.Tensor | None = None, *,
               update_ema: bool = False) -> torch.Tensor:
        """feats from :meth:`encode` (batch B, or 1 broadcast to cond's batch), cond
        (B, cond_dim), expr (B, expr_dim) the expression code (required with ``expr_planes``)
        -> planes (B, 3, C, P, P) including T_EMA. ``update_ema``: update T_EMA with this
        batch's mean (training)."""
        c = self.cfg
        h = c.token_resolution
        tokens, stem = feats["tokens"], feats["stem"]
        if cond.dim() != 2 or cond.shape[1] != c.cond_dim:
            raise ValueError(f"cond: expected shape (B, {c.cond_dim}), got {tuple(cond.shape)}")
        B = cond.shape[0]
        if self.expr_basis is not None and (expr is None or expr.shape != (B, c.expr_dim)):
            raise ValueError(f"expr: expected shape ({B}, {c.expr_dim}) with expr_planes, got "
                             f"{None if expr is None else tuple(expr.shape)}")
        if tokens.shape[0] != B:
            if tokens.shape[0] != 1:
                raise ValueError(f"cond: batch {B} does not match the source features' batch "
                                 f"{tokens.shape[0]}")
            tokens = tokens.expand(B, -1, -1)
            stem = [s.expand(B, -1, -1, -1) for s in stem]
        t = self.vit(tokens, cond.to(tokens.dtype), hw=(h, h))
        x = t.transpose(1, 2).reshape(B, c.dim, h, h)
        by_res = {s.shape[-1]: s for s in stem}
        for j, up in enumerate(self.ups):
            x = F.leaky_relu(F.pixel_shuffle(up(x), 2), 0.2, inplace=True)
            if str(j) in self.skips:
                x = x + self.skips[str(j)](by_res[x.shape[-1]])
        x = self.to_planes(x)
        if self.expr_basis is not None:
            w = self.expr_weights(expr.to(x.dtype))                     # (B, k)
            x = x + torch.einsum("bk,kchw->bchw", w, self.expr_basis.to(x.dtype))
        x = blur(x, c.blur_sigma)
        P = c.plane_resolution
        gen = x.reshape(B, 3, c.plane_channels, P, P)
        planes = gen + self.planes_ema.to(x.dtype)
        if update_ema and c.ema_momentum < 1:
            # the EMA follows the generated part G, not T = G + T_EMA: an EMA of T feeds on
            # itself (T_EMA <- T_EMA + (1 - m) mean(G), a running sum of G's mean) and grew to
            # 25 times G's size at `tiny` (docs/models/export3d-measured.md)
            with torch.no_grad():
                m = c.ema_momentum
                mean = gen.detach().float().mean(0, keepdim=True)
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    # under torchrun the global batch's mean (the ranks' batches are equal),
                    # so every rank keeps the same EMA, that of one process
                    dist.all_reduce(mean)
                    mean /= dist.get_world_size()
                self.planes_ema.mul_(m).add_(mean, alpha=1 - m)
        return planes

    def forward(self, image: torch.Tensor, cond: torch.Tensor,
                expr: torch.Tensor | None = None, *, update_ema: bool = False) -> torch.Tensor:
        return self.decode(self.encode(image), cond, expr, update_ema=update_ema)
