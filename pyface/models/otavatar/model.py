# Provenance: reproduces the semantics of OTAvatar's "decoupling by inverting" training
# (Ma et al., CVPR 2023; theEricMa/OTAvatar, commit c8c484f, CC BY-NC-SA 4.0;
# trainers/otavatar_trainer.py) as documented in shared/reference/specs/otavatar-goha.md
# section 1.1. Our own implementation; no upstream code is copied. pyface's code is licensed
# under Apache-2.0 (LICENSE).
"""``pyface train otavatar``: an EG3D generator (fine-tuned) driven by OTAvatar's motion
controller, trained by inverting each batch.

Per batch of ``B`` items of ``K`` frames of one video (``motion_windows``):

1. inversion: the identity latent w (B, 1, w_dim), repeated over the num_ws layers, starts
   at ``w_avg``; for
   ``invert_iters`` iterations both frames are rendered as one (B K) batch with the EMA
   generator at ``ws = clamp(W + controller(window), w_avg +- w_clamp)``; the first iterations
   step W and the intrinsics bias (B, 18), the last ``invert_controller_iters`` step the
   controller (and add the super-resolved terms);
2. refinement: for each frame, one update of the controller and the generator (losses + the
   density regularisers on that frame's planes);
3. the engine's EMA (``train.ema``: generator and controller, decay 0.95) after the step.

``controller_loss=relative`` trains the controller on each frame's error minus its item's mean
error (:func:`relative_outputs`), ``controller_w_mouth`` gives it its own mouth weight and
``motion_pose=false`` hides the windows' pose rows from it (docs/models/otavatar.md).

Every update goes through ``ctx.update``: W and the bias are rank-local parameters
(``local_batch`` rows), so N ranks compute what one process does with the whole batch.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn.controller import MotionController, MotionControllerConfig
from pyface.nn.render import (check_sample_counts, density_l1_regularizer,
                              density_monotonic_regularizer)
from pyface.train.model import (Phase, Stage, StepContext, TrainableModel, check_choice,
                                load_registered)

from pyface.models.otavatar.config import OTAvatarConfig
from pyface.models.otavatar.losses import OTAvatarLoss
from pyface.models.otavatar.pipeline import OTAvatarPipeline, check_inference_config

log = logging.getLogger("pyface.models.otavatar")

MOTION_DIM = 70
#: ``model.inversion_frames``: the training inversion's loss over an item's K frames, their
#: mean (pyface's earlier training) or their sum (the reference's)
INVERSION_FRAMES = ("mean", "sum")
#: ``model.inversion_density_decoder``: the decoder through which the training inversion's
#: density terms read σ of the EMA generator's planes, the EMA generator's (pyface's earlier
#: training) or the trained generator's (the reference's)
INVERSION_DENSITY_DECODERS = ("ema", "trained")
#: ``model.inversion_controller_lr``: the controller's rate in the inversion's controller
#: iterations, its own (pyface's earlier training) or the reference's rule, the rate x
#: ``REFERENCE_CONTROLLER_LR_MULT`` / ``invert_iters``
INVERSION_CONTROLLER_LRS = ("fixed", "reference")
REFERENCE_CONTROLLER_LR_MULT = 100.0
_EMA = ["generator", "controller"]

_TINY = {
    # 2-core CPU: the eg3d tiny generator (32^2 output, 16^2 render, 12+12 samples, w 32),
    # a small controller on 13-frame windows, 16-iteration inversion; the pipeline tunes the
    # generator on the source (PTI, 100 iterations)
    "model": {"controller": {"window": 13, "descriptor": 64, "first_kernel": 3, "layers": 2,
                             "dilation": 2, "directions": 8},
              # the decoder recomputed in the backward (in 4096-sample blocks) from the kept
              # plane features; one 65536-sample chunk holds the 2 x 4 frames' 49152 samples,
              # so the planes' gradient is scattered once per render
              # (docs/models/otavatar-measured.md)
              "render": {"recompute": "decoder", "chunk_points": 65536},
              "invert_iters": 16, "invert_controller_iters": 2,
              "invert_lr": 0.1, "intrinsics_lr": 0.002, "controller_lr": 1e-3,
              "controller_wd": 0.01, "generator_lr": 1e-3, "density_points": 500,
              # a 16-iteration inversion leaves an identity misfit that both frames share:
              # centring keeps it out of the controller (docs/models/otavatar.md)
              "center_motion": True,
              # pyface's earlier RoI boxes and term placement, and no density terms in the
              # inversion: the reference's lose 0.35 dB same-identity and 0.58 dB
              # cross-identity PSNR here and double the step time
              # (docs/models/otavatar-measured.md, "The reference's losses at tiny scale")
              "roi_box": "square", "raw_terms": False, "inversion_density": False,
              # the inversion's loss the mean over the item's frames (the recipe's: the sum),
              # the controller at its own rate in the inversion (the recipe's rule: x 100 / 16),
              # its density terms through the EMA decoder (unused: no inversion density here)
              "inversion_frames": "mean", "inversion_controller_lr": "fixed",
              "inversion_density_decoder": "ema",
              "invert_steps": 30, "wplus_steps": 0, "pti_steps": 100, "pti_lr": 3e-3},
    # 4 frames per inverted w (the reference: 2): more frame-to-frame differences for the
    # controller per batch (docs/models/otavatar-measured.md, motion transfer)
    "data": {"name": "motion_windows", "resolution": 32,
             "options": {"frames_per_item": 4, "radius": 6, "repeats": 64}},
    "train": {"steps": 150, "batch_size": 2, "log_every": 10, "ckpt_every": 75,
              "image_every": 75, "video_frames": 0,
              "ema": {"modules": _EMA, "decay": 0.95, "half_life_kimg": None}},
}

# OTAvatar's additions to ``eg3d --preset tiny`` for its stage (the EG3D issue's own preset is
# unchanged): OTAvatar reconstructs whole frames, so the generator learns the data's
# backgrounds (EG3D's tiny composites them over white), and it trains 3x longer (1200 steps,
# 9.6 kimg): a W 30 + PTI 100 fit of held-out frames gains 3.5 dB (docs/models/otavatar-measured.md,
# "Same-identity margin")
_TINY_EG3D = {
    "model": {"background": "data"},
    "train": {"steps": 1200, "ckpt_every": 400, "image_every": 400},
}

_GPU_SHORT = {
    # one H100/H200, about 8 minutes: the eg3d gpu-short generator (128^2, 64^2 render),
    # full controller, 30-iteration inversion
    "model": {"invert_iters": 30, "invert_controller_iters": 5,
              "invert_steps": 100, "wplus_steps": 0, "inversion_frames": "sum",
              # the reference's: density through the trained decoder, the controller at
              # controller_lr x 100 / 30 in the inversion's controller iterations
              "inversion_density_decoder": "trained", "inversion_controller_lr": "reference"},
    "data": {"name": "motion_windows", "resolution": 128,
             "options": {"frames_per_item": 2, "radius": 13, "repeats": 64}},
    "train": {"steps": 600, "batch_size": 4, "log_every": 20, "ckpt_every": 300,
              "image_every": 300, "precision": "fp32",
              "ema": {"modules": _EMA, "decay": 0.95, "half_life_kimg": None}},
}

_FULL = {
    # the paper: 2000 iterations at batch 24 (4 GPUs x 6) on an ffhqrebalanced512-64
    # generator (model.local_batch follows from the batch and the number of ranks); the
    # inversion's loss summed over the item's frames, as the reference adds each frame's; its
    # density terms through the trained generator's decoder and the controller's rate rule
    "model": {"inversion_frames": "sum", "inversion_density_decoder": "trained",
              "inversion_controller_lr": "reference"},
    "data": {"name": "motion_windows", "resolution": 512,
             "options": {"frames_per_item": 2, "radius": 13}},
    "train": {"steps": 2000, "batch_size": 24, "log_every": 10, "ckpt_every": 500,
              "image_every": 500,
              "ema": {"modules": _EMA, "decay": 0.95, "half_life_kimg": None}},
}


def apply_intrinsics(camera: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """camera (N, 25) EG3D labels, bias (N, 18) = (s, t) -> labels with
    ``K' = K (1 + tanh s) + t`` (K: the 9 flattened normalised intrinsics)."""
    if camera.dim() != 2 or camera.shape[1] != 25:
        raise ValueError(f"camera: expected shape (N, 25), got {tuple(camera.shape)}")
    if bias.shape != (camera.shape[0], 18):
        raise ValueError(f"bias: expected shape ({camera.shape[0]}, 18), got "
                         f"{tuple(bias.shape)}")
    K = camera[:, 16:]
    K = K * (1 + torch.tanh(bias[:, :9])) + bias[:, 9:]
    return torch.cat([camera[:, :16], K], dim=1)


