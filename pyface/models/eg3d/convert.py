"""EG3D network pickles -> :class:`EG3DGenerator` configuration, and loading converted folders.

``pyface convert eg3d PKL OUT`` (``pyface.convert.convert_eg3d``) reads the pickle with the
restricted unpickler and stores the weights with their EG3D names; this module maps EG3D's
``init_kwargs`` / ``rendering_kwargs`` (keys of NVlabs/eg3d ``train.py``; NVIDIA Source Code
License, non-commercial) onto :class:`EG3DGeneratorConfig`. The code is pyface's own.
"""
from __future__ import annotations

import re

import torch

from pyface.checkpoint import CheckpointError, load_module_state, load_weights, sub_state
from pyface.nn.stylegan import SR_CLASS_NAMES, SR_VARIANTS

from pyface.models.eg3d.config import EG3DGeneratorConfig


class EG3DConversionError(CheckpointError):
    """The EG3D network uses an option pyface does not reproduce, or its weights are off."""


def sr_variant_from(class_names: list[str | None], state: dict[str, torch.Tensor]) -> str:
    """EG3D's super-resolution class (from the module record or ``superresolution_module``),
    else inferred from the shapes: block widths and the resolution of block1's noise."""
    for name in class_names:
        if isinstance(name, str):
            tail = name.rsplit(".", 1)[-1]
            if tail in SR_CLASS_NAMES:
                return SR_CLASS_NAMES[tail]
            m = re.search(r"Hybrid(2X|4X|8X|8XDC|Deepfp32)$", tail)
            if m:
                return "hybrid" + m.group(1).lower()
    key0, key1 = "superresolution.block0.conv1.weight", "superresolution.block1.conv1.weight"
    if key0 not in state or key1 not in state:
        raise EG3DConversionError(f"superresolution: expected {key0} and {key1}")
    c0, c1 = state[key0].shape[0], state[key1].shape[0]
    nk = "superresolution.block1.conv1.noise_const"
    r1 = state[nk].shape[-1] if nk in state else None
    for v, (_, (a, _, _), (b, r), _, _, _) in SR_VARIANTS.items():
        if (a, b) == (c0, c1) and (r1 is None or r1 == r) and v != "hybriddeepfp32":
            return v
    raise EG3DConversionError(f"superresolution: block widths ({c0}, {c1}) at {r1}^2 match none "
                              f"of EG3D's modules {sorted(SR_VARIANTS)}")


_RK_UNSUPPORTED = {  # rendering_kwargs value pyface does not reproduce -> reason
    "disparity_space_sampling": (lambda v: bool(v), "disparity-space sampling"),
    "clamp_mode": (lambda v: v not in (None, "softplus"), "clamp modes other than softplus"),
}


def generator_config(backbone_cfg, sr_variant: str | None, decoder_state: dict,
                     init: dict, rk: dict, neural_rendering_resolution: int | None
                     ) -> EG3DGeneratorConfig:
    """EG3D's generator options -> :class:`EG3DGeneratorConfig` (as EG3D reads them: a missing
    ``c_scale`` is 0, ``TriPlaneGenerator.mapping`` multiplies by ``rendering_kwargs.get(
    'c_scale', 0)``)."""
    from pyface.nn.render import RenderConfig

    for k, (bad, what) in _RK_UNSUPPORTED.items():
        if k in rk and bad(rk[k]):
            raise EG3DConversionError(f"rendering_kwargs[{k!r}] = {rk[k]!r}: {what} is not "
                                      "supported by pyface's renderer")
    for k in ("ray_start", "ray_end"):
        if k in rk and not isinstance(rk[k], (int, float)):
            raise EG3DConversionError(f"rendering_kwargs[{k!r}] = {rk[k]!r}: only numeric ray "
                                      "ranges are supported (not EG3D's 'auto' box intersection)")
    m, s = backbone_cfg.mapping, backbone_cfg.synthesis
    hidden, n_feat = decoder_state["net.0.weight"].shape
    out_dim = decoder_state["net.2.weight"].shape[0] - 1
    if n_feat != backbone_cfg.plane_channels:
        raise EG3DConversionError(f"decoder.net.0.weight: expected {backbone_cfg.plane_channels} "
                                  f"input features (plane channels), got {n_feat}")
    r = RenderConfig.ffhq()
    render = RenderConfig(
        depth_resolution=int(rk.get("depth_resolution", r.depth_resolution)),
        depth_resolution_importance=int(rk.get("depth_resolution_importance",
                                               r.depth_resolution_importance)),
        ray_start=float(rk.get("ray_start", r.ray_start)),
        ray_end=float(rk.get("ray_end", r.ray_end)),
        box_warp=float(rk.get("box_warp", r.box_warp)),
        white_back=bool(rk.get("white_back", False)),
        plane_axes="eg3d")
    img_res = init.get("img_resolution")
    if sr_variant is not None:
        out = SR_VARIANTS[sr_variant][2][1]
        if img_res is not None and int(img_res) != out:
            raise EG3DConversionError(f"init_kwargs['img_resolution'] = {img_res} but the "
                                      f"{sr_variant} super-resolution outputs {out}")
        img_res = out
    pivot = rk.get("avg_camera_pivot", [0.0, 0.0, 0.2])
    return EG3DGeneratorConfig(
        z_dim=m.z_dim, c_dim=m.c_dim, w_dim=m.w_dim, mapping_layers=m.num_layers,
        backbone_resolution=s.img_resolution, plane_channels=backbone_cfg.plane_channels,
        channel_base=s.channel_base, channel_max=s.channel_max, use_noise=s.use_noise,
        decoder_hidden=int(hidden), decoder_features=int(out_dim),
        decoder_lr_mul=float(rk.get("decoder_lr_mul", 1.0)),
        img_resolution=int(img_res or 512),
        neural_rendering_resolution=int(neural_rendering_resolution or 64),
        sr_variant=sr_variant, sr_antialias=bool(rk.get("sr_antialias", True)),
        sr_noise_mode=str(rk.get("superresolution_noise_mode", "none")),
        c_scale=float(rk.get("c_scale", 0.0)),
        c_gen_conditioning_zero=bool(rk.get("c_gen_conditioning_zero", False)),
        avg_camera_radius=float(rk.get("avg_camera_radius", 2.7)),
        avg_camera_pivot=[float(x) for x in pivot], render=render)


