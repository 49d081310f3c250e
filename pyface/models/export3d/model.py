# Provenance: reproduces the semantics of Export3D (Ki et al., "Learning to Generate Conditional
# Tri-plane for 3D-aware Expression Controllable Portrait Animation", ECCV 2024; no code or
# weights were released). Losses and sizes are our decisions (shared/reference/specs/
# export3d-mmfa.md section 1, docs/models/export3d.md). Our own implementation; no upstream code
# is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""Export3D stage 2 (registered ``export3d``): source image + driving expression + driving
camera -> image.

``beta_D (64)`` -> condition (``cond``: ``clebs``: the frozen CLeBS ``beta'``; ``e2e``: the same
basis-scaling encoder trained end to end without contrast; ``direct``: the raw 3DMM expression)
-> MLP -> c (cond_dim) -> :class:`TriplaneGenerator` ``T = G(S, c) + T_EMA`` (B, 3, C, P, P) ->
:class:`pyface.nn.render.OSGDecoder` + :class:`TriplaneRenderer` (corrected plane axes) at the
driving camera, raw render (B, 3 + F, H/4, H/4) -> :class:`pyface.nn.vit.PlainSuperResolution`
-> image (B, 3, H, W).

Options that are ours, not the paper's (on in ``tiny``): learned expression tri-plane directions
(``expr_planes``), the source as the raw render's background
(``raw_background``) and as inputs of the super-resolution at H/4 (``sr_source``) and H
(``sr_guide``), a joint colour augmentation of the training pair (``augment``) and a silhouette
loss on the raw opacity (``w_mask``). Training (``full``): L1 on image and raw image, perceptual,
mouth / eye RoI, density, identity (user ArcFace weights), and a non-saturating GAN with the
camera-conditioned :class:`pyface.nn.DualDiscriminator` and lazy R1 after a warm-up.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn.discriminators import DualDiscriminator
from pyface.nn.losses import gan_d_loss, gan_g_loss, r1_penalty
from pyface.nn.render import OSGDecoder, RenderConfig, TriplaneRenderer, density_l1_regularizer
from pyface.nn.roi import roi_l1_loss
from pyface.nn.vit import PlainSuperResolution
from pyface.ops.render import ray_bundle
from pyface.models.export3d.clebs import (CLeBS, EXP_DIM, ExpressionEncoder, ema_moments_,
                                          expression_of, image_to_float, video_mean_whitener)
from pyface.models.export3d.generator import GeneratorConfig, TriplaneGenerator
from pyface.models.export3d.pipeline import Export3DPipeline
from pyface.train.model import (Phase, Stage, StepContext, TrainableModel, check_choice,
                                config_from_dict, load_pretrained)

log = logging.getLogger("pyface.models.export3d")

COND_MODES = ("direct", "e2e", "clebs")
EXPR_INITS = ("orthogonal", "basis")
PLANE_AXES = "xy_xz_zy"
MOUTH_MASK_PATHS = ("all", "raw", "guide")


