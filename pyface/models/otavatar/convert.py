# Provenance: reads the weight-file layout (not code) of OTAvatar's released checkpoint
# (theEricMa/OTAvatar, commit c8c484f, CC BY-NC-SA 4.0: the key names of its VideoCodeBook
# controller and of its EG3D TriPlaneGenerator, and the generator options of
# config/otavatar.yaml). Our own implementation, written from the documented layout; no upstream
# code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""OTAvatar's released checkpoint -> pyface names (the OTAvatar-specific half of
``pyface convert otavatar``; :func:`pyface.convert.convert_otavatar` reads the file, checks the
generator with the shared EG3D code and writes the folder).

The release is a ``torch.save`` dict with ``net_Warp`` / ``net_Warp_ema`` (the motion
controller), ``net_G`` / ``net_G_ema`` (the EG3D generator, possibly ``None``), optimizer and
scheduler states and counters. State-dict keys may carry DistributedDataParallel's ``module.``
prefix. Controller keys (full size; pyface name on the right)::

    mapping_3DMM.first.0.{weight (256, 70, 7), bias (256)}          -> first.*
    mapping_3DMM.encoder{i}.1.{weight (256, 256, 3), bias}, i < 3   -> convs.{i}.*
    mapping_Refine.{0,2,4,6,8}.{weight (256, 256), bias (256)}      -> mlp.0.* (one tied Linear,
                                                                       stored five times)
    mapping_Refine.10.{weight (300, 256), bias (300)}               -> out.*
    direction.weight (512, 20)                                      -> codebook.weight

Generator keys are EG3D's (``backbone.*``, ``superresolution.*``, ``decoder.*``), unchanged.
"""
from __future__ import annotations

import re

import torch

from pyface.checkpoint import CheckpointError, check_state_dict, load_weights, sub_state
from pyface.nn.controller import MotionController, MotionControllerConfig

__all__ = ["ENTRIES", "OTAVATAR_RENDERING_KWARGS", "OTAvatarConversionError", "controller_state",
           "load_controller", "release_entries", "strip_module_prefix"]

# (controller, generator) entries of the release, EMA or trained weights
ENTRIES = {True: ("net_Warp_ema", "net_G_ema"), False: ("net_Warp", "net_G")}

# the generator options of OTAvatar's config (config/otavatar.yaml, gen.param.rendering_kwargs);
# the release stores weights only
OTAVATAR_RENDERING_KWARGS = {
    "depth_resolution": 48, "depth_resolution_importance": 48, "ray_start": 2.25,
    "ray_end": 3.3, "box_warp": 1, "avg_camera_radius": 2.7, "avg_camera_pivot": [0, 0, 0.2],
    "image_resolution": 512, "disparity_space_sampling": False, "clamp_mode": "softplus",
    "superresolution_module": "models.superresolution.SuperresolutionHybrid8XDC",
    "c_gen_conditioning_zero": False, "c_scale": 1.0, "superresolution_noise_mode": "none",
    "density_reg": 0.25, "density_reg_p_dist": 0.004, "reg_type": "l1", "decoder_lr_mul": 1.0,
    "sr_antialias": True,
}
OTAVATAR_NEURAL_RENDERING_RESOLUTION = 64

_PREFIX = "module."


class OTAvatarConversionError(CheckpointError):
    """The file is not OTAvatar's release layout, or its tied MLP copies disagree."""


def _few(keys) -> str:
    keys = list(keys)
    return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")