def config_from_dict(d: dict) -> EG3DGeneratorConfig:
    """A stored generator config (plain dict) -> :class:`EG3DGeneratorConfig`; unknown keys are
    errors naming them."""
    import dataclasses

    from pyface.nn.render import RenderConfig

    names = {f.name for f in dataclasses.fields(EG3DGeneratorConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CheckpointError(f"generator config: unknown keys {unknown}")
    d = dict(d)
    if isinstance(d.get("render"), dict):
        rnames = {f.name for f in dataclasses.fields(RenderConfig)}
        bad = sorted(set(d["render"]) - rnames)
        if bad:
            raise CheckpointError(f"generator config: unknown render keys {bad}")
        d["render"] = RenderConfig(**{"plane_axes": "eg3d", **d["render"]})
    return EG3DGeneratorConfig(**d)


def check_option_sample_counts(cfg: EG3DGeneratorConfig, options: dict | None) -> None:
    """The samples per ray of saved generator config ``cfg`` with inference ``options`` set in
    it (``{"render.depth_resolution": ...}``, keys relative to the generator config): >= 4
    coarse samples with importance samples (:func:`pyface.nn.render.check_sample_counts`),
    checked before the generator is built so that the error names the key that was set:
    ``model.generator.render.depth_resolution_importance`` when only it was given (the saved
    coarse count is what it does not fit), ``...depth_resolution`` otherwise (as
    :class:`EG3DGenerator` names it)."""
    from pyface.nn.render import check_sample_counts

    opts = options or {}
    blame = ("depth_resolution_importance" if "render.depth_resolution_importance" in opts
             and "render.depth_resolution" not in opts else "depth_resolution")
    check_sample_counts(cfg.render, "model.generator.render", blame=blame)


def load_converted(path: str, *, device="cpu", options: dict | None = None):
    """A ``pyface convert eg3d`` folder (or the generator of a ``pyface convert otavatar``
    folder) -> :class:`EG3DGenerator` in eval mode. ``options``: ``{"render.depth_resolution":
    96, ...}``, generator config fields (dotted paths, checked values) replacing the stored
    ones before the generator is built."""
    from pyface.models.eg3d.generator import EG3DGenerator

    tensors, meta = load_weights(path, device="cpu")
    if meta.get("kind") == "otavatar":      # pyface convert otavatar: the generator part
        tensors = sub_state(tensors, "generator")
    elif meta.get("kind") != "eg3d":
        raise CheckpointError(f"checkpoint {path!r} holds {meta.get('kind')!r} weights, expected "
                              "'eg3d' (or 'otavatar', whose generator part is EG3D's)")
    cfg_dict = (meta.get("config") or {}).get("generator")
    if cfg_dict is None:
        raise CheckpointError(f"{path}: converted by an older pyface (no 'generator' config); "
                              "convert the pickle again with pyface convert eg3d")
    if options:
        from pyface.train.model import with_options

        cfg_dict = with_options(cfg_dict, options)
    cfg = config_from_dict(cfg_dict)
    check_option_sample_counts(cfg, options)
    G = EG3DGenerator(cfg)
    state = {k: v for k, v in tensors.items()}
    state["rendering_resolution"] = G.rendering_resolution.clone()
    for name in ("backbone", "decoder", "superresolution"):
        mod = getattr(G, name)
        if mod is not None:
            load_module_state(mod, sub_state(state, name), f"{path} ({name})")
    return G.to(device).eval()
