# Provenance: reproduces the semantics of Export3D's CLeBS pre-training (Ki et al., "Learning to
# Generate Conditional Tri-plane for 3D-aware Expression Controllable Portrait Animation",
# ECCV 2024; no code or weights were released). Our own implementation, written from the paper's
# description and our design study (shared/reference/specs/export3d-mmfa.md section 1); no
# upstream code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""CLeBS: contrastive learning of an appearance-free expression code (Export3D stage 1).

* :class:`ExpressionEncoder` ``f_e``: 3DMM expression ``beta (..., 64)`` -> MLP -> coefficients
  ``lambda (..., n)`` -> ``beta' = sum_i lambda_i v_i (..., d)`` over an orthonormal basis
  ``V (d, n)`` (:class:`pyface.nn.codebook.OrthogonalBasis`, Q of a QR decomposition).
* :class:`ImageEncoder` ``f_I``: a small ResNet + projection head, image -> ``(..., d)``; used only
  in pre-training.
* :class:`CLeBS` (registered ``export3d_clebs``): symmetric InfoNCE between ``f_I(X_j)`` and
  ``f_e(beta_k)`` over the N frames of one video (every other frame of the same video is a
  negative), with a learnable temperature; optionally ([D]) a video-invariance term
  (:func:`video_invariance`) and f_e on beta whitened by the training videos' mean-expression
  covariance (``whiten``), which the same-video InfoNCE alone cannot learn to ignore.
