"""The example model: a small tri-plane autoencoder.

image (B, 3, R, R) -> conv encoder -> tri-plane (B, 3, C, P, P) -> orthographic volume rendering
through :func:`pyface.ops.triplane_sample` -> image (B, 3, R, R), trained with an L1 loss. It
exercises the whole engine (and the fused tri-plane op) on CPU in minutes; rendering the planes
from a rotated camera gives the preview orbit clips. :class:`ExamplePipeline` is its inference
pipeline (``pyface.models.load("example", run)``, ``pyface animate example``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyface.ops import triplane_sample
from pyface.train.model import Phase, Pipeline, StepContext, TrainableModel


@dataclass
class TriplaneAEConfig:
    resolution: int = 32          # R: image size (must equal data.resolution)
    plane_resolution: int = 16    # P: R / P must be a power of two
    plane_channels: int = 16      # C
    encoder_channels: int = 32
    hidden: int = 32              # decoder MLP width
    depth_samples: int = 8        # samples per ray through the unit cube
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    plane_reg: float = 1e-4       # L2 on the plane features


def _yaw_matrix(yaw: torch.Tensor) -> torch.Tensor:
    """(B,) radians -> (B, 3, 3) rotations about the y axis."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    z, o = torch.zeros_like(yaw), torch.ones_like(yaw)
    return torch.stack([c, z, s, z, o, z, -s, z, c], -1).view(-1, 3, 3)


def camera_yaw(camera: torch.Tensor) -> torch.Tensor:
    """camera: (..., 25) EG3D labels -> (...,) yaw of the camera position in radians."""
    from pyface.face.cameras import camera_yaw_pitch

    return camera_yaw_pitch(camera[..., :16].reshape(*camera.shape[:-1], 4, 4))[0]


class ExamplePipeline(Pipeline):
    """Inference with the example model.

    * ``encode_source``: the source's tri-plane ``planes (1, 3, C, P, P)`` and its camera yaw
      (0 without a camera);
    * ``encode_driving``: ``yaw (T,)`` of each driving camera (0 without cameras);
    * ``generate``: renders the source planes at each driving yaw relative to the source's
      (``controls``: ``yaw_scale`` multiplies it); ``reconstruct`` renders the source's own view;
    * ``default_motion(T)``: a +-35 degree orbit when there is no driving video.
    """

    driving_camera = True           # the driving cameras' yaw sets the view (--camera)
    #: nothing to compile: a frame is the fused tri-plane op and a two-layer MLP (an
    #: ``nn.Sequential``, which ``Module.compile`` does not trace); ``compile()`` returns []
    compile_modules = ()

    def encode_source(self, source: dict) -> dict:
        src = self.prepare(source, batched=False)
        yaw = camera_yaw(src["camera"]) if "camera" in src else torch.zeros((), device=self.device)
        return {"planes": self.model.encode(src["image"][None]), "yaw": yaw.reshape(())}

    def encode_driving(self, driving: dict) -> dict:
        drv = self.prepare(driving, batched=True, name="driving")
        T = drv["image"].shape[0]
        yaw = camera_yaw(drv["camera"]) if "camera" in drv else torch.zeros(T, device=self.device)
        return {"yaw": yaw, "relative": True}

    def default_motion(self, frames: int) -> dict:
        t = torch.arange(frames, device=self.device, dtype=torch.float32)
        return {"yaw": math.radians(35) * torch.sin(2 * math.pi * t / max(frames, 1)),
                "relative": False}

    def generate(self, state: dict, motion: dict, yaw_scale: float = 1.0) -> torch.Tensor:
        self.check_state(state, ("planes", "yaw"), device=True)
        self.check_state(motion, ("yaw",), what="motion", stage="encode_driving")
        yaw = motion["yaw"] - state["yaw"] if motion.get("relative", True) else motion["yaw"]
        planes = state["planes"].expand(yaw.shape[0], -1, -1, -1, -1)
        return self.model.render(planes, yaw * yaw_scale)


