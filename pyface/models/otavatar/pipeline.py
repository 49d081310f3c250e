# Provenance: reproduces the semantics of OTAvatar's inference (theEricMa/OTAvatar, commit
# c8c484f, CC BY-NC-SA 4.0; inference_refine_1D_cam.py): W inversion of the source with the EMA
# controller and an intrinsics bias (SR terms in the last iterations), an optional W+ pass, then
# per driving frame controller -> planes -> render -> super-resolution. Our own implementation; no
# upstream code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""OTAvatar inference: one-shot inversion of the source, then animation by motion windows.

``encode_source``: source ``image`` (3, H, W), ``camera`` (25,), optional ``coeffs`` (257,)
(the source's own motion window: its coefficients repeated) and ``landmarks`` (68, 2) ->
state ``{"w" (1, num_ws, w_dim), "intrinsics" (1, 18), "camera" (1, 25), "motion" (1, 70, W),
"loss": [...], "seconds"}``.
``encode_driving``: ``motion`` (T, 70, W) windows, or ``coeffs`` (T, 257) (windows over these T
frames, clamped at the ends), and optional ``camera`` (T, 25).
``generate(state, motion, camera="driving" | "source" | "orbit")`` -> (T, 3, R, R) in [-1, 1].
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import time

import torch

from pyface.face.cameras import free_view_orbit
from pyface.face.coeffs import motion_window
from pyface.nn.render import renderer_uniforms
from pyface.train.model import Pipeline, check_choice, frame_place, locate_frames

log = logging.getLogger("pyface.models.otavatar")

CAMERA_MODES = ("driving", "source", "orbit")

#: ``pivotal_tuning``'s modes (``model.pti_mode``): pyface's (SmoothL1 of the raw and
#: super-resolved images, the metric on the super-resolved image, checked before each update)
#: or the reference's (the raw render alone, the metric on it nearest-upsampled, checked after)
PTI_MODES = ("pyface", "reference")

#: the inference profiles (``model.inference``): the values of the four options where neither
#: the call nor the config sets them. ``pyface``: w's gradient clipped at ``invert_clip``, no
#: clamp, the W+ pass's intrinsics bias restarted at 0, pyface's PTI (the defaults, with which
#: the documented numbers were measured); ``reference``: the reference code's inference
#: (docs/models/otavatar.md, deviations)
INFERENCE_PROFILES = {
    "pyface": {"clip": True, "clamp": False, "wplus_keep_intrinsics": False,
               "pti_mode": "pyface"},
    "reference": {"clip": False, "clamp": True, "wplus_keep_intrinsics": True,
                  "pti_mode": "reference"},
}

#: option (encode_source keyword) -> its config field
INFERENCE_FIELDS = {"clip": "inference_clip", "clamp": "inference_clamp",
                    "wplus_keep_intrinsics": "wplus_keep_intrinsics", "pti_mode": "pti_mode"}


def _check_inference_value(name: str, key: str, value) -> None:
    if key == "pti_mode":
        check_choice(name, value, PTI_MODES)
    elif not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")


def check_inference_config(cfg) -> None:
    """``model.inference`` and the four option fields (None or a value), a ValueError naming
    the field otherwise."""
    check_choice("model.inference", cfg.inference, INFERENCE_PROFILES)
    for key, fld in INFERENCE_FIELDS.items():
        value = getattr(cfg, fld)
        if value is not None:
            _check_inference_value(f"model.{fld}", key, value)


def inference_options(cfg, profile: str | None = None, **given) -> dict:
    """The source encoding's four options (``clip``, ``clamp``, ``wplus_keep_intrinsics``,
    ``pti_mode``): each one ``given`` (not None) wins; then, with a ``profile`` given, that
    profile's value; else the config's field (``model.inference_clip``, ...) when set, else
    the config's profile's (``model.inference``). Bad values are a ValueError naming the
    option."""
    unknown = set(given) - set(INFERENCE_FIELDS)
    if unknown:
        raise TypeError(f"inference_options: unknown options {sorted(unknown)}")
    check_inference_config(cfg)
    if profile is not None:
        check_choice("profile", profile, INFERENCE_PROFILES)
    out = {}
    for key, fld in INFERENCE_FIELDS.items():
        value = given.get(key)
        if value is not None:
            _check_inference_value(key, key, value)
        elif profile is not None:
            value = INFERENCE_PROFILES[profile][key]
        elif getattr(cfg, fld) is not None:
            value = getattr(cfg, fld)
        else:
            value = INFERENCE_PROFILES[cfg.inference][key]
        out[key] = value
    return out


def invert(model, image: torch.Tensor, camera: torch.Tensor, motion: torch.Tensor,
           landmarks: torch.Tensor | None = None, *, steps: int = 100, sr_steps: int = 10,
           space: str = "w", lr: float | None = None, intrinsics_lr: float | None = None,
           w_init: torch.Tensor | None = None, clip: float | None | str = "config",
           clamp: bool = False, intrinsics_init: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Inverts ``image`` (1, 3, R, R) in [-1, 1], seen from ``camera`` (1, 25) with motion
    window ``motion`` (1, 70, W), into the identity latent of ``model`` (an :class:`OTAvatar`,
    its generator and controller frozen): ``ws = w + controller(motion)``.

    ``space="w"`` optimises one latent w (1, 1, w_dim) repeated over the layers, starting at
    ``w_avg`` (as training does); ``"w+"`` one latent per layer, starting at ``w_init`` (a W
    result, (1, num_ws, w_dim)) or ``w_avg``. The
    intrinsics bias (1, 18) is optimised with it (AdamW, no decay); the last ``sr_steps``
    iterations add the super-resolved terms. Returns ``(w (1, num_ws, w_dim),
    intrinsics (1, 18), losses per iteration)``. Each render's ray samples are drawn before the
    call (:func:`drawn_samples`).

    ``clip``: the grad-norm clip of w per iteration (``"config"``: ``model.cfg.invert_clip``,
    as training; None: unclipped, the reference's inference). ``clamp``: render ``ws``
    clamped to ``w_avg +- model.cfg.w_clamp`` (the training clamp; the reference's inference
    inversion), a clamped coordinate getting no gradient; False (pyface's default): no clamp.
    ``intrinsics_init``: the bias (1, 18) to start from (None: zeros; the reference's W+ pass
    continues from its W pass's bias)."""
    from pyface.models.otavatar.model import apply_intrinsics

    cfg = model.cfg
    if space not in ("w", "w+"):
        raise ValueError(f"space: expected 'w' or 'w+', got {space!r}")
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image: expected shape (1, 3, R, R), got {tuple(image.shape)}")
    if camera.shape != (1, 25):
        raise ValueError(f"camera: expected shape (1, 25), got {tuple(camera.shape)}")
    G, ctrl = model.generator, model.controller
    req = [(p, p.requires_grad) for p in list(G.parameters()) + list(ctrl.parameters())]
    for p, _ in req:
        p.requires_grad_(False)
    try:
        if space == "w" and w_init is not None:
            raise ValueError("w_init: only for space='w+'")
        with torch.no_grad():
            offset = ctrl(motion.float())
            if space == "w":
                w0 = model.w_avg.reshape(1, 1, -1).clone()
            else:
                start = model.w_avg.reshape(1, 1, -1) if w_init is None else w_init.detach()
                w0 = start.expand(1, G.num_ws, -1).clone()
        w = w0.requires_grad_(True)
        if intrinsics_init is None:
            kb = torch.zeros(1, 18, device=image.device, requires_grad=True)
        else:
            kb = intrinsics_init.detach().clone().reshape(1, 18).requires_grad_(True)
        if isinstance(clip, str):
            if clip != "config":
                raise ValueError(f"clip: expected a float > 0, None or 'config', got {clip!r}")
            clip = cfg.invert_clip
        opt_w = torch.optim.Adam([w], lr=cfg.invert_lr if lr is None else lr,
                                 betas=tuple(cfg.invert_betas))
        opt_k = torch.optim.AdamW([kb], lr=cfg.intrinsics_lr if intrinsics_lr is None
                                  else intrinsics_lr, betas=tuple(cfg.intrinsics_betas),
                                  weight_decay=0.0)
        losses = []
        for it in range(steps):
            sr = it >= steps - sr_steps
            ws = w.expand(1, G.num_ws, -1) + offset
            if clamp:
                ws = model._clamp(ws)
            out = G.synthesis(ws, apply_intrinsics(camera, kb), sr=sr, **drawn_samples(G, w, sr))
            loss, _ = model.loss(out, image, landmarks, sr=sr)
            opt_w.zero_grad(set_to_none=True)
            opt_k.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_([w], clip)
            opt_w.step()
            opt_k.step()
            losses.append(float(loss.detach()))
    finally:
        for p, r in req:
            p.requires_grad_(r)
    return w.detach().expand(1, G.num_ws, -1).contiguous(), kb.detach(), losses


def pivotal_tuning(model, ws: torch.Tensor, camera: torch.Tensor, image: torch.Tensor, *,
                   steps: int, lr: float, stop: float | None = None, metric=None,
                   metric_stop: float = 0.06, compile=None, compile_names=(),
                   mode: str = "pyface"):
    """PTI: a copy of ``model.generator`` tuned so that ``ws`` (1, num_ws, w_dim) seen from
    ``camera`` (1, 25) renders ``image`` (1, 3, R, R): Adam ``lr``, at most ``steps``
    iterations of SmoothL1 on the raw (area-resized target) and super-resolved images.

    Stopping rule: with ``metric`` (a callable ``(pred, target) -> (N,)`` distance of images
    (N, 3, R, R) in [-1, 1], e.g. LPIPS), OTAvatar's: stop once the metric of the
    super-resolved image before an update is <= ``metric_stop`` (0.06); without it, stop once
    the SmoothL1 is <= ``stop`` (None: run every iteration). Returns ``(generator copy (eval
    mode, frozen), losses)``; with ``metric`` the losses are the metric's values.

    ``compile`` (a :class:`~pyface.nn.compiling.CompileOptions` or a mode) compiles the copy's
    modules ``compile_names`` (relative to the generator) before tuning: a deep copy of a
    compiled module is not compiled (``torch.nn.Module`` drops its compiled call when copied),
    and the tuned copy renders every frame (:meth:`OTAvatarPipeline.encode_source` passes the
    pipeline's own). Each render's ray samples are drawn before the call
    (:func:`drawn_samples`).

    ``mode="reference"``: the reference's PTI instead: SmoothL1 of the raw render alone
    (against the area-resized target; no super-resolution pass), the metric measured on the
    raw render nearest-upsampled to the target's size, and the stopping rule checked after
    each update on that iteration's (pre-update) render, so it stops one update later."""
    import copy

    import torch.nn.functional as F

    from pyface.nn.compiling import compile_modules

    check_choice("pti_mode", mode, PTI_MODES)
    ref = mode == "reference"
    G = copy.deepcopy(model.generator).train()
    compile_modules(G, tuple(compile_names), compile)
    G.requires_grad_(True)
    opt = torch.optim.Adam(G.parameters(), lr=lr)
    ws, camera, image = ws.detach(), camera.detach(), image.float()
    losses = []
    for _ in range(steps):
        out = G.synthesis(ws, camera, sr=not ref, **drawn_samples(G, ws, not ref))
        raw = out["image_raw"]
        if ref:
            tgt_raw = F.interpolate(image, size=raw.shape[-2:], mode="area")
            loss = F.smooth_l1_loss(raw, tgt_raw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if metric is not None:           # the render before this update, checked after it
                with torch.no_grad():
                    up = F.interpolate(raw.detach().clamp(-1, 1), size=image.shape[-2:],
                                       mode="nearest")
                    losses.append(float(metric(up, image).mean()))
                if losses[-1] <= metric_stop:
                    break
            else:
                losses.append(float(loss.detach()))
                if stop is not None and losses[-1] <= stop:
                    break
            continue
        if metric is not None:
            with torch.no_grad():
                d = float(metric(out["image"].detach().clamp(-1, 1), image).mean())
            losses.append(d)
            if d <= metric_stop:
                break
        tgt_raw = F.interpolate(image, size=raw.shape[-2:], mode="area")
        loss = F.smooth_l1_loss(out["image"], image) + F.smooth_l1_loss(raw, tgt_raw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if metric is None:
            losses.append(float(loss.detach()))
            if stop is not None and losses[-1] <= stop:
                break
    return G.eval().requires_grad_(False), losses


class OTAvatarPipeline(Pipeline):
    """OTAvatar as a portrait pipeline (see the module docstring). Controls of ``generate``:
    ``camera`` (``"driving"``: the driving frames' cameras, the default when they have one;
    ``"source"``: fixed at the source's; ``"orbit"``: free view, :func:`orbit_cameras`: the
    orbit of ``pyface animate --camera orbit``, one turn over a :meth:`stream`'s frames).
    Controls of ``encode_source``: ``steps``, ``space`` (``"w"`` / ``"w+"``), ``pti_steps``,
    and the inference ``profile`` (``"pyface"`` / ``"reference"``) with its four options.

    ``pti_metric``: a perceptual distance ``(pred, target) -> (N,)`` on (N, 3, R, R) images in
    [-1, 1] (e.g. ``pyface.eval.lpips.LPIPS``); when set, pivotal tuning stops by OTAvatar's
    rule, the metric <= ``model.cfg.pti_stop_metric`` (0.06); otherwise by the SmoothL1 rule
    (``pti_stop``). pyface.models does not build one (no weights ship): the caller passes it
    (constructor, attribute or ``encode_source(pti_metric=...)``).

    The inversion optimises the model's own training loss (:class:`OTAvatarLoss`): its VGG19
    perceptual term needs ``model.vgg_weights`` (else an image-pyramid L1 replaces it) and its
    ArcFace identity term ``model.arcface_weights`` (else it is off); PTI uses neither (SmoothL1
    and ``pti_metric``). The first inversion logs once which terms it runs without;
    :meth:`from_checkpoint` takes ``vgg_weights`` / ``arcface_weights`` to add them."""

    #: compiled by :meth:`compile`: the EG3D generator's synthesis network, renderer and
    #: super-resolution, which the inversion, PTI (its tuned copy is compiled too, and trains
    #: as uncompiled) and every frame run
    compile_modules = ("generator.backbone.synthesis", "generator.renderer",
                       "generator.superresolution")

    def __init__(self, model, *, device=None, pti_metric=None):
        self.resolution = int(model.generator.cfg.img_resolution)
        self.pti_metric = pti_metric
        self._noted_terms = False
        super().__init__(model, device=device)

    @classmethod
    def from_checkpoint(cls, path: str, *, device=None, ema: bool = True,
                        vgg_weights: str | None = None, arcface_weights: str | None = None,
                        options: dict | None = None):
        """An OTAvatar run / training checkpoint, or a ``pyface convert otavatar`` folder.
        ``vgg_weights`` / ``arcface_weights`` (given: they replace the checkpoint's
        ``model.vgg_weights`` / ``model.arcface_weights``): the inversion's perceptual and
        identity terms. ``options``: config values replacing the checkpoint's (its inference
        options as ``pyface.models.load(..., options=...)`` checks and converts them; a dotted
        ``render.KEY`` is merged into the saved ``model.render`` overrides), for runs and
        converted releases alike."""
        over = {k: v for k, v in (("vgg_weights", vgg_weights),
                                  ("arcface_weights", arcface_weights)) if v is not None}
        options = dict(options or {})
        from pyface import checkpoint as ckpt
        from pyface.train.model import (WrongModelError, config_from_dict, read_pretrained,
                                        resolve_checkpoint, with_options)

        from pyface.models.otavatar.model import OTAvatar, OTAvatarConfig

        folder = resolve_checkpoint(path)
        meta = ckpt.read_meta(folder)
        if meta.get("kind") == "otavatar":           # the authors' release, converted
            cfg = OTAvatarConfig(generator=folder, controller_init=folder, local_batch=1,
                                 **over)
            if options:     # dotted keys (render.depth_resolution) set in the complete config
                cfg = config_from_dict(OTAvatarConfig,
                                       with_options(dataclasses.asdict(cfg), options))
            return cls(OTAvatar(cfg, inference=True, option_keys=tuple(options)),
                       device=device)
        pre = read_pretrained(folder, ema=ema)
        if pre.model is not None and pre.model != "otavatar":
            raise WrongModelError(pre.path, pre.meta, "otavatar")
        # a run saved before a loss option gets its earlier value (OTAvatarConfig.saved_before)
        cfg = config_from_dict(OTAvatar.Config, dict(pre.config))
        if options:         # the inference options replace the saved values (errors: model.KEY;
            # a render.KEY is merged into the saved render overrides, keeping the others)
            cfg = config_from_dict(OTAvatar.Config, with_options(dict(pre.config), options))
        if cfg.generator and not os.path.exists(cfg.generator):
            run = os.path.dirname(os.path.dirname(os.path.abspath(pre.path)))
            local = os.path.join(run, "stages", "eg3d")
            if not os.path.isdir(local):
                raise ckpt.CheckpointError(
                    f"checkpoint {pre.path!r}: its EG3D generator (model.generator = "
                    f"{cfg.generator!r}) does not exist, nor does {local!r}; the model is built "
                    "from it: put the generator back at either path")
            cfg.generator = local
        for k, v in over.items():
            setattr(cfg, k, v)
        model = OTAvatar(cfg, inference=True, option_keys=tuple(options))
        ckpt.load_module_state(model, pre.state, f"checkpoint {pre.path!r}")
        return cls(model, device=device)

    @classmethod
    def check_labels(cls, source=None, driving=None) -> None:
        """The source needs its ``camera`` (inversion); driving frames ``motion`` windows or
        ``coeffs``."""
        if source is not None and "camera" not in source:
            raise KeyError("source['camera']: missing; OTAvatar's inversion needs the source's "
                           "EG3D camera label (25,)")
        if driving is not None and "motion" not in driving and "coeffs" not in driving:
            raise ValueError("driving: expected 'motion' (T, 70, W) windows or 'coeffs' "
                             "(T, 257) 3DMM coefficients (OTAvatar is driven by coefficients)")

    # -- stages --------------------------------------------------------------------------------
    def _window(self, coeffs: torch.Tensor) -> torch.Tensor:
        radius = (self.model.controller.cfg.window - 1) // 2
        T = coeffs.shape[0]
        return motion_window(coeffs.float(), torch.arange(T), radius).to(self.device)

    def encode_source(self, source: dict, *, steps: int | None = None,
                      space: str | None = None, pti_steps: int | None = None,
                      pti_metric=None, profile: str | None = None, clip: bool | None = None,
                      clamp: bool | None = None, wplus_keep_intrinsics: bool | None = None,
                      pti_mode: str | None = None) -> dict:
        """The source's state (module docstring). ``steps``, ``space``, ``pti_steps``,
        ``pti_metric``: see the class. ``profile`` (``"pyface"`` / ``"reference"``,
        :data:`INFERENCE_PROFILES`) and the options it sets, each None for the config's
        (``model.inference``, ``model.inference_clip``, ...; :func:`inference_options`):
        ``clip`` (w's gradient clipped at ``invert_clip`` in the inversion), ``clamp`` (ws
        clamped to ``w_avg +- w_clamp`` in the inversion and PTI), ``wplus_keep_intrinsics``
        (the W+ pass starts from the W pass's intrinsics bias, not 0), ``pti_mode``
        (:data:`PTI_MODES`). The options used are in ``state["inference"]``."""
        model, cfg = self.model, self.model.cfg
        source = self.prepare(source, batched=False)
        self.check_labels(source=source)
        space = cfg.invert_space if space is None else space
        steps = cfg.invert_steps if steps is None else steps
        if space not in ("w", "w+"):
            raise ValueError(f"space: expected 'w' or 'w+', got {space!r}")
        for what, n in (("steps", steps), ("pti_steps", pti_steps)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral)
                                  or n < 0):
                raise ValueError(f"{what}: expected an int >= 0, got {n!r}")
        opts = inference_options(cfg, profile, clip=clip, clamp=clamp,
                                 wplus_keep_intrinsics=wplus_keep_intrinsics, pti_mode=pti_mode)
        metric = pti_metric if pti_metric is not None else self.pti_metric
        if metric is not None and not callable(metric):
            raise ValueError(f"pti_metric: expected a callable (pred, target) -> (N,) distance "
                             f"(e.g. pyface.eval.lpips.LPIPS) or None, got {metric!r}")
        if "coeffs" in source:
            motion = self._window(source["coeffs"][None])[:1]
        else:
            motion = torch.zeros(1, 70, model.controller.cfg.window, device=self.device)
        img = source["image"][None]
        cam = source["camera"][None].float()
        lm = source.get("landmarks")
        lm = lm[None].float() if isinstance(lm, torch.Tensor) and lm.shape[0] == 68 else None
        sr_steps = min(cfg.invert_controller_iters, steps)
        if steps and not self._noted_terms:
            self._noted_terms = True
            self._note_missing_terms()
        t0 = time.perf_counter()
        clip_at = "config" if opts["clip"] else None
        with torch.enable_grad():
            w, kb, losses = invert(model, img, cam, motion, lm, steps=steps, sr_steps=sr_steps,
                                   clip=clip_at, clamp=opts["clamp"])
            if space == "w+" and cfg.wplus_steps:
                w, kb2, more = invert(model, img, cam, motion, lm, steps=cfg.wplus_steps,
                                      sr_steps=min(sr_steps, cfg.wplus_steps), space="w+",
                                      w_init=w, clip=clip_at, clamp=opts["clamp"],
                                      intrinsics_init=kb if opts["wplus_keep_intrinsics"]
                                      else None)
                kb, losses = kb2, losses + more
        state = {"w": w, "intrinsics": kb, "camera": cam, "motion": motion, "loss": losses,
                 "inference": opts}
        pti = cfg.pti_steps if pti_steps is None else pti_steps
        if pti:
            from pyface.models.otavatar.model import apply_intrinsics

            with torch.enable_grad():
                with torch.no_grad():
                    ws = w + model.controller(motion)
                    if opts["clamp"]:
                        ws = model._clamp(ws)
                prefix = "generator."
                names = [n[len(prefix):] for n in self.compiled_modules if n.startswith(prefix)]
                G, pl = pivotal_tuning(model, ws, apply_intrinsics(cam, kb), img, steps=pti,
                                       compile=self.compile_options, compile_names=names,
                                       lr=cfg.pti_lr, stop=cfg.pti_stop, metric=metric,
                                       metric_stop=cfg.pti_stop_metric,
                                       mode=opts["pti_mode"])
            state["generator"], state["pti_loss"] = G, pl
            state["pti_rule"] = "metric" if metric is not None else "smooth_l1"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        state["seconds"] = time.perf_counter() - t0
        return state

    def _note_missing_terms(self) -> None:
        """One log line: the inversion's loss terms that run without their weights."""
        missing = self.model.loss.missing_terms()
        if not missing:
            return
        parts = {"vgg": "the VGG19 perceptual term (an image-pyramid L1 replaces it; "
                        "model.vgg_weights is not set)",
                 "arcface": "the ArcFace identity term (model.arcface_weights is not set)"}
        given = {"vgg": "vgg=PATH (pyface convert vgg19)",
                 "arcface": "arcface=PATH (ResNetArcFace-18 .pth)"}
        log.warning("otavatar: the source inversion runs without %s: pass %s (pyface animate "
                    "--weights NAME=PATH, or pyface.models.load(..., weights={NAME: PATH})) to "
                    "use %s (PTI uses neither)",
                    " and without ".join(parts[m] for m in missing),
                    " / ".join(given[m] for m in missing),
                    "it" if len(missing) == 1 else "them")

    def encode_driving(self, driving: dict) -> dict:
        # coefficients (or motion windows) alone drive OTAvatar: an image is optional
        driving = self.prepare(driving, batched=True, name="driving", image=False)
        win = self.model.controller.cfg.window
        if isinstance(driving.get("motion"), torch.Tensor):
            m = driving["motion"].float().to(self.device)
            if m.dim() != 3 or m.shape[1:] != (70, win):
                raise ValueError(f"driving['motion']: expected shape (T, 70, {win}), got "
                                 f"{tuple(m.shape)}")
            self.check_finite(m, "driving['motion']")   # as the labels: no frames of NaN
        elif isinstance(driving.get("coeffs"), torch.Tensor):
            c = driving["coeffs"]
            if c.dim() != 2 or c.shape[1] != 257:
                raise ValueError(f"driving['coeffs']: expected shape (T, 257), got "
                                 f"{tuple(c.shape)}")
            m = self._window(c)
        else:
            self.check_labels(driving={})        # neither tensor: the same message
        out = {"motion": m}
        cam = driving.get("camera")
        if isinstance(cam, torch.Tensor):
            if cam.shape != (m.shape[0], 25):
                raise ValueError(f"driving['camera']: expected shape ({m.shape[0]}, 25), got "
                                 f"{tuple(cam.shape)}")
            out["camera"] = cam.float().to(self.device)
        return out

    def default_motion(self, frames: int) -> dict:
        """No driving frames: the source's own window along the free-view orbit, one turn over
        the ``frames`` frames."""
        return {"orbit": torch.arange(frames), "orbit_length": int(frames)}

    def locate(self, motion, start: int, total: int):
        """Frames ``start ..`` of a ``total``-frame stream: ``camera="orbit"`` renders them at
        their place on one orbit over the ``total`` frames (:func:`locate_frames`)."""
        return locate_frames(motion, start, total) if isinstance(motion, dict) else motion

    @torch.no_grad()
    def generate(self, state: dict, motion: dict, *, camera: str | None = None) -> torch.Tensor:
        from pyface.models.otavatar.model import apply_intrinsics

        model = self.model
        self.check_state(state, ("w", "intrinsics", "camera", "motion"), device=True)
        self.check_state(motion, ("orbit",) if isinstance(motion, dict) and "orbit" in motion
                         else ("motion",), what="motion", stage="encode_driving")
        if "orbit" in motion:
            if camera not in (None, "orbit"):
                raise ValueError(f"camera: default_motion's frames follow the orbit (camera None "
                                 f"or 'orbit'), got {camera!r}")
            idx = motion["orbit"]
            T = int(idx.shape[0])
            m = state["motion"].expand(T, -1, -1)
            camera = "orbit"
        else:
            m = motion["motion"]
            T = m.shape[0]
            if not model.cfg.drive_pose:            # the driving expression, the source's pose
                m = torch.cat([m[:, :64], state["motion"][:, 64:].expand(T, -1, -1)], 1)
        if camera is None:
            camera = "driving" if "camera" in motion else "source"
        check_choice("camera", camera, CAMERA_MODES)
        if camera == "driving":
            if "camera" not in motion:
                raise ValueError("camera='driving': the driving frames have no 'camera'")
            cam = motion["camera"]
        elif camera == "source":
            cam = state["camera"].expand(T, -1)
        else:
            cam = orbit_cameras(model.generator, motion, T).to(self.device)
        cam = apply_intrinsics(cam.float(), state["intrinsics"].expand(T, -1))
        w = state["w"].expand(T, -1, -1)
        ws = w + model.controller(m)
        G = state.get("generator") or model.generator       # the PTI copy when tuned
        planes = G.backbone.planes(ws, noise_mode="const")
        # sr_noise_mode random: its noise drawn here, as the module would (out of --compile)
        out = G.synthesis(ws, cam, planes=planes, **fixed_samples(G, T, self.device),
                          sr_noise=G.draw_sr_noise(T, torch.empty(0, device=planes.device)))
        return out["image"].clamp(-1, 1)


def orbit_cameras(G, motion: dict, T: int) -> torch.Tensor:
    """``(T, 25)`` labels of ``generate(camera="orbit")`` for the ``T`` frames of ``motion``:
    the free-view orbit (:func:`pyface.face.cameras.free_view_orbit`, at generator ``G``'s
    camera radius and pivot), one turn over the animation, each frame at its place: the
    indices and length :meth:`OTAvatarPipeline.locate` adds (``stream``), else
    ``default_motion``'s ``orbit`` / ``orbit_length`` (without a length: 48 frames, or ``T``
    when more), else frames ``0 .. T - 1`` of a ``T``-frame animation."""
    if "stream_index" in motion or "orbit" not in motion:
        idx, n = frame_place(motion, T)
    else:
        idx = motion["orbit"].long().cpu()
        n = int(motion["orbit_length"]) if "orbit_length" in motion else max(48, T)
    labels = free_view_orbit(max(n, 1), generator=G)
    return labels[idx % labels.shape[0]]


def drawn_samples(G, like: torch.Tensor, sr: bool = True) -> dict[str, torch.Tensor]:
    """The random ray samples generator ``G``'s renderer would draw itself for one render
    (:func:`pyface.nn.render.renderer_uniforms`: torch's generator, the same numbers in the same
    order), then, for a render with super-resolution (``sr``) of a generator with
    ``sr_noise_mode: random``, its noise (``sr_noise``), as ``G.synthesis`` keywords. The
    inversion and PTI draw them before each render so that modules compiled with
    ``torch.compile`` use them too (Inductor would draw other numbers with its own generator);
    uncompiled results do not change."""
    r = G.resolve_resolution(None)
    kw = renderer_uniforms(G.cfg.render, 1, r * r, like)
    if sr:
        feat = torch.float64 if like.dtype == torch.float64 else torch.float32
        noise = G.draw_sr_noise(1, torch.empty(0, device=like.device, dtype=feat))
        if noise is not None:
            kw["sr_noise"] = noise
    return kw


def fixed_samples(G, n: int, device) -> dict[str, torch.Tensor]:
    """Mid-interval stratified samples and evenly spaced importance uniforms for ``n`` views of
    generator ``G`` (no frame-to-frame sampling noise at inference)."""
    r = G.resolve_resolution(None)
    rc = G.cfg.render
    out = {"stratified_noise": torch.full((n, r * r, rc.depth_resolution), 0.5, device=device)}
    k = rc.depth_resolution_importance
    if k:
        u = (torch.arange(k, device=device, dtype=torch.float32) + 0.5) / k
        out["importance_u"] = u.expand(n, r * r, k).contiguous()
    return out
