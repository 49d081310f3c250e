"""``pyface train eg3d``: EG3D's GAN training recipe on pyface's engine.

Phases (EG3D ``training_loop.py`` with lazy regularisation): ``Gmain`` (non-saturating logistic
loss through the dual discriminator), ``Greg`` every ``g_reg_interval`` steps (density
regularisation), ``Dmain`` (logistic loss on real and generated images), ``Dreg`` every
``d_reg_interval`` steps (R1 on ``image`` and ``image_raw``). Generator pose conditioning with a
swap probability fading to ``gpc_reg_prob``, discriminator blur fading out, neural rendering
resolution fading, mirrored labels, Adam (0, 0.99) with lazy-regularisation compensation and
EMA by kimg (``train.ema``).

Reproduces the semantics of NVlabs/eg3d ``training/loss.py`` and ``training_loop.py`` (NVIDIA
Source Code License, non-commercial). The code is pyface's own.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F

from pyface.face.cameras import mirror_label
from pyface.nn.discriminators import DiscriminatorConfig, DualDiscriminator
from pyface.nn.render import density_l1_regularizer, density_monotonic_regularizer
from pyface.nn.resample import filtered_resize, setup_filter, upfirdn2d
from pyface.train.model import Phase, StepContext, TrainableModel, check_choice

from pyface.models.eg3d.config import EG3DConfig
from pyface.models.eg3d.generator import EG3DGenerator
from pyface.models.eg3d.pipeline import EG3DPipeline

log = logging.getLogger("pyface.models.eg3d")

REG_TYPES = ("l1", "monotonic-detach", "monotonic-fixed")
BACKGROUNDS = ("data", "white")
GEN_C_SOURCES = ("batch", "dataset")


def eg3d_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """EG3D's discriminator blur: separable kernel ``2 ** -(t / sigma)^2`` for integer ``t`` in
    ``[-floor(3 sigma), floor(3 sigma)]``, normalised; identity when that radius is 0.
    x: (B, C, H, W)."""
    r = int(math.floor(sigma * 3))
    if r <= 0:
        return x
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    k = torch.exp2(-(t / sigma).square())
    return upfirdn2d(x, setup_filter(k, device=x.device), padding=[r, r, r, r])


def silhouette_measures(opacity: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5
                        ) -> dict[str, torch.Tensor]:
    """Rendered opacity against data masks, over the whole batch. opacity (B, 1, r, r),
    mask (B, 1, H, W) (area-resized to r). Returns ``iou`` (of ``opacity > t`` and
    ``mask > t``), ``iou_all`` (the IoU an all-opaque rendering scores: the mask's area
    fraction), ``fg_opacity`` / ``bg_opacity`` (mean opacity inside / outside the mask) and
    ``opacity_contrast`` (their difference: 0 for any silhouette-blind rendering)."""
    m = F.interpolate(mask.float(), size=opacity.shape[-2:], mode="area") > threshold
    o = opacity.detach().float()
    a = o > threshold
    union = (a | m).sum().clamp(min=1)
    fg, bg = m.sum().clamp(min=1), (~m).sum().clamp(min=1)
    fo, bo = (o * m).sum() / fg, (o * ~m).sum() / bg
    return {"iou": (a & m).sum() / union, "iou_all": m.sum() / m.numel(),
            "fg_opacity": fo, "bg_opacity": bo, "opacity_contrast": fo - bo}


def orbit_label(c: torch.Tensor, yaw: float) -> torch.Tensor:
    """EG3D labels c (B, 25) with their cameras orbited by ``yaw`` radians about the world y
    axis (through the origin) -> (B, 25)."""
    c2w = c[:, :16].reshape(-1, 4, 4)
    co, si = math.cos(yaw), math.sin(yaw)
    rot = c2w.new_tensor([[co, 0, si, 0], [0, 1, 0, 0], [-si, 0, co, 0], [0, 0, 0, 1]])
    return torch.cat([(rot @ c2w).reshape(-1, 16), c[:, 16:]], 1)


def depth_consistency(depth_a: torch.Tensor, opacity_a: torch.Tensor, c_a: torch.Tensor,
                      depth_b: torch.Tensor, opacity_b: torch.Tensor, c_b: torch.Tensor,
                      threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Agreement of two renderings' depths: the pixels of view A with opacity > ``threshold``
    are lifted to 3D along A's rays at A's depth, projected into view B, and B's depth there
    (bilinear, weighted by B's opacity) is compared with their distance to B's camera (EG3D's
    depth is the distance along the unit ray). depth_* / opacity_* (B, 1, r, r), c_* (B, 25).

    Returns (mean |difference| over the points that land inside B on pixels with opacity >
    ``threshold``, the fraction of A's opaque pixels that do)."""
    from pyface.face.cameras import project_label
    from pyface.ops.render import ray_bundle

    B, _, r, _ = depth_a.shape
    o_a, d_a = ray_bundle(c_a.float(), r)
    o_b, _ = ray_bundle(c_b.float(), r)
    pts = o_a + depth_a.float().reshape(B, -1, 1) * d_a                   # (B, R, 3)
    uv, z = project_label(pts, c_b.float())
    grid = (uv * 2 - 1).unsqueeze(1)                                      # (B, 1, R, 2)
    ob = F.grid_sample(opacity_b.float(), grid, align_corners=False).reshape(B, -1)
    # opacity-weighted interpolation: empty neighbours (whose depth means nothing) do not count
    db = F.grid_sample(depth_b.float() * opacity_b.float(), grid,
                       align_corners=False).reshape(B, -1) / ob.clamp(min=1e-6)
    inside = ((uv > 0) & (uv < 1)).all(-1) & (z[..., 0] > 0)
    lit = opacity_a.float().reshape(B, -1) > threshold
    valid = lit & inside & (ob > threshold)
    err = (db - (pts - o_b[:, :1]).norm(dim=-1)).abs()
    n = valid.sum()
    return ((err * valid).sum() / n.clamp(min=1), n / lit.sum().clamp(min=1))


