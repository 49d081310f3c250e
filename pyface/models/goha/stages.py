# Provenance: reproduces the stage-s1_gan and stage-s2 training of GOHA ("Generalizable One-shot
# 3D Neural Head Avatar", NVlabs/GOHA, NVIDIA Source Code License, non-commercial) from the paper
# (section 3.5) and pyface's design study (shared/reference/specs/otavatar-goha.md section 2).
# Our own implementation; no upstream code is copied. pyface's code is licensed under Apache-2.0
# (LICENSE).
"""GOHA's later stages, chained after s1 by ``pyface train goha``.

* ``s1_gan`` (:class:`GOHAGAN`, registered ``goha_s1_gan``; starts from the s1 run
  ``model.s1_checkpoint``): the canonical branch frozen; G modes by ``step % 6``: 0 ``src``,
  1 ``tar``, 2-5 ``coarse``, every plane on (``tar`` lifts the source's expression, or with
  ``model.tar_lift_expression="driving"``, GOHA's, the driving one's, in s2 too); L1 +
  density TV + VGG19 (GOHA's layer weights) + ``gan_weight`` x logistic GAN of a StyleGAN2
  discriminator (:class:`pyface.nn.GFPGANDiscriminator`, 3 channels, at R) that sees the
  render upsampled to R (in every G mode, or with ``model.gan_in_coarse=false``, GOHA's, in
  ``src`` / ``tar`` only); D every ``d_interval`` (4) steps, R1 (gamma 10) every
  ``r1_interval`` (16).
* ``s2`` (:class:`GOHASR`, registered ``goha``, the final model; starts from the s1_gan run
  ``model.s1_gan_checkpoint``): only the super-resolution trains (:class:`pyface.nn.
  GFPGANv1Clean` at R, its input the raw render upsampled to R; GFPGANv1.3 ``params_ema`` from
  ``model.sr_path``); G modes by ``step % 2``: 0 ``src``, 1 ``tar``; L1 + VGG19 (on the SR
  image, or with ``model.sr_raw_terms``, GOHA's, the mean over it and the upsampled raw render)
  + GAN of a 6-channel dual discriminator (the SR image and the upsampled raw render;
  initialised from the s1_gan D with a fresh first 1x1 conv, or with ``model.s2_disc_init=
  "gfpgan"`` and ``model.disc_path``, GOHA's, from GFPGAN's net_d); D every step
  (``d_interval`` 1, lr 5e-4), R1 every 16 (w.r.t. the real raw render at r, or with
  ``model.r1_inputs="input"``, GOHA's, w.r.t. the 6-channel input at R).

``pyface train goha --preset P`` trains s1, then s1_gan, then s2 (in ``RUN/stages/s1`` and
``RUN/stages/s1_gan``; the platform's :class:`~pyface.train.model.Stage` chain); each stage's
weights are loaded from the previous run by name and shape (every G tensor must match). The
fake images of a step's G phase (detached) feed the same step's D phases, or with
``model.d_fakes="tar"`` (GOHA's) a separate no-grad render of the driving frame does.
The options' defaults are pyface's earlier training (kept by ``tiny``, and by a saved run
without the keys); the ``full`` and ``gpu-short`` presets set GOHA's
(:data:`pyface.models.goha.config.GOHA_TRAINING`).
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from pyface.checkpoint import CheckpointError
from pyface.nn import GFPGANDiscriminator, GFPGANv1Clean
from pyface.nn.gfpgan import GFPGANConfig, GFPGANDiscriminatorConfig
from pyface.nn.losses import gan_d_loss, gan_g_loss, r1_penalty
from pyface.train.model import Phase, Stage, StepContext, load_pretrained

from pyface.models.goha.config import GOHA_INFERENCE, GOHA_TRAINING
from pyface.models.goha.model import GOHA, GPU_SHORT_MODEL, TINY_DATA, TINY_MODEL, PLANE_AXES

log = logging.getLogger("pyface.models.goha")

#: GOHA's VGG19 layers and weights of stages s1_gan / s2
VGG_LAYERS = ["conv1_2", "conv2_2", "conv3_4", "conv4_4", "conv5_4"]
VGG_LAYER_WEIGHTS = [0.1, 0.1, 1.0, 1.0, 1.0]
#: the sub-modules of stage s1 (the generator G of the later stages)
G_MODULES = ("encoder_canonical", "encoder_expression", "encoder_appearance",
             "embed_canonical", "embed_expression", "upsampler", "decoder")
CANONICAL_MODULES = ("encoder_canonical", "embed_canonical")


def s1_gan_mode(step: int) -> str:
    """The G mode of s1_gan step ``step``: by ``step % 6``: 0 ``src``, 1 ``tar``, 2-5
    ``coarse``."""
    return ("src", "tar", "coarse", "coarse", "coarse", "coarse")[step % 6]


def s2_mode(step: int) -> str:
    """The G mode of s2 step ``step``: ``src`` on even steps, ``tar`` on odd ones."""
    return ("src", "tar")[step % 2]


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1])


class _GANStage(GOHA):
    """Shared by s1_gan and s2: a discriminator, GOHA's VGG term, loading the previous
    stage."""

    all_planes = True
    canonical_trainable = False
    #: sub-modules that train in the G phase
    trainable: tuple[str, ...] = ()
    #: the config key of the previous stage's run
    previous_key = ""
    disc_channels = 3

    def __init__(self, cfg=None):
        super().__init__(cfg)
        cfg = self.cfg
        R = cfg.resolution
        if R & (R - 1):
            raise ValueError(f"model.resolution: stage {self.stage_name} needs a power of two "
                             f"(its discriminator / super-resolution run at R), got {R}")
        self.discriminator = GFPGANDiscriminator(GFPGANDiscriminatorConfig(
            out_size=R, narrow=cfg.disc_narrow, in_channels=self.disc_channels))
        self._vgg = None
        self._vgg_warned = False
        if cfg.vgg_weight > 0 and cfg.vgg_path:
            from pyface.nn import PerceptualLoss
            from pyface.nn.vgg import PerceptualConfig
            self._vgg = [PerceptualLoss(PerceptualConfig(layers=list(VGG_LAYERS),
                                                         layer_weights=list(VGG_LAYER_WEIGHTS)),
                                        weights=cfg.vgg_path)]
        for name in G_MODULES:
            if name not in self.trainable:
                getattr(self, name).requires_grad_(False)
        self._cache: dict | None = None
        #: ``model.d_fakes="tar"``: (step, fake, real) of the D phases' own render
        self._d_cache: tuple | None = None

    # ------------------------------------------------------------------ previous stage
    def load_previous(self, path: str, *, fresh: tuple[str, ...] = (),
                      skip: tuple[str, ...] = ()) -> dict:
        """Loads the previous stage's run ``path``: every tensor of this model found there by
        name; the G tensors (:data:`G_MODULES`) must all be present with equal shapes
        (else :class:`CheckpointError`); others of another shape (``fresh``, e.g. the dual D's
        6-channel first conv) keep their initialisation, and so do those whose names start with
        one of ``skip`` (e.g. ``"discriminator."``: s2's D from GFPGAN's net_d). Returns
        ``{"loaded", "fresh"}``."""
        _, state = load_pretrained(path)
        own = self.state_dict()
        loaded, kept = {}, []
        for k, v in own.items():
            w = state.get(k)
            is_g = k.split(".")[0] in G_MODULES
            if skip and k.startswith(skip) and not is_g:
                kept.append(k)
            elif w is not None and tuple(w.shape) == tuple(v.shape):
                loaded[k] = w
            elif is_g:
                raise CheckpointError(
                    f"model.{self.previous_key}={path!r}: "
                    + (f"{k} is missing" if w is None else
                       f"{k} has shape {tuple(w.shape)}, the model {tuple(v.shape)}")
                    + " (the stages must share one model config)")
            else:
                kept.append(k)
        unexpected = [k for k in kept if k in state and not k.startswith(skip)
                      and not any(k.startswith(f) for f in fresh)]
        if unexpected:
            raise CheckpointError(f"model.{self.previous_key}={path!r}: shape mismatch of "
                                  f"{unexpected[:4]}")
        self.load_state_dict(loaded, strict=False)
        log.info("stage %s: %d tensors from %s (%d at their initialisation)", self.stage_name,
                 len(loaded), path, len(kept))
        return {"loaded": len(loaded), "fresh": kept}

    # ------------------------------------------------------------------ losses
    def _vgg_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.vgg_weight <= 0:
            return None
        if self._vgg is None:
            if not self._vgg_warned:
                log.warning("stage %s: model.vgg_path is not set; the VGG19 term "
                            "(model.vgg_weight=%g) is disabled", self.stage_name,
                            self.cfg.vgg_weight)
                self._vgg_warned = True
            return None
        return self._vgg[0].to(pred.device)(pred, target)

    def _fake_real(self, batch: dict, step: int, mode: str | None = None, *,
                   vgg: bool = True):
        """-> (G loss without the GAN term, logs, fake D input, real D input) of the step's G
        mode (or ``mode``; ``vgg=False`` leaves out the VGG term); a D input is an image
        (B, 3, R, R) or, for the dual D, ``(image (B, 3, R, R), raw (B, 3, r, r))``."""
        raise NotImplementedError

    def _d_logits(self, x) -> torch.Tensor:
        return self.discriminator(x)

    def _gan_in_g(self, step: int) -> bool:
        """Whether the G phase of step ``step`` has the GAN term."""
        return True

    def _r1_logits(self, real):
        """-> (inputs the R1 penalty is taken w.r.t., D logits computed from them) of the real
        D input ``real``: here the real image(s) themselves."""
        inputs = [x.detach().requires_grad_(True) for x in
                  (real if isinstance(real, tuple) else (real,))]
        return inputs, self._d_logits(tuple(inputs) if isinstance(real, tuple) else inputs[0])

    def _d_pair(self, batch: dict, step: int):
        """The (fake, real) D inputs of the D phases of step ``step`` (detached):
        ``model.d_fakes`` "g_phase", those of the step's G phase; "tar" (GOHA), a separate
        no-grad render of the driving frame (mode ``tar``) and its target, once per step."""
        if self.cfg.d_fakes == "tar":
            if self._d_cache is None or self._d_cache[0] != step:
                with torch.no_grad():
                    _, _, fake, real = self._fake_real(batch, step, "tar", vgg=False)
                self._d_cache = (step, _detach(fake), _detach(real))
            return self._d_cache[1], self._d_cache[2]
        if self._cache is None:      # D without a G phase before it in this process
            with torch.no_grad():
                _, _, fake, real = self._fake_real(batch, step, vgg=False)
            self._cache = {"fake": _detach(fake), "real": _detach(real)}
        return self._cache["fake"], self._cache["real"]

    def build_optimizers(self):
        g = [p for n in self.trainable for p in getattr(self, n).parameters()]
        return {"G": torch.optim.Adam(g, lr=self.cfg.lr, betas=tuple(self.cfg.betas)),
                "D": torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.lr_d,
                                      betas=tuple(self.cfg.betas))}

    def phases(self):
        frozen = tuple(n for n in G_MODULES if n not in self.trainable)
        return [Phase("G", "G", frozen=("discriminator",) + frozen),
                Phase("D", "D", interval=self.cfg.d_interval, frozen=frozen),
                Phase("Dreg", "D", interval=self.cfg.r1_interval, frozen=frozen)]

    def step(self, phase: str, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if phase == "G":
            total, logs, fake, real = self._fake_real(batch, ctx.step)
            self._cache = {"fake": _detach(fake), "real": _detach(real)}
            if not self._gan_in_g(ctx.step):
                return {"loss": total, **logs}
            g = gan_g_loss(self._d_logits(fake))
            total = total + cfg.gan_weight * g
            return {"loss": total, **logs, "gan": g.detach()}
        fake, real = self._d_pair(batch, ctx.step)
        if phase == "D":
            fl, rl = self._d_logits(fake), self._d_logits(real)
            return {"loss": gan_d_loss(rl, fl), "real_logits": rl.detach().mean(),
                    "fake_logits": fl.detach().mean()}
        if phase == "Dreg":
            inputs, logits = self._r1_logits(real)
            pen = r1_penalty(logits, inputs)
            loss = (pen * (cfg.r1_gamma / 2)).mean() * cfg.r1_interval
            return {"loss": loss, "r1_penalty": pen.detach().mean()}
        raise ValueError(f"phase: expected one of {[p.name for p in self.phases()]}, got "
                         f"{phase!r}")


def _detach(x):
    return tuple(t.detach() for t in x) if isinstance(x, tuple) else x.detach()


class GOHAGAN(_GANStage):
    """GOHA stage s1_gan (see the module docstring): sub-modules of s1 plus ``discriminator``
    (:class:`pyface.nn.GFPGANDiscriminator`, 3 channels at R; ``model.disc_path`` loads
    GFPGAN's ``net_d``)."""

    stage_name = "s1_gan"
    trainable = tuple(n for n in G_MODULES if n not in CANONICAL_MODULES)
    previous_key = "s1_checkpoint"
    stages = (Stage("s1", "goha_s1", "s1_checkpoint"),)
    recipe = {"data": {"name": "pairs", "resolution": 512},
              "train": {"steps": 55_000, "batch_size": 8, "grad_clip": 1000.0,
                        "ckpt_every": 5000, "image_every": 5000}}
    presets = {
        # tiny: at s1's final (decayed) learning rate: at 1e-3 the 60 steps undo s1's settled
        # render (-0.30 dB held out; 1e-4: +0.14 dB, docs/models/goha-measured.md)
        "tiny": {"model": {**TINY_MODEL, "lr": 1e-4},
                 "data": copy.deepcopy(TINY_DATA),
                 "train": {"steps": 60, "batch_size": 2, "grad_clip": 1000.0,
                           "ckpt_every": 60, "image_every": 60, "log_every": 10,
                           "num_workers": 1}},
        "gpu-short": {"model": dict(GPU_SHORT_MODEL),
                      "data": {"name": "pairs", "resolution": 256},
                      "train": {"steps": 500, "batch_size": 8, "ckpt_every": 500,
                                "image_every": 500}},
        "full": {"model": {**GOHA_TRAINING, **GOHA_INFERENCE}},
    }

    def __init__(self, cfg=None):
        super().__init__(cfg)
        if self.cfg.disc_path:
            self._load_disc(self.cfg.disc_path)
        if self.cfg.s1_checkpoint:
            self.load_previous(self.cfg.s1_checkpoint)

    def _load_disc(self, path: str) -> None:
        from pyface.nn.gfpgan import load_gfpgan_discriminator
        d = load_gfpgan_discriminator(path, in_channels=self.disc_channels)
        if d.cfg != self.discriminator.cfg:
            raise ValueError(f"model.disc_path={path!r}: a discriminator {d.cfg}, the model "
                             f"needs {self.discriminator.cfg} (model.resolution / disc_narrow)")
        self.discriminator.load_state_dict(d.state_dict())

    def _gan_in_g(self, step: int) -> bool:
        """``model.gan_in_coarse``: the GAN term in every G mode (True), or only in ``src`` /
        ``tar`` (False, GOHA)."""
        return self.cfg.gan_in_coarse or s1_gan_mode(step) != "coarse"

    def _fake_real(self, batch: dict, step: int, mode: str | None = None, *,
                   vgg: bool = True):
        R = self.cfg.resolution
        t: dict = {}
        total, logs, out = self.s1_losses(batch, step, mode or s1_gan_mode(step), targets=t)
        v = self._vgg_loss(out, t["target"]) if vgg else None
        if v is not None:
            total = total + self.cfg.vgg_weight * v
            logs["vgg"] = v.detach()
        # the discriminator sees both at the render's resolution, upsampled to R (GOHA compares
        # the 512^2 real with the upsampled 224^2 render)
        return total, logs, _resize(out, R), _resize(t["target"], R)


class GOHASR(_GANStage):
    """GOHA stage s2, the final model (see the module docstring): sub-modules of s1 (frozen),
    ``sr`` (:class:`pyface.nn.GFPGANv1Clean` at R) and ``discriminator`` (6-channel dual D)."""

    stage_name = "s2"
    #: train.compile: s1's networks and the super-resolution; not the discriminator (its R1
    #: penalty is a double backward, which AOTAutograd lacks)
    compile_modules = (*GOHA.compile_modules, "sr")
    trainable = ()
    previous_key = "s1_gan_checkpoint"
    disc_channels = 6
    stages = (Stage("s1_gan", "goha_s1_gan", "s1_gan_checkpoint"),)
    recipe = {"data": {"name": "pairs", "resolution": 512},
              "train": {"steps": 75_000, "batch_size": 8, "grad_clip": 1000.0,
                        "ckpt_every": 5000, "image_every": 5000}}
    presets = {
        # tiny: GFPGAN at 1/32 width from random weights cannot learn an identity within 60
        # steps (it lost 0.35 dB against a bilinear upsampling): residual on the upsampling
        "tiny": {"model": {**TINY_MODEL, "d_interval": 1, "lr_d": 5e-3, "sr_residual": True},
                 "data": copy.deepcopy(TINY_DATA),
                 "train": {"steps": 60, "batch_size": 2, "grad_clip": 1000.0,
                           "ckpt_every": 60, "image_every": 60, "log_every": 10,
                           "num_workers": 1}},
        "gpu-short": {"model": {**GPU_SHORT_MODEL, "d_interval": 1, "lr_d": 1e-3},
                      "data": {"name": "pairs", "resolution": 256},
                      "train": {"steps": 500, "batch_size": 8, "ckpt_every": 500,
                                "image_every": 500}},
        "full": {"model": {"d_interval": 1, "lr_d": 5e-4, **GOHA_TRAINING,
                           **GOHA_INFERENCE}},
    }

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        self.sr = GFPGANv1Clean(GFPGANConfig(out_size=c.resolution, narrow=c.sr_narrow,
                                             num_style_feat=c.sr_style_features))
        if c.sr_path:
            from pyface.nn.gfpgan import load_gfpgan
            g = load_gfpgan(c.sr_path)
            if g.cfg.out_size != c.resolution or g.state_dict().keys() != self.sr.state_dict().keys():
                raise ValueError(f"model.sr_path={c.sr_path!r}: a GFPGANv1Clean {g.cfg}, the "
                                 f"model needs out_size {c.resolution}, narrow {c.sr_narrow}, "
                                 f"num_style_feat {c.sr_style_features}")
            self.sr.load_state_dict(g.state_dict())
        #: with ``model.sr_residual``: the scale of GFPGAN's image added to the upsampling
        #: (starts at 0: s2 starts at the bilinear upsampling)
        self.sr_gain = torch.nn.Parameter(torch.zeros(())) if c.sr_residual else None
        if c.disc_path:
            GOHAGAN._load_disc(self, c.disc_path)
        own_d = c.s2_disc_init == "gfpgan" and bool(c.disc_path)
        if c.s2_disc_init == "gfpgan" and not c.disc_path:
            log.info("stage s2: model.s2_disc_init='gfpgan' without model.disc_path: the "
                     "discriminator starts from s1_gan's (as 's1_gan')")
        if c.s1_gan_checkpoint:
            # s2_disc_init "gfpgan" with disc_path (GOHA): the D stays GFPGAN's net_d
            self.load_previous(c.s1_gan_checkpoint, fresh=("discriminator.conv_body.0.",),
                               skip=("discriminator.",) if own_d else ())
        elif not c.sr_path:
            log.info("stage s2: no model.s1_gan_checkpoint; the tri-plane networks start from "
                     "their initialisation")

    def build_optimizers(self):
        g = list(self.sr.parameters()) + ([self.sr_gain] if self.sr_gain is not None else [])
        return {"G": torch.optim.Adam(g, lr=self.cfg.lr,
                                      betas=tuple(self.cfg.betas)),
                "D": torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.lr_d,
                                      betas=tuple(self.cfg.betas))}

    def train(self, mode: bool = True):
        super().train(mode)
        for n in G_MODULES:               # frozen: fixed rendering samples are not used,
            getattr(self, n).train(False)  # but no dropout / statistics drift either
        return self

    @property
    def output_resolution(self) -> int:
        return self.cfg.resolution

    def finish(self, raw: torch.Tensor, *, generators: list | None = None) -> torch.Tensor:
        """raw render (B, 3, r, r) -> SR image (B, 3, R, R): GFPGANv1Clean on the bilinear
        upsampling (``align_corners=True``, as GOHA's GFPUpsampler). With
        ``model.sr_residual``: ``up + sr_gain * GFPGANv1Clean(up)``, ``up`` the bilinear
        upsampling with ``align_corners=False`` (pixel centres, as the render's rays).
        Noise maps: fresh ones drawn inside the SR in training; outside training
        ``model.sr_noise`` "stored" uses the stored maps, "random" (GOHA's) fresh ones drawn
        here, before the SR runs (so a compiled SR gets the same numbers as an eager one): item
        ``b``'s from ``generators[b]`` (one ``torch.Generator`` per item), else from torch's
        generator."""
        R = self.cfg.resolution
        residual = self.sr_gain is not None
        x = raw if raw.shape[-1] == R else F.interpolate(raw, size=(R, R), mode="bilinear",
                                                         align_corners=not residual)
        if self.sr.training:
            y = self.sr(x, randomize_noise=True)
        elif self.cfg.sr_noise == "random":
            y = self.sr(x, noise=self.sr.stylegan_decoder.draw_noise(
                x.shape[0], generators=generators, device=x.device, dtype=x.dtype))
        else:
            y = self.sr(x, randomize_noise=False)
        return x + self.sr_gain * y if residual else y

    def foreground(self, raw: torch.Tensor, image: torch.Tensor,
                   alpha: torch.Tensor) -> torch.Tensor:
        """The SR image kept inside the render's opacity ``alpha (B, 1, R, R)``, premultiplied,
        in [0, 1] (see :meth:`GOHA.foreground`): GFPGAN's image is not exactly black where the
        render is clear (+0.8 dB held out, tiny), so it is multiplied by ``alpha``; with
        ``model.sr_residual`` only the residual is (the upsampled render is already
        premultiplied)."""
        if self.sr_gain is None:
            return (image * 0.5 + 0.5).clamp(0, 1) * alpha
        R = self.cfg.resolution
        up = raw if raw.shape[-1] == R else F.interpolate(raw, size=(R, R), mode="bilinear",
                                                          align_corners=False)
        return ((up + (image - up) * alpha) * 0.5 + 0.5).clamp(0, 1)

    def _fake_real(self, batch: dict, step: int, mode: str | None = None, *,
                   vgg: bool = True):
        cfg = self.cfg
        mode = mode or s2_mode(step)
        src = self.prepare_frame(batch["source"], "batch['source']")
        drv = src if mode == "src" else self.prepare_frame(batch["driving"], "batch['driving']")
        with torch.no_grad():
            if mode != "src" and cfg.tar_lift_expression == "driving":
                # GOHA: tar lifts the canonical + driving-expression planes (as in s1)
                state = self.encode_source(src, appearance=False)
                exp = self.encode_expression(self._pseudo(src, drv))
                base = state["canonical"] + exp
                planes = base + self.encode_appearance(src["image"], state["region_mask"], base,
                                                       src["camera"],
                                                       self._source_regions_neutral(src))
            else:
                state = self.encode_source(src)
                planes = self.animate_planes(state, drv["coeffs"][:, 80:144],
                                             pseudo=self._pseudo(src, drv))
            raw = self.render(planes, drv["camera"])["image"]
        img = self.finish(raw)
        target = drv["image"]
        real_raw = _resize(target, cfg.render_resolution)
        l1 = (img - target).abs().mean()
        logs = {"l1": l1.detach(), f"mode_{mode}": torch.ones(())}
        v = self._vgg_loss(img, target) if vgg else None
        if cfg.sr_raw_terms:
            # GOHA: L1 / VGG over the SR image and the raw render, both at R (the raw render and
            # the target at r upsampled as the dual D sees them), the mean of the two; the raw
            # render is frozen here, so its half only adds a constant
            up, up_real = (self.discriminator.dual_input(img, x)[:, 3:]
                           for x in (raw, real_raw))
            raw_l1 = (up - up_real).abs().mean()
            logs["raw_l1"] = raw_l1.detach()
            l1 = (l1 + raw_l1) / 2
            if v is not None:
                vr = self._vgg_loss(up, up_real)
                logs["raw_vgg"] = vr.detach()
                v = (v + vr) / 2
        total = cfg.l1_weight * l1
        if v is not None:
            total = total + cfg.vgg_weight * v
            logs["vgg"] = v.detach()
        return total, logs, (img, raw), (target, real_raw)

    def _d_logits(self, x) -> torch.Tensor:
        img, raw = x
        return self.discriminator.dual(img, raw)

    def _r1_logits(self, real):
        """``model.r1_inputs``: "raw", R1 w.r.t. the real SR-size image and the real raw at r
        (before the D's upsampling, as EG3D's dual D); "input" (GOHA), w.r.t. the 6-channel D
        input at R."""
        if self.cfg.r1_inputs == "input":
            x = self.discriminator.dual_input(*real).detach().requires_grad_(True)
            return [x], self.discriminator(x)
        return super()._r1_logits(real)

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        out = super().preview(batch)
        out["super_resolved"] = F.interpolate(self.finish(out["reconstruction"]),
                                              size=out["reconstruction"].shape[-2:],
                                              mode="bilinear", antialias=True,
                                              align_corners=False)
        return out
