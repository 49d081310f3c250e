"""EG3D inference: load a generator (converted EG3D pickle or a ``pyface train eg3d`` run),
render seeds along an orbit, project an image into W / W+ (inversion), and the model pipeline.

Reproduces the semantics of NVlabs/eg3d ``gen_videos.py`` / projection (NVIDIA Source Code
License, non-commercial); the code is pyface's own.
"""
from __future__ import annotations

import logging
import numbers
import os

import torch
import torch.nn.functional as F

from pyface import checkpoint as ckpt
from pyface.face import cameras as cams
from pyface.nn.render import ray_uniforms, renderer_uniforms
from pyface.nn.resample import filtered_resize

from pyface.models.eg3d.convert import (check_option_sample_counts, config_from_dict,
                                        load_converted)
from pyface.models.eg3d.generator import EG3DGenerator

log = logging.getLogger("pyface.models.eg3d")

from pyface.train.model import Pipeline as _PipelineBase
from pyface.train.model import frame_generators, frame_seeds, with_options


def generator_options(options: dict | None) -> dict:
    """EG3D's inference options (``EG3D.inference_options`` keys, ``"generator.X.Y"``) ->
    ``{"X.Y": value}`` relative to the generator config; a key outside ``generator.`` is a
    ValueError naming it."""
    out = {}
    for key, value in (options or {}).items():
        if not isinstance(key, str) or not key.startswith("generator."):
            raise ValueError(f"options: {key!r}: EG3D's inference options are fields of "
                             f"model.generator (generator.KEY)")
        out[key[len("generator."):]] = value
    return out


def load_generator(path: str, *, device="cpu", ema: bool = True,
                   options: dict | None = None) -> EG3DGenerator:
    """A generator from a ``pyface convert eg3d`` folder, a training checkpoint folder or a run
    folder (its latest checkpoint; the EMA generator when ``ema`` and present). Eval mode.

    ``options``: ``{"generator.render.depth_resolution": 96, ...}``, values of
    ``EG3D.inference_options`` (checked and converted by ``pyface.models.check_options``) set
    in the saved generator config before the generator is built."""
    gopts = generator_options(options)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise ckpt.CheckpointError(f"{path}: run folder without checkpoints")
        path = latest
    meta = ckpt.read_meta(path)
    if meta.get("kind") in ("eg3d", "otavatar"):   # otavatar: the generator of its release
        return load_converted(path, device=device, options=gopts)
    if meta.get("kind") != "train" or meta.get("experiment", {}).get("model") != "eg3d":
        from pyface.train.model import WrongModelError

        raise WrongModelError(path, meta, "eg3d", also="a pyface convert otavatar folder (the "
                              "EG3D generator of OTAvatar's release)")
    tensors, meta = ckpt.load_folder(path)
    gcfg = (meta["experiment"].get("model_config") or {}).get("generator") or {}
    if gopts:
        gcfg = with_options(gcfg, gopts)
        log.info("inference options of eg3d: %s", options)
    cfg = config_from_dict(gcfg)
    check_option_sample_counts(cfg, gopts)
    G = EG3DGenerator(cfg)
    prefix = "ema.G" if ema and "G" in meta.get("ema_modules", []) else "model.G"
    ckpt.load_module_state(G, ckpt.sub_state(tensors, prefix), f"{path} ({prefix})")
    return G.to(device).eval()