@dataclass
class Export3DConfig:
    """Export3D stage 2. Defaults: paper scale (our reading, 512^2); presets shrink it.

    Attributes:
        resolution: output size H (= data.resolution); the raw render is H / sr_scale.
        cond: ``clebs`` | ``e2e`` | ``direct`` (the paper's ablation).
        clebs_checkpoint: the CLeBS run (stage ``clebs``); required for ``cond=clebs``.
        n, code_dim: basis size and code width of the ``e2e`` encoder (clebs: the stage's).
        cond_dim: width of the EAdaLN condition (an MLP maps the code to it).
        cond_norm: standardise the MLP's input (lambda for e2e / clebs, beta for direct) with
            running statistics of the training batches (:class:`Conditioner`; [D], default off
            so that older checkpoints load; on in every preset).
        cond_whiten: with ``cond_norm``, whiten the MLP's input with the running covariance
            instead of standardising each coefficient: ``(x - mean) C^(-1/2)``, the symmetric
            (ZCA) inverse square root of the running covariance C, its eigenvalues regularised
            by 1 % of their mean ([D], default off). The trained CLeBS code puts one shared
            component (blink) into every coefficient, so per-coefficient scaling leaves most of
            the code's variance to blink and little to the jaw; whitening gives every direction
            of the code's span the same spread (measured, not kept:
            docs/models/export3d-measured.md,
            "Stage 2 on the closed-form code").
        stem_widths, vit_dim, vit_depth, vit_heads, ups, up_widths, plane_channels,
        blur_sigma, ema_momentum, expr_planes: see :class:`GeneratorConfig`.
        expr_init: the initial weights W (k, d) of ``expr_planes``: ``orthogonal`` (a random
            orthogonal map of the code, the default) or ``basis`` (W = V^T, the code's own
            basis: ``w = W beta' = lambda`` (standardised) exactly, so every coefficient reaches
            a direction E_k at full gain from the first step; a random orthogonal W sees the
            n-dimensional span of V with gains between about 0.01 and 0.7; [D], ``clebs`` /
            ``e2e`` only; k > n: the remaining rows orthogonal to V).
        expr_relative: with ``expr_planes``, weight the directions by the change of the code
            from the source frame's expression to the driving one, ``w(e_D) - w(e_S)``, instead
            of ``w(e_D)`` ([D], not in the paper, whose generator reads the driving code only;
            default off). The generator's own path then renders the source frame as it is and
            the directions move it by the expression change, like blendshapes; with the
            source's own expression the planes add nothing. Needs the source frame's 3DMM
            coefficients: ``forward(source_beta=...)``, the training pairs' ``source.coeffs``,
            ``encode_source(source)`` with ``source['coeffs']``.
        decoder_hidden, decoder_features: OSGDecoder widths (the first 3 features are RGB).
        depth_samples, importance_samples, ray_start, ray_end, box_warp: the renderer.
        render_chunk_points: samples per chunk of the fused renderer's recomputing backward
            (``RenderConfig.chunk_points``; None: the op's default, one chunk at ``tiny``);
            smaller chunks lower the peak memory of a training step.
        sr_widths: PlainSuperResolution widths; scale 2^(len - 1).
        sr_source: also feed the source image, resized to the raw resolution, to the
            super-resolution ([D], not in the paper; default off).
        raw_background: composite the raw render over the source image resized to the raw
            resolution (``rgb + (1 - opacity) * (source + 1)`` in [-1, 1]), so the volume only
            has to hold the head and the static background comes from the source ([D], not in
            the paper; default off).
        sr_guide: also feed the source image at the output resolution to the last stage of the
            super-resolution (``PlainSuperResolution`` guide; [D], not in the paper; default
            off).
        sr_cond: modulate the super-resolution's first stage (at the raw resolution) with the
            expression condition c (``PlainSuperResolution(cond_dim=...)``, zero-initialised;
            [D], not in the paper: the
            paper's SR has no style input; default off). At ``tiny`` the raw render is 16^2 and
            the source reaches the SR at 64^2, so without it the mouth of the output follows the
            source, not the driving expression (docs/models/export3d-measured.md).
        source_mouth_mask: the source image that reaches the output directly (``raw_background``
            and ``sr_source`` at the raw resolution, ``sr_guide`` at H) has its mouth box
            replaced by a flat fill (:func:`mask_mouth_box`: the box of the SOURCE frame's
            landmarks 48-67 grown as the RoI boxes are, scaled to each path's resolution,
            filled with the mean colour of the one-pixel ring around it), so those paths cannot
            copy the source's mouth and the mouth must come from the expression path ([D], not
            in the paper; default off). The generator's own input stays whole (it has to see
            the lips' colour). Needs the source frame's landmarks (68, 2) in pixels at H:
            ``forward(source_landmarks=...)``, the training pairs' ``source.landmarks``,
            ``encode_source(source)`` with ``source['landmarks']``.
        source_mouth_mask_paths: which direct paths ``source_mouth_mask`` masks: ``all`` (the
            default), ``raw`` (``raw_background`` and ``sr_source``, at the raw resolution) or
            ``guide`` (``sr_guide``, at H) (measured, docs/models/export3d-measured.md).
        augment: joint colour augmentation of the training pair ([D]; 0: off): source and
            driving frame get the same random RGB permutation, per-channel gain 1 +- augment and
            offset +- augment, so the generator learns to carry the source's colours instead of
            memorising the training identities'.
        lr, betas: Adam of the generator.
        w_l1, w_l1_raw, w_perceptual, w_roi, w_density: loss weights; density every
            ``density_every`` steps (scaled by it).
        density_phase: run the density regulariser in its own lazy phase ``Greg`` every
            ``density_every`` steps (a separate Adam step of G on the regulariser alone, on the
            step's batch; G's Adam then gets the lazy-regularisation compensation, lr x k/(k+1)
            and betas ** (k/(k+1)) for k = ``density_every`` > 1), as the design study's phases
            "G, D, Dreg, Greg (every 4)" with lazy regularisation and EG3D's ``Greg``. False
            (the default, what runs and configs without the key did): the regulariser's loss
            is added to the ``G`` phase's loss on every ``density_every``-th step, with no
            compensation. ``full`` and ``gpu-short`` set True; no effect with ``w_density`` 0.
        w_roi_raw: weight of the mouth and eye RoI L1 on the raw image against the driving
            frame at the raw resolution (the boxes scaled to it; [D], 0: off).
        vgg_weights: torchvision VGG19 file for the perceptual loss; None: an image-pyramid L1
            replaces it (a warning says so once).
        w_mask: weight of the silhouette loss L1(raw opacity, driving face mask resized to the
            raw resolution) when the data has masks ([D], not in the paper; 0: off): with
            ``raw_background`` the volume must hold the head instead of leaving it to the
            source.
        arcface_weights, w_identity: insightface ArcFace (IResNet-50) file for the identity loss
            ``1 - cos(ArcFace(image), ArcFace(driving))`` and its weight; None: no identity loss
            (a warning says so once when ``w_identity`` > 0).
        w_gan: weight of the non-saturating GAN loss of the generator (0, the default: no
            discriminator; the ``full`` preset sets 0.025); on from step ``gan_start``
            (warm-up). The dual discriminator
            (``pyface.nn.DualDiscriminator``: image ‖ upsampled raw image) is conditioned on
            the driving camera; R1 with ``r1_gamma`` every ``r1_every`` steps (lazy, scaled by
            it; D's Adam then gets EG3D's lazy-regularisation compensation, lr x k/(k+1) and
            betas ** (k/(k+1)) for k = ``r1_every`` > 1). ``r1_gamma`` 0: no R1 phase and no
            compensation (as EG3D). ``d_lr``, ``d_channel_base``, ``d_channel_max``: its Adam
            lr (betas as G's) and widths.
    """

    resolution: int = 512
    cond: str = "clebs"
    clebs_checkpoint: str | None = None
    n: int = 10
    code_dim: int = 512
    cond_dim: int = 512
    cond_norm: bool = False
    cond_whiten: bool = False
    stem_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 256])
    vit_dim: int = 512
    vit_depth: int = 8
    vit_heads: int = 8
    ups: int = 3
    up_widths: list[int] = field(default_factory=lambda: [256, 128, 96])
    plane_channels: int = 32
    blur_sigma: float = 1.0
    ema_momentum: float = 0.999
    expr_planes: int = 0
    expr_init: str = "orthogonal"
    expr_relative: bool = False
    decoder_hidden: int = 64
    decoder_features: int = 32
    depth_samples: int = 48
    importance_samples: int = 48
    ray_start: float = 2.25
    ray_end: float = 3.3
    box_warp: float = 1.0
    render_chunk_points: int | None = None
    sr_widths: list[int] = field(default_factory=lambda: [256, 128, 64])
    sr_source: bool = False
    sr_guide: bool = False
    raw_background: bool = False
    sr_cond: bool = False
    source_mouth_mask: bool = False
    source_mouth_mask_paths: str = "all"
    augment: float = 0.0
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    w_l1: float = 1.0
    w_l1_raw: float = 1.0
    w_perceptual: float = 1.0
    vgg_weights: str | None = None
    w_roi: float = 1.0
    w_roi_raw: float = 0.0
    w_density: float = 0.25
    density_every: int = 4
    density_phase: bool = False
    w_mask: float = 0.0
    arcface_weights: str | None = None
    w_identity: float = 0.1
    w_gan: float = 0.0
    gan_start: int = 10000
    r1_gamma: float = 10.0
    r1_every: int = 16
    d_lr: float = 1e-4
    d_channel_base: int = 32768
    d_channel_max: int = 512

    def __post_init__(self):
        # the renderer's inference options (Export3D.inference_options) that no saved config
        # makes valid are refused here, so a bad value names its key before anything is read;
        # the coarse minimum with importance samples (4) waits for the model (saved config)
        n, m, c = self.depth_samples, self.importance_samples, self.render_chunk_points
        if isinstance(m, int) and m < 0:
            raise ValueError(f"model.importance_samples: expected >= 0 (0: the coarse pass "
                             f"only), got {m}")
        if isinstance(n, int) and n < 2:
            raise ValueError(f"model.depth_samples: expected >= 2, got {n}")
        if isinstance(c, int) and c < 1:
            raise ValueError(f"model.render_chunk_points: expected >= 1 or None (the "
                             f"renderer's default), got {c}")