class TriplaneAutoencoder(TrainableModel):
    """Tri-plane autoencoder (see the module docstring). ``forward(image) -> (recon, planes)``."""

    Config = TriplaneAEConfig
    Pipeline = ExamplePipeline
    #: train.compile: the whole forward (encoder, sampling, decoder and compositing in one
    #: graph; the encoder and decoder alone are nn.Sequential of torch.nn layers, which
    #: TorchDynamo does not trace when compiled on their own)
    compile_modules = ("",)
    recipe = {"data": {"resolution": 32},
              "train": {"steps": 600, "batch_size": 8, "ckpt_every": 200, "image_every": 200,
                        "lr_schedule": {"kind": "cosine", "warmup_steps": 20,
                                        "min_factor": 0.1},
                        "ema": {"modules": ["encoder", "decoder"], "decay": 0.99}}}
    #: ``tiny``: smaller planes and 300 steps (about a minute on 2 CPU cores)
    presets = {"tiny": {"model": {"plane_channels": 8, "encoder_channels": 16, "hidden": 16},
                        "train": {"steps": 300, "ckpt_every": 100, "image_every": 100}}}

    def __init__(self, cfg: TriplaneAEConfig | None = None):
        super().__init__()
        cfg = cfg or TriplaneAEConfig()
        ratio = cfg.resolution // cfg.plane_resolution
        if cfg.resolution % cfg.plane_resolution or ratio & (ratio - 1):
            raise ValueError(f"model.resolution / model.plane_resolution must be a power of two, "
                             f"got {cfg.resolution} / {cfg.plane_resolution}")
        self.cfg = cfg
        ch = cfg.encoder_channels
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1), nn.LeakyReLU(0.2)]
        for _ in range(int(math.log2(ratio))):
            layers += [nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch *= 2
        layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2),
                   nn.Conv2d(ch, 3 * cfg.plane_channels, 1)]
        self.encoder = nn.Sequential(*layers)
        self.decoder = nn.Sequential(nn.Linear(cfg.plane_channels, cfg.hidden), nn.Softplus(),
                                     nn.Linear(cfg.hidden, 4))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, 3, R, R) in [-1, 1] -> planes (B, 3, C, P, P)."""
        B = image.shape[0]
        P, C = self.cfg.plane_resolution, self.cfg.plane_channels
        return self.encoder(image).view(B, 3, C, P, P)

    def render(self, planes: torch.Tensor, yaw: torch.Tensor | None = None) -> torch.Tensor:
        """planes: (B, 3, C, P, P); yaw: (B,) radians or None -> image (B, 3, R, R) in [-1, 1].

        Orthographic rays along -z through the cube [-0.5, 0.5]^3, rotated about y by ``yaw``.
        """
        B = planes.shape[0]
        R, Dn = self.cfg.resolution, self.cfg.depth_samples
        dev, dt = planes.device, planes.dtype
        lin = (torch.arange(R, device=dev, dtype=dt) + 0.5) / R - 0.5
        z = 0.5 - (torch.arange(Dn, device=dev, dtype=dt) + 0.5) / Dn      # front to back
        yy, xx, zz = torch.meshgrid(-lin, lin, z, indexing="ij")            # (R, R, D)
        pts = torch.stack([xx, yy, zz], -1).reshape(1, -1, 3).expand(B, -1, -1)
        if yaw is not None:
            pts = pts @ _yaw_matrix(yaw.to(dt)).transpose(1, 2)
        feats = triplane_sample(planes, pts.contiguous(),                   # (B, R*R*D, C)
                                plane_axes="xy_xz_zy")
        out = self.decoder(feats).view(B, R, R, Dn, 4)
        sigma = F.softplus(out[..., 0] - 1.0) * Dn                           # per unit length
        rgb = torch.sigmoid(out[..., 1:])
        alpha = 1 - torch.exp(-sigma / Dn)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]),
                                         1 - alpha[..., :-1] + 1e-10], -1), -1)
        w = (alpha * trans).unsqueeze(-1)
        color = (w * rgb).sum(-2)                                           # (B, R, R, 3)
        return color.permute(0, 3, 1, 2) * 2 - 1

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        planes = self.encode(image)
        return self.render(planes), planes

    # --- TrainableModel --------------------------------------------------------------------
    def build_optimizers(self):
        return {"main": torch.optim.Adam(self.parameters(), lr=self.cfg.lr,
                                         betas=tuple(self.cfg.betas))}

    def phases(self):
        return [Phase("main", "main")]

    def step(self, phase: str, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        image = batch["image"]
        if image.shape[-1] != self.cfg.resolution or image.shape[-2] != self.cfg.resolution:
            raise ValueError(f"batch['image']: expected (B, 3, {self.cfg.resolution}, "
                             f"{self.cfg.resolution}) to match model.resolution, got "
                             f"{tuple(image.shape)}; set data.resolution = model.resolution")
        recon, planes = self(image)
        l1 = (recon.float() - image.float()).abs().mean()
        reg = planes.float().square().mean()
        return {"loss": l1 + self.cfg.plane_reg * reg, "l1": l1, "plane_l2": reg}

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        image = batch["image"]
        planes = self.encode(image)
        yaw = torch.full((image.shape[0],), math.radians(30), device=image.device)
        return {"input": image, "reconstruction": self.render(planes),
                "yaw +30": self.render(planes, yaw)}

    @torch.no_grad()
    def preview_video(self, batch: dict, frames: int) -> torch.Tensor:
        image = batch["image"][:4]
        planes = self.encode(image)
        clips = []
        for t in range(frames):
            yaw = math.radians(35) * math.sin(2 * math.pi * t / max(frames, 1))
            img = self.render(planes, torch.full((image.shape[0],), yaw, device=image.device))
            clips.append(torch.cat(list(img), dim=-1))                     # (3, R, n*R)
        return torch.stack(clips)
