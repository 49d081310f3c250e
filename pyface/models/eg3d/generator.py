"""EG3D's tri-plane generator assembled from pyface's pieces.

mapping (z, c) -> ws -> StyleGAN2 tri-plane backbone -> planes (B, 3, C, 256, 256) ->
:class:`pyface.nn.TriplaneRenderer` (fused ray marching through the OSG decoder) ->
feature image -> EG3D super-resolution -> image.

Reproduces the semantics of NVIDIA's EG3D ``TriPlaneGenerator`` (NVlabs/eg3d,
``training/triplane.py``; NVIDIA Source Code License, non-commercial). The code is pyface's own;
sub-module and parameter names follow EG3D so that ``pyface convert eg3d`` weights load as they
are (``backbone.*``, ``superresolution.*``, ``decoder.*``).
"""
from __future__ import annotations

import torch
from torch import nn

from pyface.face import cameras as cams
from pyface.nn.render import (OSGDecoder, RenderConfig, TriplaneRenderer, check_sample_counts,
                              query_density)
from pyface.nn.resample import filtered_resize
from pyface.nn.stylegan import (NOISE_MODES, MappingConfig, SuperResolution,
                                SuperResolutionConfig, SynthesisConfig, TriplaneBackbone,
                                TriplaneBackboneConfig)
from pyface.ops.render import ray_bundle
from pyface.train.model import check_choice

from pyface.models.eg3d.config import EG3DGeneratorConfig