@torch.no_grad()
def _global_batch_moments(x: torch.Tensor, cov: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and spread (covariance (k, k) if ``cov``, else variance (k,); biased) of the rows of
    x (B, k). Under torchrun, of all ranks' rows: every rank then keeps the same running
    statistics, those of one process with the whole batch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if cov:
            xc = x - x.mean(0)
            return x.mean(0), xc.t() @ xc / x.shape[0]
        return x.mean(0), x.var(0, unbiased=False)
    s = torch.cat([x.sum(0), x.new_tensor([x.shape[0]])])
    dist.all_reduce(s)
    mu, n = s[:-1] / s[-1], s[-1]
    xc = x - mu
    spread = xc.t() @ xc if cov else (xc * xc).sum(0)
    dist.all_reduce(spread)
    return mu, spread / n


class Conditioner(nn.Module):
    """beta (B, 64) -> (lambda (B, n) or None, condition (B, cond_dim)).

    ``direct``: MLP(beta); ``e2e`` / ``clebs``: MLP(f_e(beta)), with lambda editable through
    ``scale`` (B, n) or (n,) multiplying lambda before the basis.

    ``normalize`` ([D]): the MLP's input is standardised per coefficient with running statistics
    of the training batches (EMA ``momentum``, updated in training under autograd, detached;
    never the batch's own statistics): ``direct``: beta; ``e2e`` / ``clebs``: lambda, before the
    basis (so the code is ``((lambda - mean) / std) V^T``). The contrastive loss leaves the scale
    and a constant offset of beta' free, so the condition's input scale no longer depends on the
    CLeBS run (the `tiny` stage 1's whitening already gives lambda about unit spread; measured
    in docs/models/export3d-measured.md, where this did not make the generator use the expression).

    ``whiten`` (with ``normalize``; [D]): the running covariance (k, k) replaces the variance,
    and the input is multiplied by its symmetric inverse square root ``code_whitener`` (k, k;
    eigenvalues regularised by ``whiten_eps`` times their mean, recomputed at every update), so
    the code's directions have equal spread instead of its coefficients.
    """

    def __init__(self, mode: str, expr: ExpressionEncoder | None, cond_dim: int,
                 normalize: bool = False, momentum: float = 0.99, whiten: bool = False,
                 whiten_eps: float = 1e-2):
        super().__init__()
        self.mode = mode
        self.expr = expr
        cin = EXP_DIM if expr is None else expr.dim
        self.mlp = nn.Sequential(nn.Linear(cin, cond_dim), nn.LeakyReLU(0.2),
                                 nn.Linear(cond_dim, cond_dim))
        self.normalize = bool(normalize)
        self.whiten = bool(whiten)
        if self.whiten and not self.normalize:
            raise ValueError("model.cond_whiten: needs model.cond_norm=true (the whitening "
                             "replaces its per-coefficient scaling), got cond_norm=false")
        self.momentum = float(momentum)
        self.whiten_eps = float(whiten_eps)
        if self.normalize:
            k = EXP_DIM if expr is None else expr.n
            self.register_buffer("code_mean", torch.zeros(k))
            if self.whiten:
                self.register_buffer("code_cov", torch.eye(k))
                self.register_buffer("code_whitener", torch.eye(k))
            else:
                self.register_buffer("code_var", torch.ones(k))
            self.register_buffer("code_batches", torch.zeros((), dtype=torch.long))

    @property
    def n(self) -> int | None:
        return None if self.expr is None else self.expr.n

    def coefficients(self, beta: torch.Tensor) -> torch.Tensor | None:
        return None if self.expr is None else self.expr.coefficients(beta)

    @torch.no_grad()
    def _update_stats(self, x: torch.Tensor) -> None:
        """x (B, k): one training batch of the normalised quantity."""
        first = int(self.code_batches) == 0
        mu, spread = _global_batch_moments(x, self.whiten)
        if self.whiten:
            ema_moments_(self.code_mean, self.code_cov, mu, spread, self.momentum, first=first)
            self.code_whitener.copy_(video_mean_whitener(self.code_cov, self.whiten_eps))
        else:
            ema_moments_(self.code_mean, self.code_var, mu, spread, self.momentum, first=first)
        self.code_batches += 1

    def _standardise(self, x: torch.Tensor, update: bool) -> torch.Tensor:
        if update:
            self._update_stats(x.detach().float())
        if self.whiten:
            return (x - self.code_mean) @ self.code_whitener.to(x.dtype)
        var = self.code_var
        return (x - self.code_mean) * torch.rsqrt(var + 1e-3 * var.mean() + 1e-12)

    @property
    def code_dim(self) -> int:
        """Width of the code the MLP reads (64 for direct, the basis width d otherwise)."""
        return EXP_DIM if self.expr is None else self.expr.dim

    def code(self, beta: torch.Tensor | None, lam: torch.Tensor | None, *,
             update_stats: bool = False) -> torch.Tensor:
        """The MLP's input (B, code_dim): beta (direct) or beta' from lambda (e2e, clebs),
        standardised with ``normalize``. ``update_stats``: update the running statistics of
        ``normalize`` with this batch first (training)."""
        if self.expr is None:
            code = beta.float()
            if self.normalize:
                code = self._standardise(code, update_stats)
        else:
            if self.normalize:
                lam = self._standardise(lam, update_stats)
            code = self.expr.combine(lam)
        return code

    def from_code(self, beta: torch.Tensor | None, lam: torch.Tensor | None, *,
                  update_stats: bool = False) -> torch.Tensor:
        """The condition (B, cond_dim) from beta (direct) or lambda (e2e, clebs): the MLP of
        :meth:`code`."""
        return self.mlp(self.code(beta, lam, update_stats=update_stats))

    def forward(self, beta: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        lam = self.coefficients(beta)
        return lam, self.from_code(beta, lam)


def landmark_boxes(landmarks: torch.Tensor, resolution: int) -> dict[str, torch.Tensor]:
    """landmarks (B, 68, 2) pixels -> {"mouth", "eye_l", "eye_r": (B, 4) boxes x0, y0, x1, y1},
    each the landmarks' bounding box grown by half its size (at least resolution / 16 wide)."""
    if landmarks.dim() != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmarks: expected shape (B, 68, 2), got {tuple(landmarks.shape)}")
    out = {}
    for name, sl in (("mouth", slice(48, 68)), ("eye_l", slice(36, 42)),
                     ("eye_r", slice(42, 48))):
        p = landmarks[:, sl].float()
        lo, hi = p.min(1).values, p.max(1).values
        c, half = (lo + hi) / 2, ((hi - lo) * 0.75).clamp(min=resolution / 32)
        half = half.max(-1, keepdim=True).values.expand(-1, 2)
        out[name] = torch.cat([c - half, c + half], -1).clamp(0, resolution)
    return out


def mask_mouth_box(image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """image (B, 3, h, w), box (B, 4) x0, y0, x1, y1 in pixels of this image -> image
    (B, 3, h, w) with every pixel that overlaps the box (pixel ``[x, x + 1)`` meets ``(x0, x1)``)
    replaced by the mean colour of the one-pixel ring of pixels around those (clipped to the
    image; the whole image's mean if the ring is empty).

    A flat fill rather than a blur: the jaw's opening is a large dark region that a blur keeps
    (at 16^2 the mouth box is 2-4 pixels, about one blur footprint), so a blurred mouth still
    tells the output how open the source's mouth is; the ring's mean keeps only the skin colour
    around it."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image: expected shape (B, 3, h, w), got {tuple(image.shape)}")
    B, _, h, w = image.shape
    if box.dim() != 2 or box.shape != (B, 4):
        raise ValueError(f"box: expected shape ({B}, 4) (x0, y0, x1, y1), got "
                         f"{tuple(box.shape)}")
    box = box.to(image.device, torch.float32)
    xs = torch.arange(w, device=image.device, dtype=torch.float32)
    ys = torch.arange(h, device=image.device, dtype=torch.float32)

    def region(b):      # (B, 1, h, w): pixels overlapping the open box b (B, 4)
        x0, y0, x1, y1 = (b[:, i, None] for i in range(4))
        inx = (xs + 1 > x0) & (xs < x1)
        iny = (ys + 1 > y0) & (ys < y1)
        return (iny[:, :, None] & inx[:, None, :])[:, None]

    inside = region(box)
    ring_box = torch.stack([box[:, 0].floor() - 1, box[:, 1].floor() - 1,
                            box[:, 2].ceil() + 1, box[:, 3].ceil() + 1], 1)
    ring = (region(ring_box) & ~inside).to(image.dtype)
    count = ring.sum((2, 3), keepdim=True)
    mean_ring = (image * ring).sum((2, 3), keepdim=True) / count.clamp_min(1)
    fill = torch.where(count > 0, mean_ring, image.mean((2, 3), keepdim=True))
    return torch.where(inside, fill, image)


def _pyramid_l1(pred: torch.Tensor, target: torch.Tensor, levels: int = 3) -> torch.Tensor:
    total = pred.new_zeros(())
    for _ in range(levels):
        pred, target = F.avg_pool2d(pred, 2), F.avg_pool2d(target, 2)
        total = total + (pred - target).abs().mean()
        if pred.shape[-1] < 4:
            break
    return total


def joint_colour_augment(a: torch.Tensor, b: torch.Tensor,
                         amount: float) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b (B, 3, H, W) in [-1, 1] -> the same random colour change applied to both (per
    sample): an RGB permutation, a gain 1 +- amount and an offset +- amount per channel; clamped
    to [-1, 1]."""
    B = a.shape[0]
    perm = torch.argsort(torch.rand(B, 3, device=a.device), dim=1)
    gain = 1 + (torch.rand(B, 3, 1, 1, device=a.device) * 2 - 1) * amount
    off = (torch.rand(B, 3, 1, 1, device=a.device) * 2 - 1) * amount
    idx = perm[:, :, None, None].expand(-1, -1, *a.shape[-2:])

    def apply(x):
        return (torch.gather(x, 1, idx) * gain + off).clamp(-1, 1)

    return apply(a), apply(b)


class Export3D(TrainableModel):
    """Export3D generator (stage 2). Data: ``pairs`` (same video): ``source``, ``driving``
    frames with ``coeffs``, ``camera`` and ``landmarks`` on the driving frame.

    ``forward(source_image (B, 3, H, W), beta (B, 64), camera (B, 25), source_beta=None,
    lam_scale=None)`` ->
    dict ``image (B, 3, H, W)``, ``image_raw (B, 3, r, r)``, ``planes (B, 3, C, P, P)``,
    ``lambda (B, n)`` (e2e / clebs).
    """

    Config = Export3DConfig
    #: train.compile: the tri-plane generator, the renderer and the super-resolution (the
    #: conditioner is small and called through its methods); not D, whose R1 penalty is a
    #: double backward, which AOTAutograd lacks
    compile_modules = ("generator", "renderer", "sr")
    Pipeline = Export3DPipeline
    #: settable on a trained model (``pyface.models.load(..., options=...)``, ``--option``):
    #: the renderer's samples per ray (coarse, importance; at inference they sit at fixed
    #: mid-interval positions, so more samples are a finer quadrature of the same volume) and
    #: its chunk size (execution only: the rays of a chunk are rendered as alone, the results
    #: agree to float rounding). Left out, each because the trained weights depend on it:
    #: ray_start / ray_end / box_warp (where the planes and the density were fitted), the
    #: network widths and resolutions, and the source paths (sr_source, sr_guide,
    #: raw_background, source_mouth_mask*: inputs the SR was trained with).
    inference_options = ("depth_samples", "importance_samples", "render_chunk_points")
    stages = (Stage("clebs", "export3d_clebs", "clebs_checkpoint"),)
    recipe = {"data": {"name": "pairs", "resolution": 512,
                       "options": {"mode": "same_video", "synth": {"exp_leak": 0.5}}},
              "train": {"steps": 200000, "batch_size": 8, "ckpt_every": 5000,
                        "image_every": 2000,
                        "ema": {"modules": ["generator", "cond", "decoder", "sr"],
                                "half_life_kimg": 10}}}
    presets = {
        # 2-core CPU: 64^2 output, raw 16^2, tri-plane 3x16x32^2, 12+12 samples, 2 blocks of 64;
        # the source reaches the SR at 16^2 and 64^2 and is the raw render's background, and the
        # training pairs get a joint colour augmentation; a silhouette loss makes the volume hold
        # the head (docs/models/export3d-measured.md, "Generator at tiny"); 10 expression tri-plane
        # directions give the expression a spatial path ("A spatial path for the expression"),
        # their weights starting at the code's basis (mouth gain +0.37 / +0.37 dB against +0.16
        # / +0.28 on the validation split, seeds 0 / 1: "Stage 2 on the closed-form code")
        "tiny": {"model": {"resolution": 64, "stem_widths": [8, 32, 64], "vit_dim": 64,
                           "vit_depth": 2, "vit_heads": 2, "cond_dim": 64, "ups": 2,
                           "up_widths": [48, 32], "plane_channels": 16, "n": 10, "code_dim": 64,
                           "decoder_hidden": 32, "decoder_features": 16,
                           "depth_samples": 12, "importance_samples": 12,
                           "sr_widths": [24, 16, 8], "lr": 1e-3, "betas": [0.9, 0.99],
                           "cond_norm": True, "expr_planes": 10, "expr_init": "basis",
                           "ema_momentum": 0.99, "blur_sigma": 0.5, "sr_source": True,
                           "sr_guide": True, "sr_cond": True, "raw_background": True,
                           "augment": 0.2, "render_chunk_points": 8192,
                           "w_mask": 10.0, "w_density": 0.0, "w_gan": 0.0},
                 "data": {"name": "pairs", "resolution": 64,
                          "options": {"mode": "same_video", "synth": {"exp_leak": 0.5}}},
                 "train": {"steps": 2400, "batch_size": 4, "ckpt_every": 400, "image_every": 400,
                           "log_every": 50,
                           "lr_schedule": {"kind": "cosine", "warmup_steps": 20,
                                           "min_factor": 0.1},
                           "ema": {"modules": ["generator", "cond", "decoder", "sr"],
                                   "decay": 0.99, "half_life_kimg": None}}},
        # one H100/H200, about 5 minutes: 256^2, raw 64^2, tri-plane 3x32x128^2, 4 blocks of 256
        "gpu-short": {"model": {"resolution": 256, "stem_widths": [32, 64, 128, 256],
                                "vit_dim": 256, "vit_depth": 4, "vit_heads": 4, "cond_dim": 256,
                                "ups": 3, "up_widths": [128, 96, 64], "plane_channels": 32,
                                "n": 10, "code_dim": 256, "depth_samples": 24,
                                "importance_samples": 24, "sr_widths": [128, 64, 32],
                                "lr": 5e-4, "betas": [0.9, 0.99], "ema_momentum": 0.995,
                                "cond_norm": True, "density_phase": True,
                                "w_gan": 0.0},
                      "data": {"name": "pairs", "resolution": 256,
                               "options": {"mode": "same_video",
                                           "synth": {"exp_leak": 0.5, "identities": 16,
                                                     "videos_per_identity": 4, "frames": 64}}},
                      "train": {"steps": 3000, "batch_size": 8, "precision": "bf16",
                                "ckpt_every": 1000, "image_every": 1000,
                                "lr_schedule": {"kind": "cosine", "warmup_steps": 100,
                                                "min_factor": 0.1},
                                "ema": {"modules": ["generator", "cond", "decoder", "sr"],
                                        "decay": 0.995, "half_life_kimg": None}}},
        # paper scale (our reading): 512^2, raw 128^2, 48+48 samples, 8 blocks of 512
        # (the GAN after a 10k-step warm-up, as in the spec: 0.025, R1 gamma 10 every 16 steps;
        # the density regulariser in its own lazy phase every 4 steps, as the spec's Greg)
        "full": {"model": {"w_gan": 0.025, "gan_start": 10000, "cond_norm": True,
                           "density_phase": True}},
    }

    def __init__(self, cfg: Export3DConfig | None = None):
        super().__init__()
        cfg = cfg or Export3DConfig()
        check_choice("model.source_mouth_mask_paths", cfg.source_mouth_mask_paths,
                     MOUTH_MASK_PATHS)
        check_choice("model.cond", cfg.cond, COND_MODES)
        self.cfg = cfg
        scale = 2 ** (len(cfg.sr_widths) - 1)
        if cfg.resolution % scale:
            raise ValueError(f"model.resolution: expected a multiple of the super-resolution "
                             f"scale {scale} (from sr_widths), got {cfg.resolution}")
        self.raw_resolution = cfg.resolution // scale
        n, m = cfg.depth_samples, cfg.importance_samples
        if m < 0:
            raise ValueError(f"model.importance_samples: expected >= 0 (0: the coarse pass "
                             f"only), got {m}")
        if n < (4 if m > 0 else 2):
            raise ValueError(f"model.depth_samples: expected >= {4 if m > 0 else 2}"
                             f"{' (with importance samples)' if m > 0 else ''}, got {n}")
        if cfg.render_chunk_points is not None and cfg.render_chunk_points < 1:
            raise ValueError(f"model.render_chunk_points: expected >= 1 or None (the "
                             f"renderer's default), got {cfg.render_chunk_points}")
        expr = None
        if cfg.cond == "clebs":
            if not cfg.clebs_checkpoint:
                raise ValueError("model.clebs_checkpoint: required for model.cond='clebs' (a "
                                 "CLeBS run: `pyface train export3d` trains it first as stage "
                                 "'clebs'), got None")
            c, state = load_pretrained(cfg.clebs_checkpoint)
            stage = CLeBS(config_from_dict(CLeBS.Config, c))
            stage.load_state_dict(state)
            expr = stage.expr
            expr.requires_grad_(False)
        elif cfg.cond == "e2e":
            expr = ExpressionEncoder(cfg.n, cfg.code_dim)
        self.cond = Conditioner(cfg.cond, expr, cfg.cond_dim, normalize=cfg.cond_norm,
                                whiten=cfg.cond_whiten)
        self.generator = TriplaneGenerator(GeneratorConfig(
            resolution=cfg.resolution, stem_widths=list(cfg.stem_widths), dim=cfg.vit_dim,
            depth=cfg.vit_depth, heads=cfg.vit_heads, cond_dim=cfg.cond_dim, ups=cfg.ups,
            up_widths=list(cfg.up_widths), plane_channels=cfg.plane_channels,
            blur_sigma=cfg.blur_sigma, ema_momentum=cfg.ema_momentum,
            expr_planes=cfg.expr_planes, expr_dim=self.cond.code_dim))
        check_choice("model.expr_init", cfg.expr_init, EXPR_INITS)
        if cfg.expr_init == "basis" and cfg.expr_planes:
            self._init_expr_weights_from_basis()
        self.decoder = OSGDecoder(cfg.plane_channels, cfg.decoder_hidden, cfg.decoder_features)
        self.renderer = TriplaneRenderer(RenderConfig.ffhq_corrected_axes(
            depth_resolution=cfg.depth_samples,
            depth_resolution_importance=cfg.importance_samples, ray_start=cfg.ray_start,
            ray_end=cfg.ray_end, box_warp=cfg.box_warp, chunk_points=cfg.render_chunk_points))
        self.sr = PlainSuperResolution(channels=cfg.decoder_features - 3 + 3 * cfg.sr_source,
                                       widths=tuple(cfg.sr_widths),
                                       guide_channels=3 if cfg.sr_guide else 0,
                                       cond_dim=cfg.cond_dim if cfg.sr_cond else 0)
        if not cfg.r1_gamma >= 0:
            raise ValueError(f"model.r1_gamma: expected >= 0 (0: no R1), got {cfg.r1_gamma}")
        if cfg.r1_every < 1:
            raise ValueError(f"model.r1_every: expected >= 1, got {cfg.r1_every}")
        if cfg.density_phase and cfg.w_density and cfg.density_every < 1:
            raise ValueError(f"model.density_every: expected >= 1 with model.density_phase "
                             f"(the Greg phase's interval), got {cfg.density_every}")
        self.D = None
        if cfg.w_gan > 0:
            self.D = DualDiscriminator(c_dim=25, img_resolution=cfg.resolution,
                                       channel_base=cfg.d_channel_base,
                                       channel_max=cfg.d_channel_max)
        self._perceptual = None
        self._identity = None
        self._warned = False
        self._warned_id = False
        self._fake = None

    @torch.no_grad()
    def _init_expr_weights_from_basis(self) -> None:
        """``expr_init=basis``: the expression planes' weights W (k, d) start as V^T (the first
        min(k, n) rows), the rest orthonormal and orthogonal to V."""
        if self.cond.expr is None:
            raise ValueError(f"model.expr_init='basis': needs a basis (model.cond 'clebs' or "
                             f"'e2e'), got model.cond={self.cfg.cond!r}")
        V = self.cond.expr.basis.basis().float()                  # (d, n)
        W = self.generator.expr_weights.weight                    # (k, d)
        k, n = W.shape[0], V.shape[1]
        m = min(k, n)
        W[:m] = V[:, :m].t().to(W.dtype)
        if k > n:
            rest = W[n:].float().t()                              # (d, k - n)
            rest = rest - V @ (V.t() @ rest)
            W[n:] = torch.linalg.qr(rest, mode="reduced")[0].t().to(W.dtype)

    @property
    def frozen_expression(self) -> bool:
        return self.cfg.cond == "clebs"

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_expression:
            self.cond.expr.eval()       # the frozen CLeBS encoder stays in eval mode
        return self

    # --- forward pieces --------------------------------------------------------------------
    def condition(self, beta: torch.Tensor, lam_scale: torch.Tensor | None = None, *,
                  update_stats: bool = False, with_code: bool = False):
        """beta (B, 64) -> (lambda (B, n) or None, cond (B, cond_dim)), and with ``with_code``
        also the code (B, code_dim) the MLP read (the generator's ``expr`` input with
        ``expr_planes``); ``lam_scale`` (n,) or (B, n) multiplies lambda (e2e / clebs only);
        ``update_stats``: update the condition's running statistics (``cond_norm``,
        training)."""
        lam = self.cond.coefficients(beta)
        if lam_scale is not None:
            if lam is None:
                raise ValueError("lam_scale: model.cond='direct' has no basis coefficients to "
                                 "scale")
            lam_scale = torch.as_tensor(lam_scale, dtype=lam.dtype, device=lam.device)
            if lam_scale.shape[-1] != lam.shape[-1] or lam_scale.dim() > 2:
                raise ValueError(f"lam_scale: expected shape ({lam.shape[-1]},) or "
                                 f"(B, {lam.shape[-1]}), got {tuple(lam_scale.shape)}")
            lam = lam * lam_scale
        code = self.cond.code(beta, lam, update_stats=update_stats)
        cond = self.cond.mlp(code)
        return (lam, cond, code) if with_code else (lam, cond)

    def render(self, planes: torch.Tensor, camera: torch.Tensor,
               source: torch.Tensor | None = None,
               cond: torch.Tensor | None = None,
               source_landmarks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """planes (B, 3, C, P, P), camera (B, 25) -> image (B, 3, H, W), image_raw (B, 3, r, r),
        image_depth (B, 1, r, r). ``source`` (B or 1, 3, H, W): required with ``sr_source``,
        ``sr_guide`` or ``raw_background``; ``cond`` (B, cond_dim): required with ``sr_cond``;
        ``source_landmarks`` (as source's B, 68, 2; pixels at H): required with
        ``source_mouth_mask``."""
        B = planes.shape[0]
        if camera.dim() != 2 or camera.shape != (B, 25):
            raise ValueError(f"camera: expected shape ({B}, 25) (EG3D labels), got "
                             f"{tuple(camera.shape)}")
        r = self.raw_resolution
        origins, dirs = ray_bundle(camera.float(), r)
        noise = u = None
        if not self.training:   # inference: fixed mid-interval samples (no frame-to-frame noise)
            rc = self.renderer.config
            noise = origins.new_full((B, r * r, rc.depth_resolution), 0.5)
            if rc.depth_resolution_importance:
                k = rc.depth_resolution_importance
                u = ((torch.arange(k, device=origins.device, dtype=origins.dtype) + 0.5) / k
                     ).expand(B, r * r, k).contiguous()
        ro = self.renderer(planes, self.decoder, origins.to(planes.dtype),
                           dirs.to(planes.dtype), stratified_noise=noise, importance_u=u)
        out = ro.images(r)
        feat = out["feature_image"]
        extra = feat[:, 3:]
        guide = None
        if self.cfg.sr_source or self.cfg.sr_guide or self.cfg.raw_background:
            R = self.cfg.resolution
            if source is None or source.dim() != 4 or source.shape[1:] != (3, R, R):
                raise ValueError(f"source: expected (B, 3, {R}, {R}) with model.sr_source / "
                                 f"sr_guide / raw_background, got "
                                 f"{None if source is None else tuple(source.shape)}")
            source = source.to(feat.dtype)
            box = guide_source = None
            if self.cfg.source_mouth_mask:
                S = source.shape[0]
                if source_landmarks is None or source_landmarks.shape != (S, 68, 2):
                    raise ValueError(
                        f"source_landmarks: expected shape ({S}, 68, 2) (the source frame's "
                        f"landmarks, pixels at {R}) with model.source_mouth_mask, got "
                        f"{None if source_landmarks is None else tuple(source_landmarks.shape)}")
                # masked at H before resizing, so that the raw-resolution image carries nothing
                # from inside the box (the antialiasing filter reaches past it), then again at r
                box = landmark_boxes(source_landmarks.to(source.device), R)["mouth"]
                masked = mask_mouth_box(source, box)
                paths = self.cfg.source_mouth_mask_paths
                guide_source = masked if paths in ("all", "guide") else source
                if paths in ("all", "raw"):
                    source = masked
                else:
                    box = None
            small = F.interpolate(source, size=(r, r), mode="bilinear",
                                  align_corners=False, antialias=True)
            if box is not None:
                small = mask_mouth_box(small, box * (r / R))
            small = small.expand(B, -1, -1, -1)
        rgb = feat[:, :3]
        opacity = ro.weights_sum.permute(0, 2, 1).reshape(B, 1, r, r).to(feat.dtype)
        if self.cfg.raw_background:
            rgb = rgb + (1 - opacity) * (small + 1)
        if self.cfg.sr_source:
            extra = torch.cat([extra, small], 1)
        if self.cfg.sr_guide:
            guide = (source if guide_source is None else guide_source).to(feat.dtype).expand(
                B, -1, -1, -1)
        if self.cfg.sr_cond and (cond is None or cond.shape != (B, self.cfg.cond_dim)):
            raise ValueError(f"cond: expected ({B}, {self.cfg.cond_dim}) with model.sr_cond, got "
                             f"{None if cond is None else tuple(cond.shape)}")
        image = self.sr(rgb, extra, guide, cond if self.cfg.sr_cond else None)
        return {"image": image, "image_raw": rgb, "image_depth": out["image_depth"],
                "image_opacity": opacity}

    def expression_input(self, code: torch.Tensor,
                         source_beta: torch.Tensor | None) -> torch.Tensor:
        """The expression planes' input: the driving code (B, code_dim), or with
        ``expr_relative`` its difference from the code of ``source_beta`` (B or 1, 64), the
        source frame's expression (no lambda scaling, no statistics update)."""
        if not (self.cfg.expr_relative and self.cfg.expr_planes):
            return code
        if source_beta is None or source_beta.dim() != 2 or source_beta.shape[1] != EXP_DIM \
                or source_beta.shape[0] not in (1, code.shape[0]):
            raise ValueError(f"source_beta: expected shape ({code.shape[0]} or 1, {EXP_DIM}) "
                             f"(the source frame's 3DMM expression) with model.expr_relative, "
                             f"got {None if source_beta is None else tuple(source_beta.shape)}")
        return code - self.condition(source_beta.to(code.dtype), with_code=True)[2]

    def forward(self, source: torch.Tensor, beta: torch.Tensor, camera: torch.Tensor, *,
                source_beta: torch.Tensor | None = None, lam_scale: torch.Tensor | None = None,
                source_landmarks: torch.Tensor | None = None, update_ema: bool = False):
        """``source_beta`` (B or 1, 64): the source frame's expression; required with
        ``expr_relative``, ignored otherwise. ``source_landmarks`` (B, 68, 2): the source
        frame's landmarks in pixels at H; required with ``source_mouth_mask``, ignored
        otherwise."""
        B = source.shape[0]
        if beta.dim() != 2 or beta.shape != (B, EXP_DIM):
            raise ValueError(f"beta: expected shape ({B}, {EXP_DIM}) (3DMM expression), got "
                             f"{tuple(beta.shape)}")
        lam, cond, code = self.condition(beta, lam_scale, update_stats=update_ema, with_code=True)
        planes = self.generator(source, cond, self.expression_input(code, source_beta),
                                update_ema=update_ema)
        out = self.render(planes, camera, source, cond,
                          source_landmarks if self.cfg.source_mouth_mask else None)
        out["planes"] = planes
        if lam is not None:
            out["lambda"] = lam
        return out

    # --- training --------------------------------------------------------------------------
    G_MODULES = ("generator", "cond", "decoder", "sr")

    @property
    def _density_phase(self) -> bool:
        """The density regulariser runs as its own lazy phase ``Greg`` (``density_phase``)."""
        return bool(self.cfg.density_phase and self.cfg.w_density and self.cfg.density_every)

    def build_optimizers(self):
        params = [p for n, p in self.named_parameters()
                  if p.requires_grad and not n.startswith("D.")]
        # with the Greg phase, G's Adam steps once more every density_every steps: the same
        # lazy-regularisation compensation as D's
        k = self.cfg.density_every
        r = k / (k + 1) if self._density_phase and k > 1 else 1.0
        b1, b2 = self.cfg.betas
        opts = {"G": torch.optim.Adam(params, lr=self.cfg.lr * r, betas=(b1 ** r, b2 ** r))}
        if self.D is not None:
            # lazy-regularisation compensation (StyleGAN2 / EG3D): Dreg steps D once more
            # every r1_every steps, so lr x k/(k+1) and betas ** (k/(k+1)); without R1
            # (r1_gamma 0) there is no Dreg phase to compensate
            k = self.cfg.r1_every
            r = k / (k + 1) if self.cfg.r1_gamma > 0 and k > 1 else 1.0
            b1, b2 = self.cfg.betas
            opts["D"] = torch.optim.Adam(self.D.parameters(), lr=self.cfg.d_lr * r,
                                         betas=(b1 ** r, b2 ** r))
        return opts

    def phases(self):
        greg = [Phase("Greg", "G", interval=self.cfg.density_every,
                      frozen=("D",) if self.D is not None else ())] if self._density_phase else []
        if self.D is None:
            return [Phase("G", "G"), *greg]
        # the D phases apply their update themselves (ctx.update) once the warm-up is over;
        # the lazy R1 phase only with r1_gamma > 0 (as EG3D)
        phases = [Phase("G", "G", frozen=("D",)), *greg,
                  Phase("D", None, frozen=self.G_MODULES)]
        if self.cfg.r1_gamma > 0:
            phases.append(Phase("Dreg", None, interval=self.cfg.r1_every,
                                frozen=self.G_MODULES))
        return phases

    def _identity_loss(self, pred, target):
        cfg = self.cfg
        if not cfg.arcface_weights:
            if not self._warned_id:
                log.warning("export3d: model.arcface_weights is not set; the identity loss is "
                            "off")
                self._warned_id = True
            return None
        if self._identity is None:
            from pyface.nn.arcface import IdentityLoss
            ident = IdentityLoss(weights=cfg.arcface_weights).to(pred.device)
            object.__setattr__(self, "_identity", ident)        # not part of the state dict
        return self._identity(pred, target)

    def _gan_on(self, ctx: StepContext) -> bool:
        return self.D is not None and ctx.step >= self.cfg.gan_start

    def _d_step(self, phase: str, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The discriminator phases on the pair kept by this step's G phase."""
        cfg = self.cfg
        if not self._gan_on(ctx) or self._fake is None or self._fake["step"] != ctx.step:
            return {"loss": torch.zeros((), device=ctx.device)}
        f = self._fake
        if phase == "D":
            fake_logits = self.D(f["image"], f["image_raw"], f["camera"])
            real_logits = self.D(f["real"], f["real_raw"], f["camera"])
            loss = gan_d_loss(real_logits, fake_logits)
            ctx.update("D", loss)
            return {"loss": loss.detach(), "real_logits": real_logits.detach().mean(),
                    "fake_logits": fake_logits.detach().mean()}
        img = f["real"].detach().requires_grad_(True)
        raw = f["real_raw"].detach().requires_grad_(True)
        pen = r1_penalty(self.D(img, raw, f["camera"]), [img, raw])
        loss = (pen * (cfg.r1_gamma / 2)).mean() * cfg.r1_every
        ctx.update("D", loss)
        return {"loss": loss.detach(), "r1_penalty": pen.detach().mean()}

    def _perceptual_loss(self, pred, target):
        cfg = self.cfg
        if cfg.vgg_weights:
            if self._perceptual is None:
                from pyface.nn.vgg import PerceptualLoss
                p = PerceptualLoss(weights=cfg.vgg_weights).to(pred.device).eval()
                p.requires_grad_(False)
                object.__setattr__(self, "_perceptual", p)      # not part of the state dict
            return self._perceptual(pred, target)
        if not self._warned:
            log.warning("export3d: model.vgg_weights is not set; the perceptual loss is replaced "
                        "by an image-pyramid L1 (scales 1/2, 1/4, 1/8)")
            self._warned = True
        return _pyramid_l1(pred, target)

    @staticmethod
    def _frame(batch: dict, key: str, field_: str) -> torch.Tensor:
        if key not in batch or field_ not in batch[key]:
            raise ValueError(f"batch['{key}']['{field_}']: missing; export3d trains on the 'pairs' "
                             f"dataset with coeffs, camera and landmarks")
        return batch[key][field_]

    def data_keys(self) -> dict:
        """Item keys a training step reads (checked before training by the engine)."""
        src = {"image": None}
        if self.cfg.expr_relative:
            src["coeffs"] = None
        if self.cfg.source_mouth_mask:
            src["landmarks"] = None
        return {"source": src, "driving": {"image": None, "coeffs": None, "camera": None}}

    def _greg_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """``density_phase``: the density regulariser alone on the planes of this step's batch
        (source and driving expression as the G phase reads them; no running statistics or
        T_EMA update), scaled by ``density_every`` (lazy)."""
        cfg = self.cfg
        src = image_to_float(self._frame(batch, "source", "image"))
        if self.training and cfg.augment > 0:
            src = joint_colour_augment(src, src, cfg.augment)[0]
        beta = expression_of(self._frame(batch, "driving", "coeffs"), "batch['driving']['coeffs']")
        src_beta = None
        if cfg.expr_relative:
            src_beta = expression_of(self._frame(batch, "source", "coeffs"),
                                     "batch['source']['coeffs']")
        _, cond, code = self.condition(beta, with_code=True)
        planes = self.generator(src, cond, self.expression_input(code, src_beta))
        dens = density_l1_regularizer(planes, self.decoder, plane_axes=PLANE_AXES,
                                      box_size=cfg.box_warp)
        return {"loss": cfg.w_density * cfg.density_every * dens, "density": dens.detach()}

    def step(self, phase: str, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if phase in ("D", "Dreg"):
            return self._d_step(phase, ctx)
        if phase == "Greg":
            return self._greg_step(batch)
        src = image_to_float(self._frame(batch, "source", "image"))
        tgt = image_to_float(self._frame(batch, "driving", "image"))
        R = cfg.resolution
        if src.shape[-2:] != (R, R) or tgt.shape != src.shape:
            raise ValueError(f"batch images: expected (B, 3, {R}, {R}) (model.resolution), got "
                             f"source {tuple(src.shape)}, driving {tuple(tgt.shape)}; set "
                             f"data.resolution = model.resolution")
        if self.training and cfg.augment > 0:
            src, tgt = joint_colour_augment(src, tgt, cfg.augment)
        beta = expression_of(self._frame(batch, "driving", "coeffs"), "batch['driving']['coeffs']")
        src_beta = None
        if cfg.expr_relative:
            src_beta = expression_of(self._frame(batch, "source", "coeffs"),
                                     "batch['source']['coeffs']")
        src_lm = None
        if cfg.source_mouth_mask:
            src_lm = self._frame(batch, "source", "landmarks").float()
        cam = self._frame(batch, "driving", "camera").float()
        out = self(src, beta, cam, source_beta=src_beta, source_landmarks=src_lm,
                   update_ema=self.training)
        img, raw = out["image"].float(), out["image_raw"].float()
        tgt_raw = F.interpolate(tgt, size=raw.shape[-2:], mode="bilinear", align_corners=False,
                                antialias=True)
        l1 = (img - tgt).abs().mean()
        l1_raw = (raw - tgt_raw).abs().mean()
        loss = cfg.w_l1 * l1 + cfg.w_l1_raw * l1_raw
        logs = {"l1": l1.detach(), "l1_raw": l1_raw.detach()}
        if cfg.w_perceptual:
            perc = self._perceptual_loss(img, tgt)
            loss = loss + cfg.w_perceptual * perc
            logs["perceptual"] = perc.detach()
        if cfg.w_roi and "landmarks" in batch["driving"]:
            roi = roi_l1_loss(img, tgt, landmark_boxes(batch["driving"]["landmarks"], R),
                              output_size=max(4, R // 8))
            loss = loss + cfg.w_roi * roi
            logs["roi"] = roi.detach()
        if cfg.w_roi_raw and "landmarks" in batch["driving"]:
            r = raw.shape[-1]
            boxes = {k: b * (r / R) for k, b in
                     landmark_boxes(batch["driving"]["landmarks"], R).items()}
            roi_raw = roi_l1_loss(raw, tgt_raw, boxes, output_size=max(4, r // 4))
            loss = loss + cfg.w_roi_raw * roi_raw
            logs["roi_raw"] = roi_raw.detach()
        if cfg.w_mask and "mask" in batch["driving"]:
            mask = batch["driving"]["mask"].float()
            mask = mask / 255 if batch["driving"]["mask"].dtype == torch.uint8 else mask
            mask = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=raw.shape[-2:],
                                 mode="bilinear", align_corners=False, antialias=True)
            sil = (out["image_opacity"].float() - mask).abs().mean()
            loss = loss + cfg.w_mask * sil
            logs["mask"] = sil.detach()
        if cfg.w_density and cfg.density_every and not cfg.density_phase \
                and ctx.step % cfg.density_every == 0:
            dens = density_l1_regularizer(out["planes"], self.decoder, plane_axes=PLANE_AXES,
                                          box_size=cfg.box_warp)
            loss = loss + cfg.w_density * cfg.density_every * dens
            logs["density"] = dens.detach()
        if cfg.w_identity:
            ident = self._identity_loss(img, tgt)
            if ident is not None:
                loss = loss + cfg.w_identity * ident
                logs["identity"] = ident.detach()
        if self._gan_on(ctx):
            gan = gan_g_loss(self.D(img, raw, cam))
            loss = loss + cfg.w_gan * gan
            logs["gan"] = gan.detach()
            self._fake = {"step": ctx.step, "image": img.detach(), "image_raw": raw.detach(),
                          "camera": cam, "real": tgt, "real_raw": tgt_raw}
        logs["loss"] = loss
        return logs

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        src = image_to_float(batch["source"]["image"])[:4]
        tgt = image_to_float(batch["driving"]["image"])[:4]
        beta = expression_of(batch["driving"]["coeffs"][:4])
        sb = expression_of(batch["source"]["coeffs"][:4]) if self.cfg.expr_relative else None
        cam = batch["driving"]["camera"][:4].float()
        sl = batch["source"]["landmarks"][:4].float() if self.cfg.source_mouth_mask else None
        out = self(src, beta, cam, source_beta=sb, source_landmarks=sl)
        up = F.interpolate(out["image_raw"], size=src.shape[-2:], mode="nearest")
        grid = {"source": src, "driving": tgt, "output": out["image"], "raw": up}
        n = self.cond.n
        if n:   # editing: the first two basis coefficients scaled by 0 and 2
            for i in range(min(2, n)):
                for s in (0.0, 2.0):
                    scale = torch.ones(n, device=src.device)
                    scale[i] = s
                    grid[f"lambda{i} x{s:g}"] = self(src, beta, cam, source_beta=sb,
                                                     source_landmarks=sl,
                                                     lam_scale=scale)["image"]
        return grid