def _schedule_frac(images_seen: int, kimg: float | None) -> float:
    if kimg is None or kimg <= 0:
        return 1.0
    return min(images_seen / (kimg * 1e3), 1.0)


_TINY = {
    "model": {
        "generator": {
            "z_dim": 32, "w_dim": 32, "backbone_resolution": 32, "plane_channels": 8,
            "channel_base": 512, "channel_max": 32, "decoder_hidden": 32, "decoder_features": 8,
            "img_resolution": 32, "neural_rendering_resolution": 16, "sr_variant": "hybrid2x",
            "sr_input_resolution": 16, "sr_block_channels": [32, 16],
            "render": {"depth_resolution": 12, "depth_resolution_importance": 12,
                       "white_back": True, "chunk_points": 16384,
                       "recompute": "decoder"}},
        "discriminator": {"channel_base": 512, "channel_max": 64, "mapping_layers": 2},
        # EG3D's blur starts at 10 px on 512^2 images; at 32^2 that blurs the image away and D
        # sees no silhouette: the same sigma relative to the image size
        "r1_gamma": 1.0, "gpc_reg_fade_kimg": 2.0, "blur_init_sigma": 10 * 32 / 512,
        "blur_fade_kimg": 1.0, "neural_rendering_resolution_initial": 16, "background": "white",
        "measure_every": 50},
    "data": {"name": "synthetic", "resolution": 32},
    "train": {"steps": 400, "batch_size": 8, "log_every": 10, "ckpt_every": 200,
              "image_every": 200, "video_frames": 16,
              "ema": {"modules": ["G"], "half_life_kimg": 0.5, "rampup": 0.05}},
}

_GPU_SHORT = {
    "model": {
        "generator": {
            "z_dim": 256, "w_dim": 256, "backbone_resolution": 128, "plane_channels": 32,
            "channel_base": 16384, "channel_max": 256, "img_resolution": 128,
            "neural_rendering_resolution": 64, "sr_variant": "hybrid2x",
            "render": {"depth_resolution": 32, "depth_resolution_importance": 32,
                       "white_back": True, "recompute": True, "chunk_points": 131072}},
        "discriminator": {"channel_base": 16384, "channel_max": 256},
        "r1_gamma": 1.0, "gpc_reg_fade_kimg": 20.0, "blur_init_sigma": 10 * 128 / 512,
        "blur_fade_kimg": 10.0,
        "neural_rendering_resolution_initial": 64, "background": "white",
        "gen_c_per_phase": True, "gen_c_source": "dataset"},
    "data": {"name": "synthetic", "resolution": 128},
    "train": {"steps": 6000, "batch_size": 16, "log_every": 50, "ckpt_every": 1000,
              "image_every": 1000, "precision": "fp32",
              "ema": {"modules": ["G"], "half_life_kimg": 5.0, "rampup": 0.05}},
}