def density_terms(G, planes: torch.Tensor, cfg: OTAvatarConfig,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Monotonic (no detach, x1) and TV (L1 under N(0, tv_sigma^2) jitter) density terms of
    planes (N, 3, C, P, P) through G's decoder; the points are drawn with ``generator``."""
    r = G.cfg.render
    out = {}
    if cfg.w_monotonic:
        out["monotonic"] = density_monotonic_regularizer(
            planes, G.decoder, n_points=cfg.density_points, box_size=r.box_warp, detach=False,
            scale=1.0, plane_axes=r.plane_axes, generator=generator)
    if cfg.w_tv:
        out["tv"] = density_l1_regularizer(planes, G.decoder, n_points=cfg.density_points,
                                           p_dist=cfg.tv_sigma, plane_axes=r.plane_axes,
                                           box_size=r.box_warp, generator=generator)
    return out


def item_mean(x: torch.Tensor, K: int) -> torch.Tensor:
    """x (B K, ...), the K frames of each item consecutive -> (B K, ...): every row replaced by
    its item's mean over the K frames."""
    if x.shape[0] % K:
        raise ValueError(f"x: expected B * K = B * {K} rows, got {x.shape[0]}")
    return x.unflatten(0, (-1, K)).mean(1, keepdim=True).expand(
        -1, K, *x.shape[1:]).flatten(0, 1)


def relative_outputs(out: dict, pred_mean: dict, target_mean: torch.Tensor) -> dict:
    """The predictions of ``out`` made relative to their item (``model.controller_loss=
    relative``).

    ``out``: the generator's dict, ``image_raw`` (N, 3, r, r) and optionally ``image``
    (N, 3, H, H); ``pred_mean``: for the same keys, each row's item mean of the predictions
    (N, 3, r, r) / (N, 3, H, H); ``target_mean`` (N, 3, R, R): each row's item mean of the
    targets. Returns a dict with each image replaced by ``pred - pred_mean +
    area(target_mean)`` (area-resized as the loss resizes targets), so that a loss of it against
    the frame's target x sees the frame's error minus its item's mean error,
    ``(pred - x) - mean(pred - x)``: an error every frame of the item shares cancels, and only
    what differs between the frames (their motion) is fitted.
    """
    res = {}
    for k in ("image_raw", "image"):
        if k not in out:
            continue
        p, m = out[k], pred_mean[k]
        if m.shape != p.shape:
            raise ValueError(f"pred_mean['{k}']: expected shape {tuple(p.shape)}, got "
                             f"{tuple(m.shape)}")
        if target_mean.shape[0] != p.shape[0] or target_mean.shape[1] != 3:
            raise ValueError(f"target_mean: expected shape ({p.shape[0]}, 3, R, R), got "
                             f"{tuple(target_mean.shape)}")
        t = target_mean if target_mean.shape[-1] == p.shape[-1] else F.interpolate(
            target_mean, size=p.shape[-2:], mode="area")
        res[k] = p - m + t.to(p.dtype)
    return res


def _zero_pose_rows(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the controller with ``model.motion_pose=false``: motion (N, 70, window)
    -> the same with the angle and translation rows (64-69) zeroed."""
    m = args[0]
    return (torch.cat([m[:, :64], torch.zeros_like(m[:, 64:])], 1), *args[1:])


def _item_generator(ctx: StepContext, item: int, frame: int, call: int,
                    device="cpu") -> torch.Generator:
    """A generator (on ``device``) seeded by (step, global item index, frame, call): the draws of an item do
    not depend on how the global batch is split over ranks."""
    seed = (ctx.step * 1_000_003 + item * 7_919 + frame * 104_729 + call * 15_485_863) % 2**62
    return torch.Generator(device=device).manual_seed(seed)


class OTAvatar(TrainableModel):
    """EG3D ``generator`` + :class:`pyface.nn.MotionController` ``controller`` (codebook
    included), and the rank-local inversion parameters ``latent`` (local_batch, 1, w_dim) (one
    w per item, repeated over the num_ws layers) and ``intrinsics`` (local_batch, 18).

    Batches (``motion_windows``): ``image`` (B, K, 3, R, R) in [-1, 1] with R the generator's
    ``img_resolution``, ``motion`` (B, K, 70, window), ``camera`` (B, K, 25), optionally
    ``landmarks`` (B, K, 68, 2) pixels at R.

    ``forward(w (B, num_ws, w_dim), motion (B, 70, window), camera (B, 25))`` -> the generator's
    dict (``image``, ``image_raw``, ``planes``, ...) at ``ws = w + controller(motion)``.

    ``inference=True`` (the pipeline's): the losses do not log the training warnings about
    unset ``vgg_weights`` / ``arcface_weights``; the pipeline says what they mean for its
    inversion.
    """

    Config = OTAvatarConfig
    #: train.compile: the generator's synthesis, renderer and super-resolution and the
    #: controller, and the same generator modules of the EMA copy, which the inversion runs
    #: invert_iters times a step (the mapping is not called: the inversion is in W)
    compile_modules = ("generator.backbone.synthesis", "generator.renderer",
                       "generator.superresolution", "controller",
                       "ema.generator.backbone.synthesis", "ema.generator.renderer",
                       "ema.generator.superresolution")
    Pipeline = OTAvatarPipeline
    #: settable on a trained model (``pyface.models.load(..., options=...)``, ``--option``):
    #: the pipeline's source inversion (W / W+ passes, PTI), its inference profile and
    #: ``drive_pose``; read by the pipeline only, they change no weights. And the renderer's
    #: options EG3D declares (``EG3D.inference_options``, for the same reasons), as keys of the
    #: ``model.render`` overrides (merged into the saved ones): the samples per ray, coarse and
    #: importance (a finer or coarser quadrature of the same volume), and the execution choices
    #: (backend, recompute, chunk_points: results agree to float rounding). Left out, each
    #: because the trained weights depend on it: plane_axes (fixed), box_warp, density_bias,
    #: ray_start / ray_end and white_back.
    inference_options = ("invert_steps", "invert_space", "wplus_steps", "pti_steps", "pti_lr",
                         "pti_stop", "pti_stop_metric", "pti_mode", "drive_pose", "inference",
                         "inference_clip", "inference_clamp", "wplus_keep_intrinsics",
                         "render.depth_resolution", "render.depth_resolution_importance",
                         "render.backend", "render.recompute", "render.chunk_points")
    stages = (Stage("eg3d", "eg3d", "generator", presets={"tiny": _TINY_EG3D}),)
    recipe = _FULL          # the reference's recipe; the presets override it
    presets = {"tiny": _TINY, "gpu-short": _GPU_SHORT, "full": _FULL}
    local_batch_field = "local_batch"     # set by the Trainer: train.batch_size / ranks

    @staticmethod
    def load_pipeline(path: str, *, device=None, ema: bool = True,
                      weights: dict[str, str] | None = None,
                      options: dict | None = None) -> OTAvatarPipeline:
        """``pyface.models.load("otavatar", path)``: an OTAvatar run / checkpoint, or a
        ``pyface convert otavatar`` folder (the authors' release). ``weights``: ``vgg`` /
        ``arcface`` paths for the source inversion's perceptual and identity terms
        (``pyface animate --weights vgg=PATH``). ``options``: :attr:`inference_options`
        values replacing the checkpoint's (checked by ``pyface.models.load``)."""
        weights = dict(weights or {})
        unknown = sorted(set(weights) - {"vgg", "arcface"})
        if unknown:
            raise ValueError(f"weights: expected names in ['arcface', 'vgg'] (the source "
                             f"inversion's loss networks), got {unknown}")
        return OTAvatarPipeline.from_checkpoint(path, device=device, ema=ema,
                                                vgg_weights=weights.get("vgg"),
                                                arcface_weights=weights.get("arcface"),
                                                options=options)

    def __init__(self, cfg: OTAvatarConfig | None = None, *, inference: bool = False,
                 option_keys: tuple[str, ...] = ()):
        """``option_keys``: the (dotted) config keys that were set as inference options on a
        saved config (``render.depth_resolution_importance``, ...; the loader passes them), so
        that a clash of the samples per ray names the key that was set, not the saved one."""
        super().__init__()
        cfg = cfg or OTAvatarConfig()
        if not cfg.generator:
            raise ValueError("model.generator: required: a `pyface convert eg3d` / `pyface "
                             "convert otavatar` folder or a `pyface train eg3d` run (`pyface "
                             "train otavatar --preset tiny` trains one first as stage 'eg3d'), "
                             "got None")
        if not 0 <= cfg.invert_controller_iters <= cfg.invert_iters:
            raise ValueError(f"model.invert_controller_iters: expected 0..invert_iters "
                             f"({cfg.invert_iters}), got {cfg.invert_controller_iters}")
        if cfg.invert_space not in ("w", "w+"):
            raise ValueError(f"model.invert_space: expected 'w' or 'w+', got "
                             f"{cfg.invert_space!r}")
        if cfg.controller_loss not in ("absolute", "relative"):
            raise ValueError(f"model.controller_loss: expected 'absolute' or 'relative', got "
                             f"{cfg.controller_loss!r}")
        check_choice("model.inversion_frames", cfg.inversion_frames, INVERSION_FRAMES)
        check_choice("model.inversion_density_decoder", cfg.inversion_density_decoder,
                     INVERSION_DENSITY_DECODERS)
        check_choice("model.inversion_controller_lr", cfg.inversion_controller_lr,
                     INVERSION_CONTROLLER_LRS)
        check_inference_config(cfg)
        if cfg.controller_loss == "relative" and cfg.invert_controller_iters < 1:
            raise ValueError("model.invert_controller_iters: model.controller_loss=relative "
                             "needs >= 1 (the item's mean prediction comes from the last "
                             f"controller iteration), got {cfg.invert_controller_iters}")
        if cfg.local_batch is None:
            raise ValueError("model.local_batch: None; pyface.train's Trainer sets it to "
                             "train.batch_size / ranks, a model built by hand needs it (the "
                             "rows of the rank-local latents, >= the items per step)")
        if cfg.local_batch < 1:
            raise ValueError(f"model.local_batch: expected >= 1, got {cfg.local_batch}")
        self.cfg = cfg
        self.generator = load_registered("eg3d", cfg.generator, device="cpu").G
        self.generator.train()
        G = self.generator
        for k, v in (cfg.render or {}).items():
            if k == "plane_axes" or not hasattr(G.cfg.render, k):
                raise ValueError(f"model.render.{k}: not a RenderConfig field that can be "
                                 f"overridden (plane_axes is fixed by the weights); got {v!r}")
            setattr(G.cfg.render, k, v)       # the renderer's config (the same object)
        # the overrides with the generator's own sample counts: >= 4 coarse samples with
        # importance samples (the key named is the one that broke it: among the inference
        # options when one of the two was set as an option, else among the saved overrides)
        counts = ("depth_resolution", "depth_resolution_importance")
        keys = [k[len("model."):] if k.startswith("model.") else k for k in option_keys]
        given = {k[len("render."):] for k in keys if k.startswith("render.")}
        if not given & set(counts):
            given = set(cfg.render or {})
        check_sample_counts(G.cfg.render, "model.render",
                            blame="depth_resolution_importance" if counts[1] in given
                            and counts[0] not in given else "depth_resolution")
        c = cfg.controller
        self.controller = MotionController(MotionControllerConfig(
            in_channels=MOTION_DIM, window=c.window, descriptor=c.descriptor,
            first_kernel=c.first_kernel, layers=c.layers, dilation=c.dilation,
            mlp_layers=c.mlp_layers, tie_mlp=c.tie_mlp, num_ws=G.num_ws,
            directions=c.directions, w_dim=G.cfg.w_dim, global_row=c.global_row,
            init_gain=c.init_gain))
        if not cfg.motion_pose:       # kept by copies of the controller (EMA, pipeline)
            self.controller.register_forward_pre_hook(_zero_pose_rows)
        if cfg.controller_init:
            from pyface.models.otavatar.convert import load_controller

            ctrl = load_controller(cfg.controller_init)
            self.controller.load_state_dict(ctrl.state_dict())
        self.latent = nn.Parameter(torch.zeros(cfg.local_batch, 1, G.cfg.w_dim))
        self.intrinsics = nn.Parameter(torch.zeros(cfg.local_batch, 18))
        self.loss = OTAvatarLoss(
            w_perceptual=cfg.w_perceptual, style_weight=cfg.style_weight,
            vgg_weights=cfg.vgg_weights, w_smooth_l1=cfg.w_smooth_l1, w_mouth=cfg.w_mouth,
            w_eyes=cfg.w_eyes, eye_roi_bug=cfg.eye_roi_bug, w_identity=cfg.w_identity,
            arcface_weights=cfg.arcface_weights, warn=not inference, roi_box=cfg.roi_box,
            raw_terms=cfg.raw_terms)
        # the controller's loss: the same terms, its own mouth weight if set (no state)
        self.controller_loss = self.loss if cfg.controller_w_mouth is None else OTAvatarLoss(
            w_perceptual=cfg.w_perceptual, style_weight=cfg.style_weight,
            vgg_weights=cfg.vgg_weights, w_smooth_l1=cfg.w_smooth_l1,
            w_mouth=cfg.controller_w_mouth, w_eyes=cfg.w_eyes, eye_roi_bug=cfg.eye_roi_bug,
            w_identity=cfg.w_identity, arcface_weights=cfg.arcface_weights,
            warn=False,                 # the same weights: the warnings above are enough
            roi_box=cfg.roi_box, raw_terms=cfg.raw_terms)

    # --- pieces ----------------------------------------------------------------------------
    @property
    def w_avg(self) -> torch.Tensor:
        """(w_dim,) the generator mapping's tracked mean latent."""
        return self.generator.backbone.mapping.w_avg

    @property
    def resolution(self) -> int:
        return int(self.generator.cfg.img_resolution)

    def motion_ws(self, w: torch.Tensor, motion: torch.Tensor, *, controller=None,
                  clamp: bool = False) -> torch.Tensor:
        """w (N, num_ws, w_dim), motion (N, 70, window) -> ws (N, num_ws, w_dim) =
        ``w + controller(motion)``, clamped to ``w_avg +- w_clamp`` with ``clamp``."""
        ctrl = controller if controller is not None else self.controller
        n, d = self.generator.num_ws, self.generator.cfg.w_dim
        if w.dim() != 3 or w.shape[1:] != (n, d):
            raise ValueError(f"w: expected shape (N, {n}, {d}), got {tuple(w.shape)}")
        if motion.dim() != 3 or motion.shape[0] != w.shape[0]:
            raise ValueError(f"motion: expected shape ({w.shape[0]}, {MOTION_DIM}, "
                             f"{self.controller.cfg.window}), got {tuple(motion.shape)}")
        ws = w + ctrl(motion.to(w.dtype))
        return self._clamp(ws) if clamp else ws

    def forward(self, w: torch.Tensor, motion: torch.Tensor, camera: torch.Tensor, *,
                sr: bool = True) -> dict[str, torch.Tensor]:
        return self.generator.synthesis(self.motion_ws(w, motion), camera, sr=sr)

    # --- training --------------------------------------------------------------------------
    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.cfg
        return {
            "latent": torch.optim.Adam([{"params": [self.latent], "local": True,
                                         "max_norm": cfg.invert_clip}], lr=cfg.invert_lr,
                                       betas=tuple(cfg.invert_betas)),
            "intrinsics": torch.optim.AdamW([{"params": [self.intrinsics], "local": True}],
                                            lr=cfg.intrinsics_lr,
                                            betas=tuple(cfg.intrinsics_betas), weight_decay=0.0),
            "controller": torch.optim.AdamW([{"params": list(self.controller.parameters()),
                                              "max_norm": cfg.clip}], lr=cfg.controller_lr,
                                            betas=tuple(cfg.controller_betas),
                                            weight_decay=cfg.controller_wd),
            "generator": torch.optim.Adam([{"params": list(self.generator.parameters()),
                                            "max_norm": cfg.clip}], lr=cfg.generator_lr,
                                          betas=tuple(cfg.generator_betas)),
        }

    def phases(self) -> list[Phase]:
        return [Phase("main", None)]

    def _unpack(self, batch: dict):
        for k in ("image", "motion", "camera"):
            if k not in batch:
                raise ValueError(f"batch['{k}']: missing; otavatar trains on the "
                                 "'motion_windows' dataset (image, motion, camera, landmarks)")
        img, motion, cam = batch["image"], batch["motion"], batch["camera"]
        R, win = self.resolution, self.controller.cfg.window
        if img.dim() != 5 or img.shape[2:] != (3, R, R):
            raise ValueError(f"batch['image']: expected (B, K, 3, {R}, {R}) (R = the "
                             f"generator's img_resolution; set data.resolution={R}), got "
                             f"{tuple(img.shape)}")
        B, K = img.shape[:2]
        if motion.shape != (B, K, MOTION_DIM, win):
            raise ValueError(f"batch['motion']: expected ({B}, {K}, {MOTION_DIM}, {win}) "
                             f"(data.options.radius = {(win - 1) // 2}), got "
                             f"{tuple(motion.shape)}")
        if cam.shape != (B, K, 25):
            raise ValueError(f"batch['camera']: expected ({B}, {K}, 25), got "
                             f"{tuple(cam.shape)}")
        if B > self.cfg.local_batch:
            raise ValueError(f"batch['image']: {B} items on this rank, but model.local_batch = "
                             f"{self.cfg.local_batch} (leave it unset: the Trainer derives it from "
                             "train.batch_size / ranks)")
        lm = batch.get("landmarks")
        if img.dtype == torch.uint8:
            img = img.float() / 127.5 - 1
        return img.float(), motion.float(), cam.float(), None if lm is None else lm.float()

    def data_keys(self) -> dict:
        """Item keys a training step reads (checked before training by the engine)."""
        return {"image": None, "motion": None, "camera": None}

    def step(self, phase: str, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        img, motion, cam, lm = self._unpack(batch)
        B, K = img.shape[:2]
        x, m, c = img.flatten(0, 1), motion.flatten(0, 1), cam.flatten(0, 1)
        lmf = None if lm is None else lm.flatten(0, 1)
        G_ema = ctx.ema("generator")
        rel = cfg.controller_loss == "relative"
        if rel and K < 2:
            raise ValueError("batch['image']: model.controller_loss=relative needs >= 2 frames "
                             f"per item (data.options.frames_per_item), got {K}")
        x_mean = item_mean(x, K) if rel else None
        pred_mean = None
        # 1. inversion of W and the intrinsics bias on both frames (one B*K batch, EMA G)
        with torch.no_grad():
            self.latent.copy_(self.w_avg.to(self.latent.dtype).expand_as(self.latent))
            self.intrinsics.zero_()
        ctx.reset_optimizer("latent")
        ctx.reset_optimizer("intrinsics")
        n_w = cfg.invert_iters - cfg.invert_controller_iters
        # inversion_frames=sum: each frame's terms added, K x the mean over the B K frames
        frames = float(K) if cfg.inversion_frames == "sum" else None
        # the density terms read σ of G_ema's planes through this generator's decoder
        G_dens = self.generator if cfg.inversion_density_decoder == "trained" else G_ema
        # the controller's rate in its inversion iterations (the refinement: its own rate;
        # invert_iters=0 has no inversion iterations to scale)
        ctrl_scale = (REFERENCE_CONTROLLER_LR_MULT / cfg.invert_iters
                      if cfg.inversion_controller_lr == "reference" and cfg.invert_iters > 0
                      else 1.0)
        first = last = None
        for it in range(cfg.invert_iters):
            w = self.latent[:B].repeat_interleave(K, 0).expand(-1, self.generator.num_ws, -1)
            camk = apply_intrinsics(c, self.intrinsics[:B].repeat_interleave(K, 0))
            if it < n_w:
                with torch.no_grad():
                    offset = self._offsets(m, K)
                ws = self._clamp(w + offset)
                out = G_ema.synthesis(ws, camk, sr=False, **self._uniforms(ctx, B, range(K), it))
                loss, _ = self.loss(out, x, lmf, sr=False)
                loss = loss + self._inversion_density(ctx, G_dens, out["planes"], B, K, it)
                if frames is not None:
                    loss = loss * frames
                ctx.update(("latent", "intrinsics"), loss)
                first = loss.detach() if first is None else first
                last = loss.detach()
            else:
                ws = self._clamp(w.detach() + self._offsets(m, K))
                out = G_ema.synthesis(ws, camk.detach(), sr=True,
                                      **self._uniforms(ctx, B, range(K), it))
                if rel:     # the frames' differences only (the item's mean error cancels)
                    means = {k: item_mean(out[k], K) for k in ("image_raw", "image")}
                    loss, _ = self.controller_loss(relative_outputs(out, means, x_mean), x, lmf,
                                                   sr=True)
                    pred_mean = {k: v.detach() for k, v in means.items()}
                else:
                    loss, _ = self.controller_loss(out, x, lmf, sr=True)
                loss = loss + self._inversion_density(ctx, G_dens, out["planes"], B, K, it)
                if frames is not None:
                    loss = loss * frames
                ctx.update("controller", loss, lr_scale=ctrl_scale)
        # 2. refinement of the controller and the generator, frame by frame
        w = self.latent[:B].detach().expand(-1, self.generator.num_ws, -1)
        kb = self.intrinsics[:B].detach()
        logs: dict[str, torch.Tensor] = {}
        total = x.new_zeros(())
        for f in range(K):
            sel = torch.arange(B, device=x.device) * K + f
            ws = self._clamp(w + self._offsets(m, K)[sel])
            call = cfg.invert_iters + f
            out = self.generator.synthesis(ws, apply_intrinsics(c[sel], kb), sr=True,
                                           **self._uniforms(ctx, B, [f], call))
            loss, terms = self.loss(out, x[sel], None if lmf is None else lmf[sel], sr=True)
            dens = self._density(ctx, out["planes"], f, call)
            reg = []
            if "monotonic" in dens:
                reg.append(cfg.w_monotonic * dens["monotonic"])
            if "tv" in dens:
                reg.append(cfg.w_tv * dens["tv"])
            for r in reg:
                loss = loss + r
            if rel or cfg.controller_w_mouth is not None:
                # the controller from its own terms (relative, or its mouth weight), the
                # generator from the reconstruction loss, through the same render (the
                # controller first: its backward passes through the generator, whose weights
                # must not have been stepped yet)
                lm_f = None if lmf is None else lmf[sel]
                if rel:
                    closs, _ = self.controller_loss(relative_outputs(
                        out, {k: v[sel] for k, v in pred_mean.items()}, x_mean[sel]), x[sel],
                        lm_f, sr=True)
                    logs["relative"] = logs.get("relative", 0) + closs.detach() / K
                else:
                    closs = self.controller_loss(out, x[sel], lm_f, sr=True)[0]
                    for r in reg:
                        closs = closs + r
                ctx.update("controller", closs, retain_graph=True)
                ctx.update("generator", loss)
            else:
                ctx.update(("controller", "generator"), loss)
            total = total + loss.detach() / K
            for k, v in {**terms, **{k: v.detach() for k, v in dens.items()}}.items():
                logs[k] = logs.get(k, 0) + v / K
        logs["loss"] = total
        if first is not None:       # none when every inversion iteration trains the controller
            logs.update({"invert_first": first, "invert_last": last,
                         "invert_ratio": last / first.clamp(min=1e-12)})
            if ctx.rank == 0:       # every batch in log.txt (the engine logs averages)
                log.info("otavatar inversion step %d: first %.5f last %.5f ratio %.4f "
                         "(refined loss %.5f)", ctx.step, float(first), float(last),
                         float(logs["invert_ratio"]), float(total))
        return logs

    def _uniforms(self, ctx: StepContext, B: int, frames, call: int) -> dict[str, torch.Tensor]:
        """The renderer's uniforms for frames ``frames`` of this rank's B items (rows item-major:
        item b, frame f), ``stratified_noise`` (B len(frames), r*r, depth_resolution) and
        ``importance_u`` (..., depth_resolution_importance), drawn per (step, global item,
        frame, call) so that N ranks render what one process renders."""
        G = self.generator
        r, rc = G.resolve_resolution(None), G.cfg.render
        dev = self.latent.device
        strat, imp = [], []
        for b in range(B):
            for f in frames:
                g = _item_generator(ctx, ctx.rank * B + b, f, call, dev)
                strat.append(torch.rand(r * r, rc.depth_resolution, generator=g, device=dev))
                if rc.depth_resolution_importance:
                    imp.append(torch.rand(r * r, rc.depth_resolution_importance, generator=g,
                                          device=dev))
        out = {"stratified_noise": torch.stack(strat)}
        if imp:
            out["importance_u"] = torch.stack(imp)
        return out

    def _density(self, ctx: StepContext, planes: torch.Tensor, frame: int,
                 call: int) -> dict[str, torch.Tensor]:
        """:func:`density_terms` of planes (B, 3, C, P, P), the points of each item drawn per
        (step, global item, frame) (the mean over items, as one batched draw would give)."""
        B = planes.shape[0]
        per = [density_terms(self.generator, planes[b:b + 1], self.cfg,
                             _item_generator(ctx, ctx.rank * B + b, frame, call + 1_000,
                                             planes.device))
               for b in range(B)]
        return {k: torch.stack([d[k] for d in per]).mean() for k in per[0]} if per else {}

    def _inversion_density(self, ctx: StepContext, G, planes: torch.Tensor, B: int, K: int,
                           call: int) -> torch.Tensor:
        """The weighted density regularisers of the inversion's planes (B K, 3, C, P, P) (rows
        item-major) through ``G``'s decoder (the EMA generator that rendered them, or the
        trained generator with ``inversion_density_decoder=trained``): the reference adds
        them, for both frames, to every inversion iteration's loss in training.
        The mean over the B K frames, the points of each drawn per (step, global item, frame,
        call), as the other inversion terms are means over the frames (``inversion_frames=sum``
        scales the whole inversion loss by K in :meth:`step`)."""
        cfg = self.cfg
        if not cfg.inversion_density or not (cfg.w_monotonic or cfg.w_tv):
            return planes.new_zeros(())
        per = [density_terms(G, planes[i:i + 1], cfg,
                             _item_generator(ctx, ctx.rank * B + i // K, i % K, call + 3_000,
                                             planes.device))
               for i in range(planes.shape[0])]
        total = planes.new_zeros(())
        for key, w in (("monotonic", cfg.w_monotonic), ("tv", cfg.w_tv)):
            if key in per[0]:
                total = total + w * torch.stack([d[key] for d in per]).mean()
        return total

    def _offsets(self, m: torch.Tensor, K: int) -> torch.Tensor:
        """m (B K, 70, window), the K frames of each item consecutive -> the controller's
        offsets (B K, num_ws, w_dim); with ``center_motion`` each item's mean over its K frames
        is subtracted (the shared latent w absorbs any common offset, so only the frame-to-frame
        differences reach the controller's gradient)."""
        off = self.controller(m)
        if not self.cfg.center_motion or K < 2:
            return off
        o = off.unflatten(0, (-1, K))
        return (o - o.mean(1, keepdim=True)).flatten(0, 1)

    def _clamp(self, ws: torch.Tensor) -> torch.Tensor:
        if self.cfg.w_clamp is None:
            return ws
        a = self.w_avg.to(ws.dtype)
        return torch.maximum(torch.minimum(ws, a + self.cfg.w_clamp), a - self.cfg.w_clamp)

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """The first ``local_batch`` items rendered with the last batch's inverted latents."""
        n = self.cfg.local_batch
        batch = {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        img, motion, cam, _ = self._unpack(batch)
        B, K = img.shape[:2]
        w = self.latent[:B].repeat_interleave(K, 0).expand(-1, self.generator.num_ws, -1)
        out = self.generator.synthesis(self.motion_ws(w, motion.flatten(0, 1)),
                                       cam.flatten(0, 1))
        R = self.resolution
        raw = F.interpolate(out["image_raw"], size=(R, R), mode="nearest")
        return {"target": img.flatten(0, 1), "image": out["image"], "image_raw": raw}