def render_uniforms_of(G: EG3DGenerator, batch: int, resolution: int, like: torch.Tensor,
                       generators: list | None = None) -> dict:
    """The random numbers ``G.synthesis`` would draw itself for ``batch`` renders of
    ``resolution`` squared rays and their super-resolution, as ``G.synthesis`` keywords: the
    renderer's ray-sample uniforms (:func:`pyface.nn.render.renderer_uniforms`: ``torch.rand``
    from torch's generator, the same numbers in the same order, on ``like``'s device in the
    renderer's dtype), then, with ``sr_noise_mode: random``, the super-resolution's noise
    (``sr_noise``, :meth:`EG3DGenerator.draw_sr_noise`). With ``generators`` (one
    ``torch.Generator`` per render) each render's numbers come from its own generator instead
    (:func:`pyface.nn.render.ray_uniforms`).
    Drawn before the call, they stay out of modules compiled with ``torch.compile``, whose
    Inductor backend would draw other numbers with its own generator. (The renderer draws the
    stratified noise (B, R, depth_resolution), then the importance uniforms
    (B, R, depth_resolution_importance), in float64 for float64 planes, else float32;
    ``tests/test_model_eg3d.py`` checks the images equal those of its own draws.)"""
    if generators is None:
        kw = renderer_uniforms(G.cfg.render, batch, resolution * resolution, like)
    else:
        if len(generators) != batch:
            raise ValueError(f"generators: expected {batch} (one per render), got "
                             f"{len(generators)}")
        kw = ray_uniforms(G.cfg.render, list(generators), resolution * resolution, like)
    feat = torch.float64 if like.dtype == torch.float64 else torch.float32
    noise = G.draw_sr_noise(batch, torch.empty(0, device=like.device, dtype=feat), generators)
    if noise is not None:
        kw["sr_noise"] = noise
    return kw