def strip_module_prefix(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Drop DistributedDataParallel's ``module.`` prefix: all keys have it or none does (a mix
    is refused, naming keys of both kinds)."""
    having = [k for k in state if k.startswith(_PREFIX)]
    if not having:
        return dict(state)
    if len(having) != len(state):
        lacking = [k for k in state if not k.startswith(_PREFIX)]
        raise OTAvatarConversionError(
            f"{where}: some keys carry the 'module.' prefix ({_few(having)}) and others do not "
            f"({_few(lacking)}); expected one state dict of one module")
    return {k[len(_PREFIX):]: v for k, v in state.items()}


def release_entries(raw, path: str, ema: bool = True):
    """The release dict -> (controller state, generator state or None, names used), each with
    ``module.`` stripped. ``ema`` selects ``net_Warp_ema`` / ``net_G_ema`` (else the trained
    ``net_Warp`` / ``net_G``)."""
    warp, gen = ENTRIES[ema]
    if not isinstance(raw, dict):
        raise OTAvatarConversionError(f"{path}: expected a dict with {warp!r} (OTAvatar "
                                      f"checkpoint), got {type(raw).__name__}")
    if warp not in raw:
        hint = (" (the trained weights: pass ema=False, --no-ema)"
                if ema and ENTRIES[False][0] in raw else
                " (the EMA weights only: drop ema=False, --no-ema)"
                if not ema and ENTRIES[True][0] in raw else "")
        raise OTAvatarConversionError(f"{path}: expected key {warp!r} (OTAvatar checkpoint), got "
                                      f"keys {_few(sorted(map(str, raw)))}{hint}")
    out = []
    for name in (warp, gen):
        state = raw.get(name)
        if state is None and name == gen:
            out.append(None)
            continue
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise OTAvatarConversionError(f"{path}: {name!r}: expected a state dict of tensors, "
                                          f"got {type(state).__name__}")
        out.append(strip_module_prefix(state, f"{path} ({name})"))
    return out[0], out[1], (warp, gen)


def _indices(state, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted(int(m.group(1)) for k in state if (m := rx.match(k)))


def controller_state(state: dict[str, torch.Tensor], where: str, *, num_ws: int = 14
                     ) -> tuple[MotionControllerConfig, dict[str, torch.Tensor]]:
    """A release controller state (``module.`` already stripped) -> (config, state dict of
    :class:`~pyface.nn.MotionController` with a tied MLP).

    The copies ``mapping_Refine.{0,2,...}`` of the weight-tied Linear must be identical
    (weights and biases, bit for bit); otherwise the file is refused with the keys that differ.
    The config comes from the shapes (coefficients per frame, width, first kernel, layers, MLP
    applications, directions, latent width); ``num_ws`` is the W+ layers of the generator (the
    output Linear has ``(num_ws + 1) * directions`` rows). Dilation (3) and window (27) leave no
    trace in the weights and keep OTAvatar's values."""
    def need(key):
        if key not in state:
            raise OTAvatarConversionError(f"{where}: expected key {key!r} of OTAvatar's "
                                          "controller (VideoCodeBook)")
        return state[key]

    first = need("mapping_3DMM.first.0.weight")
    layers = _indices(state, r"^mapping_3DMM\.encoder(\d+)\.1\.weight$")
    if layers != list(range(len(layers))):
        raise OTAvatarConversionError(f"{where}: mapping_3DMM.encoder* layers {layers}: expected "
                                      "0, 1, ... without gaps")
    linears = _indices(state, r"^mapping_Refine\.(\d+)\.weight$")
    if len(linears) < 2:
        raise OTAvatarConversionError(f"{where}: expected mapping_Refine.{{0,2,...}} (tied MLP) "
                                      f"and an output Linear, found indices {linears}")
    *tied, last = linears
    if tied != list(range(0, 2 * len(tied), 2)) or last != 2 * len(tied):
        raise OTAvatarConversionError(
            f"{where}: mapping_Refine Linear indices {linears}: expected 0, 2, ..., 2n-2 (the "
            "tied MLP, a LeakyReLU between) and 2n (the output)")
    ref = f"mapping_Refine.{tied[0]}"
    for i in tied[1:]:
        for p in ("weight", "bias"):
            a, b = need(f"{ref}.{p}"), need(f"mapping_Refine.{i}.{p}")
            if a.shape != b.shape or not torch.equal(a, b):
                diff = (f"shape {tuple(b.shape)} vs {tuple(a.shape)}" if a.shape != b.shape
                        else f"max |difference| {(a.double() - b.double()).abs().max().item():.3g}")
                raise OTAvatarConversionError(
                    f"{where}: mapping_Refine.{i}.{p} differs from {ref}.{p} ({diff}). OTAvatar's "
                    f"MLP is one weight-tied Linear saved {len(tied)} times under "
                    f"mapping_Refine.{{{','.join(map(str, tied))}}}; copies that disagree mean "
                    "the file is not that model (or is damaged): refusing it")
    basis = need("direction.weight")
    if basis.dim() != 2:
        raise OTAvatarConversionError(f"{where}: direction.weight: expected (w_dim, directions), "
                                      f"got {tuple(basis.shape)}")
    w_dim, n = basis.shape
    out_w = need(f"mapping_Refine.{last}.weight")
    if out_w.shape[0] != (num_ws + 1) * n:
        raise OTAvatarConversionError(
            f"{where}: mapping_Refine.{last}.weight: expected {(num_ws + 1) * n} rows ((num_ws "
            f"{num_ws} + 1 global row) x {n} directions), got {tuple(out_w.shape)} (the "
            "if_plus_scaling variant is not supported)")
    if first.dim() != 3:
        raise OTAvatarConversionError(f"{where}: mapping_3DMM.first.0.weight: expected (C, in, "
                                      f"k), got {tuple(first.shape)}")
    cfg = MotionControllerConfig(
        in_channels=int(first.shape[1]), descriptor=int(first.shape[0]),
        first_kernel=int(first.shape[2]), layers=len(layers), mlp_layers=len(tied), tie_mlp=True,
        num_ws=num_ws, directions=int(n), w_dim=int(w_dim), global_row=True)

    renames = [("mapping_3DMM.first.0.", "first.")]
    renames += [(f"mapping_3DMM.encoder{i}.1.", f"convs.{i}.") for i in layers]
    renames += [(f"{ref}.", "mlp.0."), (f"mapping_Refine.{last}.", "out.")]
    renames += [("direction.", "codebook.")]
    copies = tuple(f"mapping_Refine.{i}." for i in tied[1:])
    mapped, unknown = {}, []
    for k, v in state.items():
        if k.startswith(copies):
            continue
        for old, new in renames:
            if k.startswith(old):
                mapped[new + k[len(old):]] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise OTAvatarConversionError(f"{where}: keys OTAvatar's controller does not have (or "
                                      f"pyface does not reproduce): {_few(unknown)}")
    with torch.device("meta"):
        module = MotionController(cfg)
    check_state_dict(module, mapped, f"{where} (MotionController)")
    return cfg, {k: v.detach().clone().contiguous() for k, v in mapped.items()}


def load_controller(path: str, *, device="cpu") -> MotionController:
    """A ``pyface convert otavatar`` folder -> :class:`~pyface.nn.MotionController` (strict
    load, eval mode)."""
    tensors, meta = load_weights(path, kind="otavatar", device="cpu")
    cfg = (meta.get("config") or {}).get("controller")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: no 'controller' config in meta.json")
    module = MotionController(MotionControllerConfig(**cfg))
    state = sub_state(tensors, "controller")
    check_state_dict(module, state, f"{path} (controller)")
    module.load_state_dict(state, strict=True)
    return module.to(device).eval()