_FULL = {  # EG3D FFHQ 512: 25000 kimg at 64^2, then the 2000-kimg fine-tune fading to 128^2
    "model": {"generator": {"render": {"recompute": True, "chunk_points": 131072}},
              "neural_rendering_resolution_initial": 64,
              "neural_rendering_resolution_final": 128,
              "neural_rendering_resolution_fade_kimg": 1000.0,
              "neural_rendering_resolution_fade_start_kimg": 25000.0,
              "gen_c_per_phase": True, "gen_c_source": "dataset"},
    "data": {"name": "eg3d", "resolution": 512},
    "train": {"steps": 843750, "batch_size": 32, "log_every": 100, "ckpt_every": 5000,
              "image_every": 5000,
              "ema": {"modules": ["G"], "half_life_kimg": 10.0, "rampup": 0.05}},
}


def _eg3d_values_for(keys: dict, values: dict) -> dict:
    """For every key ``keys`` sets (recursively), EG3D's own value from ``values``."""
    return {k: (_eg3d_values_for(v, values[k]) if isinstance(v, dict)
                and isinstance(values.get(k), dict) else values[k])
            for k, v in keys.items() if k in values}


def _over_eg3d(preset: dict) -> dict:
    """``preset`` over EG3D's own values for every model key the ``tiny`` recipe sets: presets
    are merged over the recipe, so a preset that is not ``tiny`` must not inherit tiny's sizes
    (the SR input size, decoder widths, D mapping, ...) by leaving a key unset."""
    base = _eg3d_values_for(_TINY["model"], dataclasses.asdict(EG3DConfig()))
    train = {"video_frames": 24, **preset.get("train", {})}
    return {**preset, "model": _merge(base, preset.get("model", {})), "train": train}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_GPU_SHORT, _FULL = _over_eg3d(_GPU_SHORT), _over_eg3d(_FULL)