def seed_latents(seeds, z_dim: int) -> torch.Tensor:
    """EG3D-style per-seed latents: z = N(0, 1) from a generator seeded with the seed -> (S, z)."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> [0, 1, 2, 3, 7]."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--seeds: expected integers, e.g. 0-3 or 0,5,9, got {text!r}") \
                from None
    if not out:
        raise ValueError(f"--seeds: expected e.g. 0-3 or 0,5,9, got {text!r}")
    return out


@torch.no_grad()
def orbit_frames(G: EG3DGenerator, seeds, frames: int = 48, *, truncation_psi: float = 0.7,
                 truncation_cutoff: int | None = 14, yaw_range: float = 0.35,
                 pitch_range: float = 0.15):
    """The frames of :func:`orbit_video` one at a time: maps the seeds and computes their
    tri-planes now, then returns an iterator that renders frame ``t`` (3, H, S*W) in [-1, 1]
    (on the generator's device) when it is asked for, so a caller can time each frame."""
    dev = G.rendering_resolution.device
    z = seed_latents(seeds, G.cfg.z_dim).to(dev)
    cond = G.camera(0.0, 0.0).expand(len(seeds), -1)
    ws = G.mapping(z, cond, truncation_psi, truncation_cutoff)
    labels = cams.orbit_labels(frames, yaw_range, pitch_range, radius=G.cfg.avg_camera_radius,
                               pivot=tuple(G.cfg.avg_camera_pivot)).to(dev)
    planes = G.backbone.planes(ws, noise_mode="const")
    r = G.resolve_resolution(None)

    def render():
        for t in range(frames):
            with torch.no_grad():
                kw = render_uniforms_of(G, len(seeds), r, planes)
                img = G.synthesis(ws, labels[t:t + 1].expand(len(seeds), -1),
                                  planes=planes, **kw)["image"]
            yield torch.cat(list(img.clamp(-1, 1)), dim=-1)

    return render()


def orbit_video(G: EG3DGenerator, seeds, frames: int = 48, *, truncation_psi: float = 0.7,
                truncation_cutoff: int | None = 14, yaw_range: float = 0.35,
                pitch_range: float = 0.15, progress: bool = True) -> torch.Tensor:
    """Frames (T, 3, H, S*W) in [-1, 1]: the seeds side by side on EG3D's elliptic orbit
    (conditioned on the frontal camera, as EG3D's ``gen_videos.py``)."""
    from tqdm import tqdm

    it = orbit_frames(G, seeds, frames, truncation_psi=truncation_psi,
                      truncation_cutoff=truncation_cutoff, yaw_range=yaw_range,
                      pitch_range=pitch_range)
    return torch.stack(list(tqdm(it, total=frames, disable=not progress, unit="frame"))).cpu()


def project(G: EG3DGenerator, image: torch.Tensor, camera: torch.Tensor, *, space: str = "w",
            steps: int = 300, lr: float = 0.01, perceptual=None, l1_weight: float = 1.0,
            perceptual_weight: float = 1.0, w_avg_samples: int = 1000,
            neural_rendering_resolution: int | None = None, progress: bool = True,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Projects ``image`` (3, H, W) in [-1, 1], seen from ``camera`` (25,), into W (one w
    repeated, ``space="w"``) or W+ (one w per layer, ``"w+"``) of the (EMA) generator ``G``.

    Starts from the mean w (``w_avg_samples`` mapped latents at this camera); minimises
    ``l1_weight * L1 + perceptual_weight * perceptual(image, G(w))`` with Adam. ``perceptual``
    is a :class:`pyface.nn.PerceptualLoss` (or any callable on (1, 3, H, W) pairs) or None
    (L1 only). Returns ``ws`` (1, num_ws, w_dim) and ``{"loss": [...], "image": render,
    "seconds": [...], "compiled_steps": [...]}``: ``seconds`` the wall time of each step (its
    loss read back, so a GPU step has finished), ``compiled_steps`` the (0-based) steps during
    which TorchDynamo compiled a graph (:func:`pyface.train.model.compiled_graphs`: the first
    steps through modules compiled with ``torch.compile``; none without compilation).
    """
    import time

    from tqdm import tqdm

    from pyface.train.model import compiled_graphs

    if space not in ("w", "w+"):
        raise ValueError(f"space: expected 'w' or 'w+', got {space!r}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected (3, H, W) in [-1, 1], got {tuple(image.shape)}")
    if camera.shape != (25,):
        raise ValueError(f"camera: expected an EG3D label (25,), got {tuple(camera.shape)}")
    dev = G.rendering_resolution.device
    G.requires_grad_(False)
    R = G.cfg.img_resolution
    target = filtered_resize(image[None].float().to(dev), R)
    c = camera[None].float().to(dev)
    with torch.no_grad():
        z = torch.randn(w_avg_samples, G.cfg.z_dim, generator=generator).to(dev)
        w_mean = G.mapping(z, c.expand(w_avg_samples, -1))[:, :1].mean(0, keepdim=True)
    n = G.num_ws
    w = (w_mean if space == "w" else w_mean.repeat(1, n, 1)).clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr, betas=(0.9, 0.999))
    losses, seconds, compiled_steps = [], [], []
    r = G.resolve_resolution(neural_rendering_resolution)
    bar = tqdm(range(steps), disable=not progress, unit="step", desc=f"invert ({space})")
    for step in bar:
        graphs, t0 = compiled_graphs(), time.perf_counter()
        ws = w.expand(1, n, -1) if space == "w" else w
        # the renderer's ray samples, drawn as it would draw them (outside its compiled graph)
        out = G.synthesis(ws, c, neural_rendering_resolution=neural_rendering_resolution,
                          **render_uniforms_of(G, 1, r, w))
        loss = l1_weight * F.l1_loss(out["image"], target)
        if perceptual is not None:
            loss = loss + perceptual_weight * perceptual(out["image"], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        seconds.append(time.perf_counter() - t0)
        if compiled_graphs() != graphs:
            compiled_steps.append(step)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    ws = (w.expand(1, n, -1) if space == "w" else w).detach()
    with torch.no_grad():
        img = G.synthesis(ws, c, neural_rendering_resolution=neural_rendering_resolution,
                          **render_uniforms_of(G, 1, r, w))["image"]
    return ws, {"loss": losses, "image": img, "seconds": seconds,
                "compiled_steps": compiled_steps}


class EG3DPipeline(_PipelineBase):
    """EG3D as a portrait pipeline: the source is projected into W+ of the generator
    (``encode_source``: ``image`` (3, H, W) and ``camera`` (25,)); driving frames give cameras
    (``camera`` (T, 25)); ``generate`` renders the source's latent from those cameras ->
    (T, 3, R, R) in [-1, 1]. Options of ``encode_source``: ``steps`` (default: the constructor's
    ``invert_steps``, 300), ``space`` ("w" / "w+"); ``generate`` takes no controls (a misspelt
    one is a TypeError). Its ray samples are random, as EG3D's: seed ``torch`` for repeatable
    frames; with a seed (``animate`` / ``stream`` ``seed=N``, ``pyface animate --seed``) frame
    ``i``'s samples come from a generator of ``(N, i)`` alone (:meth:`seed_frames`), so the
    frames do not depend on the chunking."""

    #: compiled by :meth:`compile` (names relative to the generator): the tri-plane synthesis
    #: network, the renderer (the decoder runs inside its fused op) and the super-resolution
    compile_modules = ("backbone.synthesis", "renderer", "superresolution")

    def __init__(self, model, *, device=None, perceptual=None, invert_steps: int = 300):
        G = model.G if hasattr(model, "G") else model
        self.resolution = int(G.cfg.img_resolution)
        super().__init__(G, device=device)
        self.G = self.model
        self.perceptual, self.invert_steps = perceptual, invert_steps

    @classmethod
    def check_labels(cls, source=None, driving=None) -> None:
        """The source needs its ``camera`` (inversion), driving frames theirs (rendering)."""
        if source is not None and "camera" not in source:
            raise KeyError("source['camera'] missing: EG3D inversion needs the image's EG3D "
                           "camera label (25,)")
        if driving is not None and "camera" not in driving:
            raise ValueError("driving['camera']: expected (T, 25) EG3D labels, got None")

    @classmethod
    def from_checkpoint(cls, path: str, *, device=None, ema: bool = True,
                        options: dict | None = None, **kw):
        """The pipeline of a converted folder, run or checkpoint (:func:`load_generator`;
        ``options``: ``EG3D.inference_options`` values set on its generator config)."""
        return cls(load_generator(path, device="cpu", ema=ema, options=options),
                   device=device, **kw)

    def encode_source(self, source: dict, *, space: str = "w+", steps: int | None = None
                      ) -> dict:
        source = self.prepare(source, batched=False)
        self.check_labels(source=source)
        steps = self.invert_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"steps: expected an int >= 0 (inversion steps), got {steps!r}")
        with torch.enable_grad():            # inversion optimises W even under animate's no_grad
            ws, info = project(self.G, source["image"], source["camera"], space=space,
                               steps=steps,
                               perceptual=self.perceptual, progress=False)
        return {"ws": ws, "loss": info["loss"]}

    def encode_driving(self, driving: dict) -> dict:
        # cameras alone drive EG3D: an image is optional (checked and resized when given)
        driving = self.prepare(driving, batched=True, name="driving", image=False)
        self.check_labels(driving=driving)
        cam = driving.get("camera")
        if cam is None or cam.ndim != 2 or cam.shape[1] != 25:
            raise ValueError(f"driving['camera']: expected (T, 25) EG3D labels, got "
                             f"{None if cam is None else tuple(cam.shape)}")
        return {"camera": cam.float().to(self.device)}

    def seed_frames(self, motion, seed: int | None, start: int):
        """``frame_seeds`` of the frames (:func:`pyface.train.model.frame_seeds`): ``generate``
        draws each frame's ray samples from its own generator."""
        return frame_seeds(motion, seed, start) if isinstance(motion, dict) else motion

    @torch.no_grad()
    def generate(self, state: dict, motion: dict) -> torch.Tensor:
        self.check_state(state, ("ws",))
        self.check_state(motion, ("camera",), what="motion", stage="encode_driving")
        cam = motion["camera"]
        ws = state["ws"].to(self.device)
        planes = self.G.backbone.planes(ws, noise_mode="const")
        gens = frame_generators(motion, planes.device)
        r = self.G.resolve_resolution(None)
        out = []
        for t in range(cam.shape[0]):
            # unseeded: torch's generator, drawn here (outside a compiled renderer)
            kw = render_uniforms_of(self.G, 1, r, planes,
                                    None if gens is None else [gens[t]])
            out.append(self.G.synthesis(ws, cam[t:t + 1], planes=planes, **kw)["image"][0])
        return torch.stack(out).clamp(-1, 1)