* ``fe_init="fisher"`` ([D]): a linear f_e starts at the closed-form minimiser of the
  (joint) video-invariance term (:func:`fisher_directions`, the generalised eigenvectors of the within-
  and between-video scatter of beta over the stage's training videos); ``fe_freeze`` keeps it
  there and trains only f_I and the temperature.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn.codebook import LearnableTemperature, OrthogonalBasis, info_nce
from pyface.nn.encoders import ResNetEncoder
from pyface.train.model import Phase, StepContext, TrainableModel, check_choice

log = logging.getLogger(__name__)

#: slice of the expression coefficients in a Deep3DFaceRecon vector (257,)
EXP_SLICE = slice(80, 144)
EXP_DIM = 64


def expression_of(coeffs: torch.Tensor, name: str = "coeffs") -> torch.Tensor:
    """coeffs: (..., 257) Deep3DFaceRecon coefficients -> expression (..., 64) (float)."""
    if not isinstance(coeffs, torch.Tensor) or coeffs.dim() < 1 or coeffs.shape[-1] != 257:
        got = tuple(coeffs.shape) if isinstance(coeffs, torch.Tensor) else type(coeffs).__name__
        raise ValueError(f"{name}: expected Deep3DFaceRecon coefficients of shape (..., 257), "
                         f"got {got}")
    return coeffs[..., EXP_SLICE].float()


def image_to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images -> float32 in [-1, 1] (same shape)."""
    if image.dtype == torch.uint8:
        return image.float() / 127.5 - 1.0
    return image.float()


@dataclass
class CLeBSConfig:
    """Stage 1 (CLeBS). [P]: paper, [D]: our decision (see docs/models/export3d.md).

    Attributes:
        n: number of basis directions / coefficients lambda ([P] n << 64; [D] 10).
        dim: d, the dimension of beta' and of the basis ([D] 512 at paper scale).
        hidden: widths of the f_e MLP ([D] 64-256-256-n).
        image_stem, image_widths, image_depths: the image encoder's ResNet ([D]).
        image_stem_pool: the ResNet stem's max-pool (default True); False runs f_I's stages at
            twice the resolution (H/2 instead of H/4 after the stem; [D]).
        image_flatten: f_I's head reads the last stage's map flattened, (C, h, w) -> C h w, so
            where a feature is (mouth or eyes) is kept, instead of its spatial mean (default
            False; [D]).
        image_stem_stride: the stride of f_I's 7x7 stem convolution (default 2, ResNet's); 4
            reads frames of twice the size (e.g. 128^2 instead of 64^2) at the same stage
            resolutions and nearly the same cost ([D]).
        image_crops: side c of the landmark crops f_I also reads (default 0: off; [D]): a mouth
            window (a square of ``image_crop_box`` x the frame size, centred on landmarks
            48-67) and an eye band (twice as wide, centred on landmarks 36-47), each resampled
            (bilinear) to c x c from the full-resolution frame, stacked to 6 channels, read by a
            second ResNet of f_I's widths (without the stem max-pool) whose pooled features are
            concatenated with the frame's before the head. Needs ``landmarks (B, N, 68, 2)`` in
            the batch (pixels of the frame).
        image_crop_box: the mouth window's side as a fraction of the frame size ([D] 0.375).
        image_head: f_I's projection from the pooled ResNet features to d: ``mlp`` (Linear to
            the last width, ReLU, Linear to d; the default, what runs and configs without the
            key have) or ``linear`` (one Linear to d, the design study's "ResNetEncoder +
            Linear(2048 -> 512)"; ``gpu-short`` and ``full``). f_I is dropped after stage 1,
            so this changes stage 1's training only.
        temperature: initial tau ([D] CLIP's 0.07, learnable).
        resolution: image size (must equal data.resolution).
        lr, weight_decay: AdamW ([D] 1e-4, 0.01).
        temperature_decay: whether AdamW's weight decay also pulls the temperature's
            ``log(1 / tau)`` towards 0 (tau towards 1). Default False: the temperature is in a
            group without decay, as CLIP leaves its logit scale out; it is a setting of the
            loss, not a weight to keep small. True: the grouping of runs saved before this
            option, which load with it (``saved_before``), so they resume exactly. The other
            parameters (biases and batch-norm gains included) keep the decay ([D]).
        augment: training-time augmentation of f_I's input ([D]): every frame gets a random
            shift and scale of up to this fraction and a random colour gain / offset of up to
            this amount (0: off, the default; with 8 training identities it lowered held-out
            retrieval, with the 128 of `tiny` and ``fe_init`` 0.1 raises it, see
            docs/models/export3d-measured.md).
        offset_noise: std of a random offset added in training to all N expression vectors of a
            clip (one offset per clip, all 64 dimensions; [D], 0: off). Appearance that leaks
            into the 3DMM expression is constant within a video, like this offset, so the same-
            video contrast teaches f_e to ignore it in every direction, not only in the few
            spanned by the training identities.
        w_invariance: weight of the video-invariance term ([D], 0: off): for every coefficient
            lambda_i, the variance of its clip means across the batch's clips (different
            videos) over its mean variance within a clip. Appearance that leaks into the 3DMM
            expression is constant within a video and differs between videos; the InfoNCE over
            frames of one video is blind to such constants, this term is not. It needs many
            training identities to generalise (docs/models/export3d-measured.md,
            "CLeBS: what limits it").
        invariance: ``"coefficient"`` (default: the per-coefficient ratios above) or
            ``"joint"`` ([D]): the rotation-invariant ratio of the between- and within-video
            covariances of lambda (:func:`video_invariance` with ``joint``), which mixing the
            coefficients cannot lower.
        whiten: f_e whitens beta by the running covariance of the training videos' mean
            expression before its MLP ([D], :meth:`ExpressionEncoder.update_video_stats`;
            the statistics are buffers of f_e, frozen with it after pre-training).
        fe_init: ``"none"`` (default: random f_e) or ``"fisher"`` ([D]): before the first
            training step, one pass over the training set's stored coefficients (no images)
            sets a linear f_e (``hidden: []``) to the closed-form minimiser of the
            (joint) video-invariance term: the n directions of beta with the largest within-video over
            between-video variance (:func:`fisher_directions`; with ``whiten`` the whitening
            statistics are set from the same pass).
        fe_freeze: keep f_e (and its whitening statistics) fixed; only f_I and the temperature
            are trained ([D], default off).
        sim_gain: the contrastive similarity weights the code per coefficient ([D], default
            off): InfoNCE compares f_I(X) with ``sum_i exp(s_i) lambda_i v_i`` (s (n,) learned,
            initially 0, the module's ``sim_log_gain``) instead of beta', an expression-side
            projection head used only in pre-training like f_I's. f_e itself (what stage 2
            loads) is not changed by it. The closed-form init gives every coefficient the same
            within-video variance, the ones the 64^2 images hardly show (brows, cheek puff,
            smile_left) as much as jaw and blink; the gains let the loss weight what f_I can see.
        sim_gain_lr: learning-rate multiplier of ``s`` (no weight decay), so that the gains can
            move by several e-folds within a short run ([D] 10).
        w_regress: weight of an auxiliary regression of f_I onto the expression code ([D], 0:
            off): ``|f_I(X) - key|^2 / n`` per frame with the contrastive key (beta', or its
            ``sim_gain`` version) detached (no gradient into f_e or the gains), so f_I is told
            every frame's code, not only which of the clip's N codes is its.
    """

    n: int = 10
    dim: int = 512
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    image_stem: int = 64
    image_widths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    image_depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    image_stem_pool: bool = True
    image_flatten: bool = False
    image_stem_stride: int = 2
    image_crops: int = 0
    image_crop_box: float = 0.375
    image_head: str = "mlp"
    temperature: float = 0.07
    resolution: int = 224
    lr: float = 1e-4
    weight_decay: float = 0.01
    temperature_decay: bool = False
    augment: float = 0.0
    offset_noise: float = 0.0
    w_invariance: float = 0.0
    invariance: str = "coefficient"
    whiten: bool = False
    fe_init: str = "none"
    fe_freeze: bool = False
    sim_gain: bool = False
    sim_gain_lr: float = 10.0
    w_regress: float = 0.0

    #: the values of options added since with a default that changed training, for a saved
    #: config without them (a run saved before: resumed, reused and loaded as it was trained;
    #: :func:`pyface.train.model.config_from_dict`)
    saved_before: ClassVar[dict[str, Any]] = {"temperature_decay": True}


FE_INITS = ("none", "fisher")
IMAGE_HEADS = ("mlp", "linear")


def augment_frames(img: torch.Tensor, amount: float) -> torch.Tensor:
    """img (B, 3, H, W) in [-1, 1] -> randomly shifted / scaled (up to ``amount`` of the size)
    and colour-jittered (gain 1 +- amount, offset +- amount per channel) frames."""
    B = img.shape[0]
    dev, dt = img.device, img.dtype
    s = 1 + (torch.rand(B, device=dev, dtype=dt) * 2 - 1) * amount
    t = (torch.rand(B, 2, device=dev, dtype=dt) * 2 - 1) * amount * 2
    theta = torch.zeros(B, 2, 3, device=dev, dtype=dt)
    theta[:, 0, 0] = theta[:, 1, 1] = s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = 1 + (torch.rand(B, 3, 1, 1, device=dev, dtype=dt) * 2 - 1) * amount
    off = (torch.rand(B, 3, 1, 1, device=dev, dtype=dt) * 2 - 1) * amount
    return out * gain + off


#: landmark groups of :func:`landmark_crops`: (first, last + 1, window width / height in units
#: of the mouth window's side)
CROP_GROUPS = (("mouth", 48, 68, 1.0, 1.0), ("eyes", 36, 48, 2.0, 1.0))


def landmark_crops(img: torch.Tensor, landmarks: torch.Tensor, size: int,
                   box: float) -> torch.Tensor:
    """img (B, 3, H, W), landmarks (B, 68, 2) in pixels of img -> crops (B, 6, size, size): the
    mouth window (side ``box`` H, centred on the mean of landmarks 48-67) and the eye band
    (2 ``box`` W wide, ``box`` H high, centred on landmarks 36-47), bilinearly resampled
    (border padding) and stacked along the channels."""
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"img: expected (B, 3, H, W), got {tuple(img.shape)}")
    B, _, H, W = img.shape
    if landmarks.shape != (B, 68, 2):
        raise ValueError(f"landmarks: expected shape ({B}, 68, 2), got "
                         f"{tuple(landmarks.shape)}")
    if size < 1 or not 0 < box <= 1:
        raise ValueError(f"size / box: expected >= 1 / in (0, 1], got {size} / {box}")
    lm = landmarks.to(img.dtype)
    out = []
    for _, a, b, fw, fh in CROP_GROUPS:
        c = lm[:, a:b].mean(1)                                          # (B, 2) pixels
        theta = img.new_zeros(B, 2, 3)
        theta[:, 0, 0] = min(box * fw, 1.0)
        theta[:, 1, 1] = min(box * fh, 1.0)
        theta[:, 0, 2] = 2 * c[:, 0] / W - 1
        theta[:, 1, 2] = 2 * c[:, 1] / H - 1
        grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
        out.append(F.grid_sample(img, grid, mode="bilinear", padding_mode="border",
                                 align_corners=False))
    return torch.cat(out, 1)


def video_invariance(lam: torch.Tensor, eps: float = 1e-4, joint: bool = False) -> torch.Tensor:
    """lam (B, N, n): the coefficients of N frames of each of B videos (B >= 2) -> scalar.

    Default: sum over the n coefficients of var_B(mean_N lam) / (mean_B var_N lam + eps). Small
    when every coefficient varies within a video and its video means agree (an LDA-style
    ratio). It is not invariant to mixing the coefficients: a component with a large within-
    video variance shared by every coefficient lowers each ratio while their differences may
    still carry a per-video offset (docs/models/export3d-measured.md, "CLeBS: the closed-form f_e").

    ``joint``: the rotation-invariant ratio ``trace(W^-1 S)`` of the between-video covariance
    S (n, n) of the clip means and the mean within-clip covariance W (n, n) (plus ``eps``
    times its mean variance on the diagonal): the sum of the generalised eigenvalues, so every
    direction of lambda's span counts, not only the n axes."""
    if lam.dim() != 3 or lam.shape[0] < 2 or lam.shape[1] < 2:
        raise ValueError(f"lam: expected (B, N, n) with B >= 2 videos and N >= 2 frames, got "
                         f"{tuple(lam.shape)}")
    if joint:
        means = lam.mean(1)                                             # (B, n)
        d = means - means.mean(0)
        between = d.t() @ d / (lam.shape[0] - 1)                        # (n, n)
        c = lam - lam.mean(1, keepdim=True)
        within = torch.einsum("bti,btj->ij", c, c) / (lam.shape[0] * (lam.shape[1] - 1))
        n = lam.shape[-1]
        within = within + (eps + eps * within.diagonal().mean()) * torch.eye(
            n, device=lam.device, dtype=lam.dtype)
        return torch.linalg.solve(within, between).diagonal().sum()
    between = lam.mean(1).var(0)                      # (n,)
    within = lam.var(1).mean(0)                       # (n,)
    return (between / (within + eps)).sum()


def video_mean_whitener(cov: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """cov (k, k): covariance of the per-video mean expression -> the symmetric whitener
    ``V diag(1 / sqrt(e + eps mean(e))) V^T`` (k, k) of its eigendecomposition ``V diag(e) V^T``
    (float64; ``eps`` regularises the directions the videos' means do not span)."""
    e, V = torch.linalg.eigh(cov.double())
    e = e.clamp_min(0)
    inv = (e + eps * e.mean() + 1e-12).rsqrt()
    return (V * inv) @ V.t()


@torch.no_grad()
def fisher_directions(videos: list[torch.Tensor], n: int, eps: float = 1e-2) -> dict:
    """The closed-form minimiser of :func:`video_invariance` (``joint``) for a LINEAR map of
    beta: the n-dimensional span with the least between-video variance per unit of within-video
    variance.

    videos: per-video expression ``(T_v, k)`` (at least 2 videos of at least 2 frames each).
    The ratio of between-video to within-video variance of ``beta a`` is a generalised Rayleigh
    quotient; after whitening by the covariance of the video means (:func:`video_mean_whitener`,
    between-video scatter about the identity) its minimisers are the top eigenvectors of the
    within-video scatter of the whitened expression (LDA / Fisher directions, most within-video
    variance per unit of between-video variance).

    Returns a dict (float64 tensors): ``mean`` (k,) the mean of the video means, ``cov`` (k, k)
    their covariance, ``whitener`` (k, k), ``proj`` (k, n) the whitened directions scaled to
    unit within-video variance (so ``lambda = (beta - mean) @ whitener @ proj``),
    ``frame_mean`` (k,) the mean over all frames, and per direction ``within`` (n,) (its
    within-video variance before scaling) and ``ratio`` (n,) (between over within variance of
    lambda_i on these videos, what the invariance term sums).
    """
    if len(videos) < 2:
        raise ValueError(f"videos: expected at least 2 videos, got {len(videos)}")
    k = videos[0].shape[-1]
    for i, v in enumerate(videos):
        if v.dim() != 2 or v.shape[0] < 2 or v.shape[1] != k:
            raise ValueError(f"videos[{i}]: expected (T >= 2, {k}), got {tuple(v.shape)}")
    if not 1 <= n <= k:
        raise ValueError(f"n: expected 1 <= n <= {k}, got {n}")
    vids = [v.double() for v in videos]
    means = torch.stack([v.mean(0) for v in vids])                       # (V, k)
    mu = means.mean(0)
    d = means - mu
    cov = d.t() @ d / (means.shape[0] - 1)
    wh = video_mean_whitener(cov, eps)
    cen = torch.cat([(v - v.mean(0)) @ wh for v in vids])              # (T, k) whitened
    sw = cen.t() @ cen / cen.shape[0]
    e, U = torch.linalg.eigh(sw)                                        # ascending
    within, U = e.flip(0)[:n].clamp_min(1e-12), U.flip(1)[:, :n]
    proj = U / within.sqrt()
    lam_means = (means - mu) @ wh @ proj                                 # (V, n)
    ratio = lam_means.var(0)                 # over the within-video variance, which is 1
    frame_mean = torch.cat(vids).mean(0)
    return {"mean": mu, "cov": cov, "whitener": wh, "proj": proj, "frame_mean": frame_mean,
            "within": within, "ratio": ratio}


@torch.no_grad()
def ema_moments_(mean: torch.Tensor, spread: torch.Tensor, mu: torch.Tensor,
                 batch_spread: torch.Tensor, momentum: float, *, first: bool) -> None:
    """In place: running ``mean`` (k,) and ``spread`` — the variance (k,) or the covariance
    (k, k) — of a quantity whose batch has mean ``mu`` (k,) and spread ``batch_spread`` (same
    shape as ``spread``), as an exponential moving average with ``momentum``; the spread of the
    mixture includes the shift of the mean (m·δδᵀ, or m·δ² for a variance). ``first`` copies the
    batch's moments."""
    if first:
        mean.copy_(mu)
        spread.copy_(batch_spread)
        return
    delta = mu - mean
    shift = torch.outer(delta, delta) if spread.dim() == 2 else delta * delta
    mean.add_(delta, alpha=1 - momentum)
    spread.mul_(momentum).add_(batch_spread + momentum * shift, alpha=1 - momentum)

class ExpressionEncoder(nn.Module):
    """f_e: expression beta (..., 64) -> (lambda (..., n), beta' (..., dim)).

    ``coefficients(beta)`` gives lambda; ``combine(lambda)`` gives ``beta' = lambda @ V^T``;
    ``forward`` both. V (dim, n) has orthonormal columns (``basis.basis()``).
    """

    def __init__(self, n: int, dim: int, hidden: list[int] | tuple[int, ...] = (256, 256),
                 whiten: bool = False, whiten_momentum: float = 0.99):
        super().__init__()
        self.whiten = bool(whiten)
        self.whiten_momentum = float(whiten_momentum)
        if self.whiten:
            # running statistics of the per-video mean expression (training clips) and the
            # whitening transform they give: beta -> (beta - mean) W, W = cov^(-1/2)
            self.register_buffer("video_mean", torch.zeros(EXP_DIM))
            self.register_buffer("video_cov", torch.zeros(EXP_DIM, EXP_DIM))
            self.register_buffer("whitener", torch.eye(EXP_DIM))
            self.register_buffer("video_batches", torch.zeros((), dtype=torch.long))
        layers: list[nn.Module] = []
        cin = EXP_DIM
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.LeakyReLU(0.2)]
            cin = h
        layers.append(nn.Linear(cin, n))
        self.mlp = nn.Sequential(*layers)
        self.basis = OrthogonalBasis(dim, n)
        self.n, self.dim = n, dim

    @torch.no_grad()
    def update_video_stats(self, beta: torch.Tensor, eps: float = 1e-2) -> None:
        """beta (B, N, 64): N frames of each of B videos (training) -> updates the running mean
        and covariance of the per-video mean expression (EMA, ``whiten_momentum``) and the
        whitener ``V diag(1 / sqrt(e + eps mean(e))) V^T`` of that covariance (eigen-
        decomposition ``V diag(e) V^T``). Appearance that leaks into the 3DMM expression moves
        every frame of a video alike, so it lives in this covariance; the within-video
        expression changes that CLeBS contrasts stand out after whitening."""
        import torch.distributed as dist

        if not self.whiten:
            raise ValueError("update_video_stats: this encoder was built with whiten=False")
        if beta.dim() != 3 or beta.shape[-1] != EXP_DIM:
            raise ValueError(f"beta: expected (B, N, {EXP_DIM}) with B >= 2 videos, got "
                             f"{tuple(beta.shape)}")
        means = beta.float().mean(1)                                      # (B, 64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # under torchrun (every rank calls this with its share of the global batch): the
            # statistics of all ranks' videos, so every rank keeps those of one process
            parts = [torch.empty_like(means) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, means.contiguous())
            means = torch.cat(parts)
        if means.shape[0] < 2:
            raise ValueError(f"beta: expected (B, N, {EXP_DIM}) with B >= 2 videos (over all "
                             f"ranks), got {tuple(beta.shape)}")
        mu = means.mean(0)
        d = means - mu
        cov = d.t() @ d / (means.shape[0] - 1)
        ema_moments_(self.video_mean, self.video_cov, mu, cov, self.whiten_momentum,
                     first=int(self.video_batches) == 0)
        self.video_batches += 1
        self.whitener.copy_(video_mean_whitener(self.video_cov, eps))

    @torch.no_grad()
    def init_fisher(self, videos: list[torch.Tensor], eps: float = 1e-2) -> dict:
        """Sets a linear f_e (``hidden: []``) to the closed-form minimiser of the video-
        invariance term on ``videos`` (per-video expression ``(T_v, 64)``;
        :func:`fisher_directions`): lambda_i = the i-th Fisher direction of beta, unit
        within-video variance, zero mean over the frames. With ``whiten`` the whitening
        statistics are set from the same videos (and count as one batch of the running
        average). Returns :func:`fisher_directions`' dict."""
        lin = self.mlp[0]
        if len(self.mlp) != 1 or not isinstance(lin, nn.Linear):
            raise ValueError("fe_init='fisher': expected a linear f_e (model.hidden = []), got "
                             f"{len(self.mlp) // 2} hidden layers")
        fd = fisher_directions(videos, self.n, eps)
        if self.whiten:
            self.video_mean.copy_(fd["mean"])
            self.video_cov.copy_(fd["cov"])
            self.whitener.copy_(fd["whitener"])
            self.video_batches.fill_(1)
            # x = (beta - mean) W; lambda = x proj + b
            weight = fd["proj"]
            bias = -((fd["frame_mean"] - fd["mean"]) @ fd["whitener"] @ weight)
        else:
            weight = fd["whitener"] @ fd["proj"]
            bias = -(fd["frame_mean"] @ weight)
        lin.weight.copy_(weight.t())
        lin.bias.copy_(bias)
        return fd

    def coefficients(self, beta: torch.Tensor) -> torch.Tensor:
        if beta.dim() < 1 or beta.shape[-1] != EXP_DIM:
            raise ValueError(f"beta: expected 3DMM expression of shape (..., {EXP_DIM}), got "
                             f"{tuple(beta.shape)}")
        x = beta.float()
        if self.whiten:
            x = (x - self.video_mean) @ self.whitener
        return self.mlp(x)

    def combine(self, lam: torch.Tensor) -> torch.Tensor:
        return self.basis(lam)

    def forward(self, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.coefficients(beta)
        return lam, self.combine(lam)


class ImageEncoder(nn.Module):
    """f_I: image (B, 3, H, W) in [-1, 1] -> embedding (B, dim) (ResNet, pooled, MLP head).

    ``flatten_size``: the input size H = W; when given, the head reads the last stage's map
    flattened (B, C h w) instead of its spatial mean (B, C). ``stem_stride``: the stem
    convolution's stride. ``crop_channels``: when > 0, a second ResNet (same widths, no stem
    max-pool) reads ``crops (B, crop_channels, c, c)`` and its pooled features join the
    frame's before the head. ``head``: ``mlp`` (Linear to widths[-1], ReLU, Linear to dim) or
    ``linear`` (one Linear to dim)."""

    def __init__(self, dim: int, stem: int, widths: list[int], depths: list[int],
                 stem_pool: bool = True, flatten_size: int | None = None, stem_stride: int = 2,
                 crop_channels: int = 0, head: str = "mlp"):
        super().__init__()
        check_choice("model.image_head", head, IMAGE_HEADS)
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"image_widths / image_depths: expected equal non-empty lengths, got "
                             f"{widths} / {depths}")
        self.backbone = ResNetEncoder(stem_channels=stem, widths=list(widths), depths=list(depths),
                                      stem_pool=stem_pool, stem_stride=stem_stride)
        self.crop_backbone = None
        if crop_channels > 0:
            self.crop_backbone = ResNetEncoder(in_channels=crop_channels, stem_channels=stem,
                                               widths=list(widths), depths=list(depths),
                                               stem_pool=False)
        self.flatten = flatten_size is not None
        cin = widths[-1]
        if self.flatten:
            self.backbone.eval()                   # (no BatchNorm statistics from the probe)
            with torch.no_grad():
                probe = torch.zeros(1, 3, flatten_size, flatten_size)
                cin = self.backbone.features(probe)[-1].numel()
            self.backbone.train()
        if self.crop_backbone is not None:
            cin += widths[-1]
        if head == "linear":
            self.head = nn.Sequential(nn.Linear(cin, dim))
        else:
            self.head = nn.Sequential(nn.Linear(cin, widths[-1]), nn.ReLU(),
                                      nn.Linear(widths[-1], dim))

    def forward(self, image: torch.Tensor, crops: torch.Tensor | None = None) -> torch.Tensor:
        if self.flatten:
            f = self.backbone.features(image)[-1].flatten(1)
        else:
            f = self.backbone(image)
        if self.crop_backbone is not None:
            if crops is None:
                raise ValueError("crops: f_I was built with landmark crops (model.image_crops > "
                                 "0); expected crops (B, C, c, c), got None")
            f = torch.cat([f, self.crop_backbone(crops)], -1)
        return self.head(f)


class CLeBS(TrainableModel):
    """Export3D stage 1 (registered ``export3d_clebs``); data: the ``clips`` dataset.

    ``step`` takes a batch of ``image (B, N, 3, H, W)`` and ``coeffs (B, N, 257)`` (N frames of
    one video per item) and returns the symmetric InfoNCE of the B separate N x N problems.
    After training, only ``expr`` (f_e) is used (Export3D freezes it; f_I is dropped).
    """

    Config = CLeBSConfig
    #: train.compile: the image encoder and the expression encoder
    compile_modules = ("image_encoder", "expr")
    recipe = {"data": {"name": "clips", "resolution": 224,
                       "options": {"frames": 16, "min_gap": 3, "synth": {"exp_leak": 0.5}}},
              "train": {"steps": 20000, "batch_size": 16, "ckpt_every": 2000,
                        "image_every": 0, "lr_schedule": {"kind": "cosine", "warmup_steps": 200,
                                                          "min_factor": 0.1}}}
    presets = {
        # 2-core CPU: 64^2, small ResNet, n=10, d=64, N=8; a linear f_e on beta whitened by the
        # video-mean statistics, with the video-invariance term; 128 identities x 2 videos x 32
        # frames (no cross-identity or multi-view sets): the leak spans 48 directions and a
        # linear leak removal needs about 100 training identities
        # (docs/models/export3d-measured.md);
        # f_e starts at the closed-form minimiser of the invariance term (fe_init: fisher);
        # f_I's input is augmented (held-out retrieval 0.275 -> 0.312 on the validation split)
        "tiny": {"model": {"n": 10, "dim": 64, "hidden": [], "image_stem": 16,
                           "image_widths": [32, 64, 128], "image_depths": [1, 1, 1],
                           "resolution": 64, "lr": 1e-3, "whiten": True, "w_invariance": 1.0,
                           "fe_init": "fisher", "augment": 0.1},
                 "data": {"name": "clips", "resolution": 64,
                          "options": {"frames": 8, "min_gap": 3,
                                      "synth": {"exp_leak": 0.5, "identities": 128,
                                                "frames": 32, "cross": False,
                                                "multiview": False}}},
                 "train": {"steps": 1600, "batch_size": 8, "ckpt_every": 400, "image_every": 0,
                           "log_every": 50,
                           "lr_schedule": {"kind": "cosine", "warmup_steps": 20,
                                           "min_factor": 0.1}}},
        # one H100/H200, about 1 minute: 256^2 frames at 128^2 into a mid ResNet
        "gpu-short": {"model": {"n": 10, "dim": 256, "image_stem": 32,
                                "image_widths": [64, 128, 256, 512], "image_depths": [1, 2, 2, 1],
                                "resolution": 128, "lr": 5e-4, "image_head": "linear"},
                      "data": {"name": "clips", "resolution": 128,
                               "options": {"frames": 8, "min_gap": 3,
                                           "synth": {"exp_leak": 0.5, "identities": 16,
                                                     "videos_per_identity": 4, "frames": 64}}},
                      "train": {"steps": 1500, "batch_size": 16, "ckpt_every": 500,
                                "image_every": 0,
                                "lr_schedule": {"kind": "cosine", "warmup_steps": 50,
                                                "min_factor": 0.1}}},
        # paper scale (our reading): ResNet-50 at 224^2 + Linear(2048 -> 512), n=10, d=512,
        # 16 videos x 16 frames
        "full": {"model": {"image_head": "linear"}},
    }

    def __init__(self, cfg: CLeBSConfig | None = None):
        super().__init__()
        cfg = cfg or CLeBSConfig()
        if cfg.n < 1 or cfg.n > cfg.dim:
            raise ValueError(f"model.n: expected 1 <= n <= model.dim ({cfg.dim}), got {cfg.n}")
        if cfg.invariance not in ("coefficient", "joint"):
            raise ValueError(f"model.invariance: expected 'coefficient' or 'joint', got "
                             f"{cfg.invariance!r}")
        if cfg.w_regress < 0:
            raise ValueError(f"model.w_regress: expected >= 0, got {cfg.w_regress}")
        if cfg.sim_gain_lr <= 0:
            raise ValueError(f"model.sim_gain_lr: expected > 0, got {cfg.sim_gain_lr}")
        check_choice("model.fe_init", cfg.fe_init, FE_INITS)
        if cfg.fe_init == "fisher" and cfg.hidden:
            raise ValueError(f"model.fe_init='fisher' needs a linear f_e: expected "
                             f"model.hidden = [], got {list(cfg.hidden)}")
        self.cfg = cfg
        self.expr = ExpressionEncoder(cfg.n, cfg.dim, cfg.hidden, whiten=cfg.whiten)
        if cfg.image_stem_stride not in (1, 2, 4):
            raise ValueError(f"model.image_stem_stride: expected 1, 2 or 4, got "
                             f"{cfg.image_stem_stride}")
        if cfg.image_crops < 0 or not 0 < cfg.image_crop_box <= 1:
            raise ValueError(f"model.image_crops / image_crop_box: expected >= 0 / in (0, 1], "
                             f"got {cfg.image_crops} / {cfg.image_crop_box}")
        self.image_encoder = ImageEncoder(cfg.dim, cfg.image_stem, cfg.image_widths,
                                          cfg.image_depths, cfg.image_stem_pool,
                                          cfg.resolution if cfg.image_flatten else None,
                                          stem_stride=cfg.image_stem_stride,
                                          crop_channels=3 * len(CROP_GROUPS)
                                          if cfg.image_crops else 0, head=cfg.image_head)
        self.temperature = LearnableTemperature(cfg.temperature)
        if cfg.sim_gain:
            self.sim_log_gain = nn.Parameter(torch.zeros(cfg.n))
        if cfg.fe_init != "none":
            # set once the closed-form initialisation ran (saved: a resumed run keeps f_e)
            self.register_buffer("fe_initialised", torch.zeros((), dtype=torch.bool))
        if cfg.fe_freeze:
            self.expr.requires_grad_(False)
        #: what the last :meth:`init_expression` found (directions' ratios, seconds), or None
        self.init_report: dict | None = None

    def build_optimizers(self):
        """One AdamW: every trained parameter with ``weight_decay``, but the temperature
        (unless ``temperature_decay``) and the similarity gains in groups without decay."""
        apart = {"sim_log_gain"}
        if not self.cfg.temperature_decay:
            apart.add("temperature.log_scale")
        params = [p for name, p in self.named_parameters()
                  if not (self.cfg.fe_freeze and name.startswith("expr.")) and
                  name not in apart]
        groups = [{"params": params}]
        if not self.cfg.temperature_decay:
            groups.append({"params": [self.temperature.log_scale], "weight_decay": 0.0})
        if self.cfg.sim_gain:
            groups.append({"params": [self.sim_log_gain], "weight_decay": 0.0,
                           "lr": self.cfg.lr * self.cfg.sim_gain_lr})
        return {"main": torch.optim.AdamW(groups, lr=self.cfg.lr,
                                          weight_decay=self.cfg.weight_decay)}

    @torch.no_grad()
    def init_expression(self, dataset) -> dict:
        """``fe_init='fisher'``: sets f_e from one pass over ``dataset``'s stored coefficients
        (a video dataset with ``coeffs``, a list per video of ``(T, 257)`` arrays, and, for the
        ``clips`` dataset, ``clip_videos``; no images are read): the expression of every video
        the dataset draws from (:meth:`ExpressionEncoder.init_fisher`). Returns a report
        (videos, frames, seconds, the per-direction between / within ratios)."""
        import time

        t0 = time.perf_counter()
        coeffs = getattr(dataset, "coeffs", None)
        if coeffs is None:
            raise ValueError(f"dataset: fe_init='fisher' reads the stored coefficients of every "
                             f"video (a pyface video dataset with .coeffs), got "
                             f"{type(dataset).__name__}")
        which = getattr(dataset, "clip_videos", range(len(coeffs)))
        videos = []
        for v in which:
            if coeffs[v] is None:
                raise ValueError(f"dataset: video {v} has no coeffs.npy; fe_init='fisher' needs "
                                 f"the coefficients of every video")
            videos.append(expression_of(torch.as_tensor(coeffs[v]), f"coeffs of video {v}"))
        fd = self.expr.init_fisher(videos)
        self.fe_initialised.fill_(True)
        self.init_report = {"videos": len(videos), "frames": int(sum(len(v) for v in videos)),
                            "seconds": time.perf_counter() - t0,
                            "ratio": [round(float(r), 4) for r in fd["ratio"]],
                            "within": [round(float(w), 4) for w in fd["within"]]}
        return self.init_report

    def phases(self):
        return [Phase("main", "main")]

    def embed(self, image: torch.Tensor, coeffs: torch.Tensor,
              landmarks: torch.Tensor | None = None):
        """image (B, N, 3, H, W), coeffs (B, N, 257), landmarks (B, N, 68, 2) pixels (needed
        with ``image_crops``) -> (f_I (B, N, d), the contrastive key (B, N, d), lambda
        (B, N, n)). The key is beta' = f_e's code; with ``sim_gain`` the code of the gained
        coefficients, ``sum_i exp(s_i) lambda_i v_i``."""
        if image.dim() != 5 or image.shape[2] != 3:
            raise ValueError(f"batch['image']: expected clips of shape (B, N, 3, H, W), got "
                             f"{tuple(image.shape)}")
        R = self.cfg.resolution
        if image.shape[-2:] != (R, R):
            raise ValueError(f"batch['image']: expected {R}x{R} frames (model.resolution), got "
                             f"{tuple(image.shape)}; set data.resolution = model.resolution")
        B, N = image.shape[:2]
        if coeffs.shape != (B, N, 257):
            raise ValueError(f"batch['coeffs']: expected shape ({B}, {N}, 257), got "
                             f"{tuple(coeffs.shape)}")
        img = image_to_float(image).reshape(B * N, 3, R, R)
        crops = None
        if self.cfg.image_crops:
            if landmarks is None or landmarks.shape != (B, N, 68, 2):
                got = None if landmarks is None else tuple(landmarks.shape)
                raise ValueError(f"batch['landmarks']: model.image_crops needs landmarks of shape "
                                 f"({B}, {N}, 68, 2) (pixels of the frame), got {got}")
            crops = landmark_crops(img, landmarks.reshape(B * N, 68, 2), self.cfg.image_crops,
                                   self.cfg.image_crop_box)
            if self.training and self.cfg.augment > 0:
                c = self.cfg.image_crops
                crops = augment_frames(crops.reshape(-1, 3, c, c),
                                       self.cfg.augment).reshape(B * N, -1, c, c)
        if self.training and self.cfg.augment > 0:
            img = augment_frames(img, self.cfg.augment)
        f_img = self.image_encoder(img, crops).reshape(B, N, -1)
        beta = expression_of(coeffs)
        if self.training and self.cfg.offset_noise > 0:
            beta = beta + torch.randn(B, 1, EXP_DIM, device=beta.device) * self.cfg.offset_noise
        if self.training and self.cfg.whiten and B > 1 and not self.cfg.fe_freeze:
            self.expr.update_video_stats(beta)
        lam, beta_p = self.expr(beta)
        if self.cfg.sim_gain:
            beta_p = self.expr.combine(lam * self.sim_log_gain.exp())
        return f_img, beta_p, lam

    def data_keys(self) -> dict:
        """Item keys a training step reads (checked before training by the engine)."""
        return {"image": None, "coeffs": None}

    def step(self, phase: str, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        if "coeffs" not in batch:
            raise ValueError("batch: CLeBS needs 'coeffs' (B, N, 257) (the clips dataset on "
                             "videos with coeffs.npy)")
        if self.cfg.fe_init != "none" and self.training and not bool(self.fe_initialised):
            if ctx.engine is None:
                raise RuntimeError("model.fe_init='fisher': call model.init_expression(dataset) "
                                   "before training outside the Trainer")
            log.info("CLeBS fe_init=fisher: %s", self.init_expression(ctx.engine.dataset))
        f_img, beta_p, lam = self.embed(batch["image"], batch["coeffs"], batch.get("landmarks"))
        tau = self.temperature()
        loss = info_nce(f_img.float(), beta_p.float(), tau)
        logs = {}
        if self.cfg.w_invariance > 0 and lam.shape[0] > 1:
            inv = video_invariance(lam.float(), joint=self.cfg.invariance == "joint")
            loss = loss + self.cfg.w_invariance * inv
            logs["invariance"] = inv.detach()
        if self.cfg.w_regress > 0:
            reg = (f_img.float() - beta_p.detach().float()).pow(2).sum(-1).mean() / self.cfg.n
            loss = loss + self.cfg.w_regress * reg
            logs["regress"] = reg.detach()
        with torch.no_grad():
            q = F.normalize(f_img.float(), dim=-1)
            k = F.normalize(beta_p.float(), dim=-1)
            top1 = ((q @ k.transpose(1, 2)).argmax(-1)
                    == torch.arange(q.shape[1], device=q.device)).float().mean()
        return {"loss": loss, "top1": top1, "tau": tau.detach(), **logs}