class EG3D(TrainableModel):
    """EG3D generator ``G`` (:class:`EG3DGenerator`) and dual discriminator ``D``.

    Batches: ``image`` (B, 3, R, R) float in [-1, 1] with R = ``generator.img_resolution``,
    ``camera`` (B, 25) EG3D labels, and ``mask`` (B, 1, R, R) in [0, 1] (needed by
    ``background="white"`` and the silhouette IoU; optional otherwise).
    """

    Config = EG3DConfig
    #: train.compile: the generator's mapping and synthesis networks, renderer and
    #: super-resolution (the decoder's weights go into the fused render, no call of its own);
    #: not D, whose R1 penalty (Dreg) is a double backward, which AOTAutograd lacks
    compile_modules = ("G.backbone.mapping", "G.backbone.synthesis", "G.renderer",
                       "G.superresolution")
    presets = {"tiny": _TINY, "gpu-short": _GPU_SHORT, "full": _FULL}
    recipe = _TINY
    Pipeline = EG3DPipeline
    #: settable on a trained model or a converted release (``pyface.models.load(...,
    #: options=...)``, ``--option``): fields the rendering reads that change no weight and no
    #: parameter shape. Left out, each because the trained weights depend on it: plane_axes,
    #: box_warp, density_bias, ray_start / ray_end (where the planes and the density were
    #: fitted), white_back (the background the SR and D saw), the channels and resolutions of
    #: the networks, sr_antialias / sr_conv_clamp (the SR's trained input and activations),
    #: sr_image_raw_alias (the image_raw D was trained on), c_scale / c_gen_conditioning_zero
    #: (the mapping's trained input), neural_rendering_resolution (the checkpoint's
    #: rendering_resolution buffer replaces it) and avg_camera_radius / avg_camera_pivot (the
    #: training data's camera orbit).
    inference_options = (
        # samples per ray, coarse and importance: a finer quadrature of the same volume (EG3D's
        # gen_videos.py multiplies both by its --sample_mult, 2 by default)
        "generator.render.depth_resolution",
        "generator.render.depth_resolution_importance",
        # execution only, the results agree to float rounding: the render_triplane backend (the
        # uniforms are drawn before it is chosen), what the backward of the source inversion
        # keeps (recompute) and the rays per chunk (chunk_points; each ray computed alone)
        "generator.render.backend",
        "generator.render.recompute",
        "generator.render.chunk_points",
        # the SR's per-layer noise (none / const / random), read by the SR at every frame: the
        # layers, their constant noise and noise strengths are the same in every mode
        "generator.sr_noise_mode",
    )

    @staticmethod
    def load_pipeline(path: str, *, device=None, ema: bool = True,
                      options: dict | None = None) -> EG3DPipeline:
        """``pyface.models.load("eg3d", path)``: a converted release folder, a training run or
        checkpoint (the EMA generator by default). ``options``: :attr:`inference_options`
        values, ``{"generator.render.depth_resolution": 96, ...}`` (checked and converted by
        ``pyface.models.load``), replacing the saved generator config's before the generator
        is built (runs and converted releases alike)."""
        return EG3DPipeline.from_checkpoint(path, device=device, ema=ema, options=options)

    def __init__(self, cfg: EG3DConfig | None = None):
        super().__init__()
        cfg = cfg or EG3DConfig()
        check_choice("model.reg_type", cfg.reg_type, REG_TYPES)
        check_choice("model.background", cfg.background, BACKGROUNDS)
        check_choice("model.gen_c_source", cfg.gen_c_source, GEN_C_SOURCES)
        if len(cfg.betas) != 2:
            raise ValueError(f"model.betas: expected 2 values, got {cfg.betas}")
        self.cfg = cfg
        self.G = EG3DGenerator(cfg.generator)
        d = cfg.discriminator
        self.D = DualDiscriminator(DiscriminatorConfig(
            c_dim=25, img_resolution=cfg.generator.img_resolution, img_channels=3,
            channel_base=d.channel_base, channel_max=d.channel_max,
            mbstd_group_size=d.mbstd_group_size, mapping_layers=d.mapping_layers),
            c_noise=d.c_noise)
        self._prepared: tuple[int, torch.Tensor, dict] | None = None
        self.G.rendering_resolution.fill_(cfg.neural_rendering_resolution_initial)

    # --- optimisation ----------------------------------------------------------------------
    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Adam per network; with a lazy phase every ``k`` steps lr x k/(k+1) and betas **
        (k/(k+1)) (EG3D's compensation)."""
        out = {}
        for name, net, lr, k, on in (("G", self.G, self.cfg.g_lr, self.cfg.g_reg_interval,
                                      self.cfg.density_reg > 0),
                                     ("D", self.D, self.cfg.d_lr, self.cfg.d_reg_interval,
                                      self.cfg.r1_gamma > 0)):
            r = k / (k + 1) if on and k > 1 else 1.0
            b1, b2 = self.cfg.betas
            out[name] = torch.optim.Adam(net.parameters(), lr=lr * r, betas=(b1 ** r, b2 ** r),
                                         eps=1e-8)
        return out

    def phases(self) -> list[Phase]:
        ph = [Phase("Gmain", "G")]
        if self.cfg.density_reg > 0:
            ph.append(Phase("Greg", "G", interval=self.cfg.g_reg_interval))
        ph.append(Phase("Dmain", "D"))
        if self.cfg.r1_gamma > 0:
            ph.append(Phase("Dreg", "D", interval=self.cfg.d_reg_interval))
        return ph

    # --- schedules (pure functions of the images seen) -------------------------------------
    def swapping_prob(self, images_seen: int) -> float | None:
        if self.cfg.generator.c_gen_conditioning_zero:
            return None
        a = _schedule_frac(images_seen, self.cfg.gpc_reg_fade_kimg)
        return (1 - a) * 1.0 + a * self.cfg.gpc_reg_prob

    def blur_sigma(self, images_seen: int, batch_size: int) -> float:
        kimg = self.cfg.blur_fade_kimg
        if kimg is None:
            kimg = 200 * batch_size / 32
        if kimg <= 0:
            return 0.0
        return max(1 - images_seen / (kimg * 1e3), 0.0) * self.cfg.blur_init_sigma

    def rendering_resolution(self, images_seen: int) -> int:
        c = self.cfg
        if c.neural_rendering_resolution_final is None:
            return c.neural_rendering_resolution_initial
        a = _schedule_frac(max(images_seen - c.neural_rendering_resolution_fade_start_kimg * 1e3,
                               0), c.neural_rendering_resolution_fade_kimg)
        return int(round(c.neural_rendering_resolution_initial * (1 - a)
                         + c.neural_rendering_resolution_final * a))

    # --- pieces ----------------------------------------------------------------------------
    def _prepare(self, batch: dict, ctx: StepContext) -> dict:
        """Real images (mirrored, composited), cameras and the generator's cameras; the same for
        every phase of a step."""
        step, source = int(ctx.step), batch.get("image")
        if self._prepared is not None and self._prepared[0] == step \
                and self._prepared[1] is source:
            return self._prepared[2]
        R = self.cfg.generator.img_resolution
        for name in ("image", "camera"):
            if name not in batch:
                raise KeyError(f"batch[{name!r}] missing: EG3D trains on images with EG3D camera "
                               f"labels; got keys {sorted(batch)}")
        img, cam = batch["image"].float(), batch["camera"].float()
        B = img.shape[0]
        if img.ndim != 4 or img.shape[1:] != (3, R, R):
            raise ValueError(f"batch['image']: expected (B, 3, {R}, {R}) (model.generator."
                             f"img_resolution = data.resolution), got {tuple(img.shape)}")
        if cam.shape != (B, 25):
            raise ValueError(f"batch['camera']: expected ({B}, 25), got {tuple(cam.shape)}")
        mask = batch.get("mask")
        if mask is not None:
            mask = mask.float()
        if self.cfg.background == "white":
            if mask is None:
                raise KeyError("batch['mask'] missing: model.background='white' composites the "
                               "real images over white with their masks")
            img = img * mask + (1 - mask)
        g = torch.Generator().manual_seed(int(ctx.step) * 7919 + 17)
        if self.cfg.mirror:
            flip = (torch.rand(B, generator=g) < 0.5).to(img.device)
            img = torch.where(flip.view(B, 1, 1, 1), img.flip(-1), img)
            cam = torch.where(flip.view(B, 1), mirror_label(cam), cam)
            if mask is not None:
                mask = torch.where(flip.view(B, 1, 1, 1), mask.flip(-1), mask)
        if self.cfg.gen_c_source == "dataset":
            # cameras drawn from the whole dataset's labels: no real image (mask) of their own
            gen_c, gen_mask = self._draw_gen_c(B, 0, ctx).to(cam), None
        else:
            perm = torch.randperm(B, generator=g).to(img.device)   # generator cameras: labels
            gen_c, gen_mask = cam[perm], mask[perm] if mask is not None else None
        out = {"image": img, "camera": cam, "mask": mask, "gen_c": gen_c, "gen_mask": gen_mask}
        # the batch's own image tensor is kept with the step (not its id, which Python may
        # give to a new tensor once the old one is freed)
        self._prepared = (step, source, out)
        return out

    _GEN_C_PHASES = ("Greg", "Dmain")

    def _gen_c(self, data: dict, phase: str, ctx: StepContext) -> torch.Tensor:
        """``gen_c_per_phase``: the generator's cameras of ``phase``: ``Gmain`` keeps the step's
        (``_prepare``), ``Greg`` and ``Dmain`` draw their own (EG3D draws ``gen_c`` for every
        phase): a permutation of the batch's labels, or with ``gen_c_source="dataset"`` a draw
        from the dataset's (:meth:`_draw_gen_c`)."""
        if phase not in self._GEN_C_PHASES:
            return data["gen_c"]
        cam = data["camera"]
        k = self._GEN_C_PHASES.index(phase) + 1
        if self.cfg.gen_c_source == "dataset":
            return self._draw_gen_c(cam.shape[0], k, ctx).to(cam)
        g = torch.Generator().manual_seed((int(ctx.step) * 7919 + 17) * 4 + k)
        return cam[torch.randperm(cam.shape[0], generator=g).to(cam.device)]

    def label_pools(self) -> tuple[str, ...]:
        """``gen_c_source="dataset"`` draws the generator's cameras from every item's
        ``camera`` (the Trainer hands them over: :meth:`TrainableModel.label_pools`)."""
        return ("camera",) if self.cfg.gen_c_source == "dataset" else ()

    def label_pool_shape(self, key: str) -> tuple[int, ...] | None:
        """Every item's ``camera``: one EG3D label (25,) (a dataset of clips is refused before
        its items are read)."""
        return (25,) if key == "camera" else None

    def _draw_gen_c(self, B: int, k: int, ctx: StepContext) -> torch.Tensor:
        """``gen_c_source="dataset"``: this rank's ``B`` generator cameras of draw ``k`` of the
        step (0: the step's, 1 / 2: ``Greg`` / ``Dmain``'s own with ``gen_c_per_phase``): rows
        of the dataset's labels drawn uniformly with replacement, each mirrored with probability
        1/2 with ``mirror`` (EG3D's dataset holds every image a second time, mirrored, with its
        mirrored label). Seeded by the step and ``k``: the ``B * world_size`` cameras of the
        global batch are drawn at once and rank r takes rows ``[r * B, (r + 1) * B)``, so a
        resumed run draws the same and N ranks draw what one process does with the whole
        batch."""
        pool = self.label_pool("camera")
        if pool is None:
            raise RuntimeError(
                "model.gen_c_source='dataset' needs the dataset's camera labels: the Trainer "
                "hands them to the model (EG3D.label_pools); a model stepped without it needs "
                "model.set_label_pool('camera', labels) with the (N, 25) labels of the dataset "
                "first, or model.gen_c_source='batch'")
        if pool.ndim != 2 or pool.shape[1] != 25:
            raise ValueError(f"label pool 'camera': expected (N, 25) EG3D labels, got "
                             f"{tuple(pool.shape)}")
        n, rank = B * max(int(ctx.world_size), 1), int(ctx.rank)
        g = torch.Generator().manual_seed((int(ctx.step) * 7919 + 17) * 4 + k)
        idx = torch.randint(len(pool), (n,), generator=g)[rank * B:(rank + 1) * B]
        c = pool[idx.to(pool.device)]
        if self.cfg.mirror:
            flip = (torch.rand(n, generator=g) < 0.5)[rank * B:(rank + 1) * B]
            c = torch.where(flip.to(c.device).view(B, 1), mirror_label(c), c)
        return c

    def _c_cond(self, c: torch.Tensor, swapping_prob: float | None) -> torch.Tensor:
        if swapping_prob is None:
            return torch.zeros_like(c)
        swapped = torch.roll(c, 1, 0)
        pick = torch.rand(c.shape[0], 1, device=c.device) < swapping_prob
        return torch.where(pick, swapped, c)

    def run_G(self, z, c, swapping_prob, res, update_emas=False) -> dict:
        ws = self.G.mapping(z, self._c_cond(c, swapping_prob), update_emas=update_emas)
        out = self.G.synthesis(ws, c, neural_rendering_resolution=res, noise_mode="random")
        out["ws"] = ws
        return out

    def run_D(self, image, image_raw, c, blur_sigma) -> torch.Tensor:
        return self.D(eg3d_blur(image, blur_sigma), image_raw, c)

    def _set_trainable(self, phase: str) -> None:
        g = phase.startswith("G")
        self.G.requires_grad_(g)
        self.D.requires_grad_(not g)

    # --- TrainableModel --------------------------------------------------------------------
    def data_keys(self) -> dict:
        """Item keys a training step reads (checked before training by the engine)."""
        return {"image": None, "camera": None}

    def step(self, phase: str, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if ctx.engine is not None:
            # the previews render the engine's EMA generator (the live one without train.ema);
            # kept outside the module tree (not a sub-module: no parameters, no state)
            self.__dict__["_ema_generator"] = ctx.ema("G")
        data = self._prepare(batch, ctx)
        B = data["image"].shape[0]
        dev = data["image"].device
        nimg = ctx.images_seen
        res = self.rendering_resolution(nimg)
        self.G.rendering_resolution.fill_(res)
        sp = self.swapping_prob(nimg)
        sigma = self.blur_sigma(nimg, ctx.batch_size)
        gen_c = self._gen_c(data, phase, ctx) if cfg.gen_c_per_phase else data["gen_c"]
        z = torch.randn(B, cfg.generator.z_dim, device=dev)
        self._set_trainable(phase)
        if phase == "Gmain":
            gen = self.run_G(z, gen_c, sp, res)
            logits = self.run_D(gen["image"], gen["image_raw"], gen_c, sigma)
            loss = F.softplus(-logits).mean()
            out = {"loss": loss, "g_logits": logits.detach().mean(),
                   "opacity": gen["image_opacity"].detach().mean()}
            if data["gen_mask"] is not None:
                out.update(silhouette_measures(gen["image_opacity"], data["gen_mask"]))
            elif data["mask"] is not None and self._measuring_depth(ctx):
                out.update(self.silhouette_at(gen, data["camera"], data["mask"], res))
            if self._measuring_depth(ctx):
                out.update(self.depth_measures(gen, gen_c, res))
            self._measure(ctx, out)
            return out
        if phase == "Greg":
            ws = self.G.mapping(z, self._c_cond(gen_c, sp))
            planes = self.G.backbone.planes(ws, noise_mode="random")
            r = cfg.generator.render
            k = cfg.g_reg_interval
            if cfg.reg_type == "l1":
                tv = density_l1_regularizer(planes, self.G.decoder, n_points=1000,
                                            p_dist=cfg.density_reg_p_dist,
                                            plane_axes=r.plane_axes, box_size=r.box_warp)
                loss = tv * cfg.density_reg
                return {"loss": loss * k, "density_tv": tv.detach()}
            mono = density_monotonic_regularizer(planes, self.G.decoder, n_points=2000,
                                                 box_size=r.box_warp,
                                                 detach=cfg.reg_type == "monotonic-detach",
                                                 plane_axes=r.plane_axes)
            tv = density_l1_regularizer(planes, self.G.decoder, n_points=1000,
                                        p_dist=r.box_warp / 256, plane_axes=r.plane_axes,
                                        box_size=r.box_warp)
            loss = mono + tv * cfg.density_reg
            return {"loss": loss * k, "density_monotonic": mono.detach(),
                    "density_tv": tv.detach()}
        real = data["image"]
        real_raw = filtered_resize(real, res)
        real_raw = eg3d_blur(real_raw, sigma)          # EG3D blurs the raw target too
        if phase == "Dmain":
            with torch.no_grad():
                gen = self.run_G(z, gen_c, sp, res, update_emas=True)
            gen_logits = self.run_D(gen["image"], gen["image_raw"], gen_c, sigma)
            real_logits = self.run_D(real, real_raw, data["camera"], sigma)
            loss = F.softplus(gen_logits).mean() + F.softplus(-real_logits).mean()
            out = {"loss": loss, "real_logits": real_logits.detach().mean(),
                   "fake_logits": gen_logits.detach().mean(),
                   "logit_gap": (real_logits.mean() - gen_logits.mean()).detach()}
            self._measure(ctx, out)
            return out
        if phase == "Dreg":
            img = real.detach().requires_grad_(True)
            raw = real_raw.detach().requires_grad_(True)
            logits = self.run_D(img, raw, data["camera"], sigma)
            grads = torch.autograd.grad(logits.sum(), [img, raw], create_graph=True)
            penalty = sum(g.square().flatten(1).sum(1) for g in grads)
            loss = (penalty * (cfg.r1_gamma / 2)).mean()
            return {"loss": loss * cfg.d_reg_interval, "r1_penalty": penalty.detach().mean()}
        raise ValueError(f"phase: expected one of {[p.name for p in self.phases()]}, got "
                         f"{phase!r}")

    # --- measurements in the training log ----------------------------------------------------
    _MEASURES = ("iou", "iou_all", "fg_opacity", "bg_opacity", "opacity_contrast", "depth_err",
                 "depth_err_flat", "depth_overlap", "logit_gap")
    DEPTH_YAW = 0.35            # radians between the two views of the depth measure

    def _measuring_depth(self, ctx: StepContext) -> bool:
        every = self.cfg.measure_every
        return bool(every) and ctx.rank == 0 and ctx.step % max(1, every // 5) == 0

    @torch.no_grad()
    def depth_measures(self, gen: dict, c: torch.Tensor, res: int) -> dict[str, torch.Tensor]:
        """The generated planes rendered again from the cameras orbited by ``DEPTH_YAW``:
        ``depth_err`` (:func:`depth_consistency` of the two views' depths), ``depth_err_flat``
        (the same for the trivial answer: every ray opaque at the middle of the ray range) and
        ``depth_overlap`` (the fraction of opaque pixels compared)."""
        c_b = orbit_label(c, self.DEPTH_YAW)
        other = self.G.synthesis(gen["ws"].detach(), c_b, neural_rendering_resolution=res,
                                 planes=gen["planes"].detach(), sr=False)
        err, overlap = depth_consistency(gen["image_depth"], gen["image_opacity"], c,
                                         other["image_depth"], other["image_opacity"], c_b)
        r = self.cfg.generator.render
        flat = torch.full_like(gen["image_depth"], (r.ray_start + r.ray_end) / 2)
        ones = torch.ones_like(flat)
        err_flat, _ = depth_consistency(flat, ones, c, flat, ones, c_b)
        return {"depth_err": err, "depth_err_flat": err_flat, "depth_overlap": overlap}

    @torch.no_grad()
    def silhouette_at(self, gen: dict, c: torch.Tensor, mask: torch.Tensor, res: int
                      ) -> dict[str, torch.Tensor]:
        """:func:`silhouette_measures` of the generated planes rendered again (no SR) at the
        cameras ``c`` of the masks ``mask``: ``gen_c_source="dataset"`` renders at drawn cameras
        that have no real image (no mask), so the measures take the batch's own cameras."""
        other = self.G.synthesis(gen["ws"].detach(), c, neural_rendering_resolution=res,
                                 planes=gen["planes"].detach(), sr=False)
        return silhouette_measures(other["image_opacity"], mask)

    def _measure(self, ctx: StepContext, out: dict) -> None:
        """Averages the silhouette measures and the D logit gap over ``measure_every`` steps and
        logs them (log.txt); step 0 (the initialisation) is logged on its own."""
        every = self.cfg.measure_every
        if not every or ctx.rank != 0:
            return
        acc = self.__dict__.setdefault("_acc", {})
        for k in self._MEASURES:
            if k in out:
                acc.setdefault(k, []).append(float(out[k]))
        if "logit_gap" not in out:            # log after the D phase of the step
            return
        if ctx.step == 0 or (ctx.step + 1) % every == 0:
            vals = {k: sum(v) / len(v) for k, v in acc.items() if v}
            log.info("eg3d measures step %d (kimg %.2f, %d steps): %s", ctx.step,
                     (ctx.images_seen + ctx.batch_size) / 1000, max(len(acc.get("logit_gap",
                                                                                 [])), 1),
                     " ".join(f"{k}={v:.4f}" for k, v in vals.items()))
            acc.clear()

    # --- previews --------------------------------------------------------------------------
    def _ema_G(self) -> EG3DGenerator:
        """The generator the previews render: the engine's EMA copy once a training step has
        run (``step`` records it), else the live one."""
        return self.__dict__.get("_ema_generator") or self.G

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        G = self._ema_G()
        cam = batch["camera"].float()
        g = torch.Generator().manual_seed(123)
        z = torch.randn(cam.shape[0], self.cfg.generator.z_dim, generator=g).to(cam.device)
        out = G(z, cam)
        real = batch["image"].float()
        if self.cfg.background == "white" and "mask" in batch:
            real = real * batch["mask"].float() + (1 - batch["mask"].float())
        R = real.shape[-1]
        return {"real": real, "image": out["image"],
                "image_raw": filtered_resize(out["image_raw"], R),
                "opacity": filtered_resize(out["image_opacity"] * 2 - 1, R).expand(-1, 3, -1, -1)}

    @torch.no_grad()
    def preview_video(self, batch: dict, frames: int) -> torch.Tensor:
        from pyface.face.cameras import orbit_labels

        G = self._ema_G()
        g = torch.Generator().manual_seed(123)
        n = min(4, batch["image"].shape[0])
        z = torch.randn(n, self.cfg.generator.z_dim, generator=g).to(batch["image"].device)
        cond = G.camera(0.0, 0.0).expand(n, -1)
        ws = G.mapping(z, cond)
        labels = orbit_labels(frames, radius=G.cfg.avg_camera_radius,
                              pivot=tuple(G.cfg.avg_camera_pivot)).to(z.device)
        clips = []
        for t in range(frames):
            img = G.synthesis(ws, labels[t:t + 1].expand(n, -1))["image"]
            clips.append(torch.cat(list(img.clamp(-1, 1)), dim=-1))
        return torch.stack(clips)