class EG3DGenerator(nn.Module):
    """EG3D's generator. Sub-modules: ``backbone`` (mapping + synthesis), ``decoder``,
    ``renderer`` (no weights), ``superresolution`` (None when ``sr_variant`` is None).

    ``forward(z (B, z_dim), c (B, 25))`` -> dict:

    * ``image`` (B, 3, img_resolution, img_resolution) in about [-1, 1],
    * ``image_raw`` (B, 3, r, r), ``feature_image`` (B, decoder_features, r, r),
      ``image_depth`` (B, 1, r, r), ``image_opacity`` (B, 1, r, r) (accumulated ray weights),
      with r the neural rendering resolution,
    * ``planes`` (B, 3, plane_channels, R, R), ``ws`` (B, num_ws, w_dim).

    The buffer ``rendering_resolution`` holds the neural rendering resolution used when a call
    passes None (training schedules update it; EMA copies and checkpoints carry it).
    """

    def __init__(self, cfg: EG3DGeneratorConfig | None = None):
        super().__init__()
        cfg = cfg or EG3DGeneratorConfig()
        if isinstance(cfg.render, dict):
            cfg.render = RenderConfig(**{"plane_axes": "eg3d", **cfg.render})
        check_sample_counts(cfg.render, "model.generator.render")
        self.cfg = cfg
        self.backbone = TriplaneBackbone(TriplaneBackboneConfig(
            mapping=MappingConfig(z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim,
                                  num_layers=cfg.mapping_layers),
            synthesis=SynthesisConfig(w_dim=cfg.w_dim, img_resolution=cfg.backbone_resolution,
                                      img_channels=3 * cfg.plane_channels,
                                      channel_base=cfg.channel_base,
                                      channel_max=cfg.channel_max, use_noise=cfg.use_noise),
            plane_channels=cfg.plane_channels))
        self.num_ws = self.backbone.num_ws
        self.decoder = OSGDecoder(cfg.plane_channels, cfg.decoder_hidden, cfg.decoder_features,
                                  lr_multiplier=cfg.decoder_lr_mul)
        self.renderer = TriplaneRenderer(cfg.render)
        self.superresolution = None
        if cfg.sr_variant is not None:
            self.superresolution = SuperResolution(SuperResolutionConfig(
                variant=cfg.sr_variant, channels=cfg.decoder_features, w_dim=cfg.w_dim,
                antialias=cfg.sr_antialias, noise_mode=cfg.sr_noise_mode,
                conv_clamp=cfg.sr_conv_clamp, input_resolution=cfg.sr_input_resolution,
                block_channels=cfg.sr_block_channels, dtype=cfg.sr_dtype))
            out = self.superresolution.output_resolution
            if out != cfg.img_resolution:
                raise ValueError(f"img_resolution: the {cfg.sr_variant} super-resolution "
                                 f"outputs {out}^2, got img_resolution={cfg.img_resolution}")
        if cfg.decoder_features < 3:
            raise ValueError(f"decoder_features: expected >= 3 (RGB first), got "
                             f"{cfg.decoder_features}")
        self.register_buffer("rendering_resolution",
                             torch.tensor(int(cfg.neural_rendering_resolution)))

    # ---------------------------------------------------------------------------------------
    def _check_c(self, c: torch.Tensor, name: str = "c") -> None:
        if not isinstance(c, torch.Tensor) or c.ndim != 2 or c.shape[1] != 25:
            raise ValueError(f"{name}: expected EG3D camera labels of shape (B, 25), got "
                             f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c)}")

    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> torch.Tensor:
        """z (B, z_dim), c (B, 25) -> ws (B, num_ws, w_dim). The mapping sees ``c * c_scale``,
        or zeros with ``c_gen_conditioning_zero`` (EG3D's ``TriPlaneGenerator.mapping``)."""
        self._check_c(c)
        if z.ndim != 2 or z.shape[1] != self.cfg.z_dim or z.shape[0] != c.shape[0]:
            raise ValueError(f"z: expected shape ({c.shape[0]}, {self.cfg.z_dim}), got "
                             f"{tuple(z.shape)}")
        c = torch.zeros_like(c) if self.cfg.c_gen_conditioning_zero else c * self.cfg.c_scale
        return self.backbone.mapping(z, c if self.cfg.c_dim else None, truncation_psi,
                                     truncation_cutoff, update_emas=update_emas)

    def resolve_resolution(self, neural_rendering_resolution: int | None) -> int:
        r = neural_rendering_resolution
        if r is None:
            return int(self.rendering_resolution)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"neural_rendering_resolution: expected a positive int, got {r!r}")
        return r

    def synthesis(self, ws: torch.Tensor, c: torch.Tensor, *,
                  neural_rendering_resolution: int | None = None, noise_mode: str = "const",
                  stratified_noise: torch.Tensor | None = None,
                  importance_u: torch.Tensor | None = None, planes: torch.Tensor | None = None,
                  sr: bool = True, sr_noise: list | None = None) -> dict[str, torch.Tensor]:
        """ws (B, num_ws, w_dim), c (B, 25) -> images (see the class doc; no ``ws``).

        ``stratified_noise`` (B, r*r, depth_resolution) and ``importance_u``
        (B, r*r, depth_resolution_importance) inject the renderer's uniforms (EG3D draws them
        with torch.rand). ``sr_noise`` injects the super-resolution's noise of
        ``sr_noise_mode: random`` (:meth:`draw_sr_noise`; drawn by the module when None).
        ``planes`` reuses planes of these ws (EG3D's ``use_cached_backbone``). ``sr=False``
        skips the super-resolution (``image`` is then absent).
        """
        self._check_c(c)
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.cfg.w_dim) or \
                ws.shape[0] != c.shape[0]:
            raise ValueError(f"ws: expected shape ({c.shape[0]}, {self.num_ws}, "
                             f"{self.cfg.w_dim}), got {tuple(ws.shape)}")
        check_choice("noise_mode", noise_mode, NOISE_MODES)
        res = self.resolve_resolution(neural_rendering_resolution)
        if planes is None:
            planes = self.backbone.planes(ws, noise_mode=noise_mode)
        origins, dirs = ray_bundle(c.to(planes.dtype), res)
        out = self.renderer(planes, self.decoder, origins, dirs,
                            stratified_noise=stratified_noise, importance_u=importance_u)
        images = out.images(res)
        B = planes.shape[0]
        images["image_opacity"] = out.weights_sum.permute(0, 2, 1).reshape(B, 1, res, res)
        images["planes"] = planes
        if sr:
            if self.superresolution is not None:
                images["image"], alias = self.superresolution(
                    images["image_raw"], images["feature_image"], ws, return_alias=True,
                    noise=sr_noise)
                if alias is not None and self.cfg.sr_image_raw_alias:   # EG3D's in-place add
                    feat = images["feature_image"]
                    images["feature_image"] = torch.cat([alias.to(feat.dtype), feat[:, 3:]], 1)
                    images["image_raw"] = images["feature_image"][:, :3]
            else:
                images["image"] = filtered_resize(images["image_raw"], self.cfg.img_resolution)
        return images

    def draw_sr_noise(self, batch: int, like: torch.Tensor, generators: list | None = None
                      ) -> list[torch.Tensor] | None:
        """The super-resolution noise ``synthesis`` would draw for ``batch`` images after the
        render (:meth:`pyface.nn.stylegan.SuperResolution.draw_noise`; one generator per image
        with ``generators``), for ``synthesis(sr_noise=)``; None when nothing is drawn
        (``sr_noise_mode`` other than ``random``, or no super-resolution)."""
        if self.superresolution is None:
            return None
        return self.superresolution.draw_noise(batch, like, generators)

    def forward(self, z: torch.Tensor, c: torch.Tensor, *, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "const",
                neural_rendering_resolution: int | None = None,
                stratified_noise: torch.Tensor | None = None,
                importance_u: torch.Tensor | None = None, update_emas: bool = False,
                c_render: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """z (B, z_dim), c (B, 25) -> dict of images, ``planes`` and ``ws``. ``c`` conditions the
        mapping and places the camera; ``c_render`` (B, 25), if given, places the camera instead
        (EG3D's training renders at c while the mapping may see a swapped pose)."""
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff, update_emas=update_emas)
        out = self.synthesis(ws, c if c_render is None else c_render,
                             neural_rendering_resolution=neural_rendering_resolution,
                             noise_mode=noise_mode, stratified_noise=stratified_noise,
                             importance_u=importance_u)
        out["ws"] = ws
        return out

    # ---------------------------------------------------------------------------------------
    def density(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Raw density (B, N) at world points (B, N, 3) (EG3D's ``sample_mixed`` sigma)."""
        r = self.cfg.render
        return query_density(planes, self.decoder, points, plane_axes=r.plane_axes,
                             box_size=r.box_warp)

    def camera(self, yaw: torch.Tensor | float = 0.0, pitch: torch.Tensor | float = 0.0,
               focal: float = cams.FFHQ_FOCAL) -> torch.Tensor:
        """EG3D labels (N, 25) on the average orbit (yaw / pitch radians, (N,) or scalars)."""
        dev = self.rendering_resolution.device
        yaw = torch.as_tensor(yaw, dtype=torch.float32, device=dev).reshape(-1)
        pitch = torch.as_tensor(pitch, dtype=torch.float32, device=dev).reshape(-1)
        yaw, pitch = torch.broadcast_tensors(yaw, pitch)
        c2w = cams.orbit_camera(yaw, pitch, radius=self.cfg.avg_camera_radius,
                                pivot=tuple(self.cfg.avg_camera_pivot))
        K = cams.intrinsics_from_focal(focal).to(dev).expand(yaw.shape[0], 3, 3)
        return cams.make_label(c2w.to(dev), K)

    @classmethod
    def from_converted(cls, path: str, *, device="cpu") -> "EG3DGenerator":
        """A folder written by ``pyface convert eg3d`` -> the generator (eval mode)."""
        from pyface.models.eg3d.convert import load_converted

        return load_converted(path, device=device)

