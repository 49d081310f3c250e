# Provenance: reads the weight-file layout (not code) of GOHA's released stage-2 checkpoint
# (NVlabs/GOHA, commit 38e15ed, NVIDIA Source Code License, non-commercial: the module names of
# src/models/model_s2.py, src/models/networks.py and src/GFPGAN/GFPUpsampler.py, the
# checkpoint dict written by src/training_files/train_s2.py and the options of
# src/configs/s2.yml). Our own implementation, written from the documented layout; no upstream
# code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""GOHA's released checkpoint (``logs/s3/checkpoint825000.ckpt``) -> pyface names (the
GOHA-specific half of ``pyface convert goha``; :func:`pyface.convert.convert_goha` reads the
file with ``torch.load(weights_only=True)`` and writes the folder).

The release is the ``torch.save`` dict of GOHA's stage-2 trainer: ``iter``,
``model_state_dict`` (``model_s2.Model``) and ``discriminator_dict`` (BasicSR's StyleGAN2
discriminator with a 6-channel first conv). A PyTorch-Lightning style file (``state_dict`` with
``model.`` / ``discriminator.`` prefixes) and DistributedDataParallel ``module.`` prefixes are
accepted too. Model keys (GOHA full size; pyface name on the right)::

    template_net.segformer.encoder.*  (MiT-b0)        -> encoder_canonical.encoder.*
    template_net.decode_head.linear_c.{0..3}.proj.*,
        .linear_fuse.weight (256, 1024, 1, 1)          -> encoder_canonical.decode_head.*
    expr_net.* (same layout)                           -> encoder_expression.*
    id_net.* (stem proj.weight (32, 6, 7, 7))          -> encoder_appearance.*
    embedding2neutral.up_layers.{0,2,4,6,8}.{weight, bias}
        (256->256, 256->128, ConvT 128->128, 128->128, 128->96)  -> embed_canonical.net.*
    embedding2expr.up_layers.*                         -> embed_expression.net.*
    id_upsampler.{up_xy,up_xz,up_zy}.{0,2}.*, {skip_xy,skip_xz,skip_zy}.*
        (ConvT 256->128 (256, 128, 4, 4), Conv 128->32, 1x1 256->32)   -> upsampler.*
    decoder.net.{0,2}.{weight, bias} ((64, 32), (33, 64))               -> decoder.net.*
    neural_layers.gfpgan.* (GFPGANv1Clean, GFPGANv1.3 layout)           -> sr.*
    discriminator_dict: conv_body.* / final_conv.* / final_linear.*     -> discriminator.*

Keys without a pyface counterpart (:data:`DROPPED`) are listed in the folder's meta and in a
note. The released ``IDUpsampler`` uses the xy up-branch for all three planes, so the folder's
config sets ``share_upsampler_weights=True``. GOHA's inference lifts the appearance planes
from the canonical + the driving frame's expression planes for every frame and runs its SR
with fresh noise maps, so the config sets ``infer_lift_expression="driving"`` and
``sr_noise="random"`` (:data:`~pyface.models.goha.config.GOHA_INFERENCE`).
"""
from __future__ import annotations

import torch

from pyface.checkpoint import CheckpointError, check_state_dict
from pyface.models.goha.config import GOHA_INFERENCE

__all__ = ["DROPPED", "GOHAConversionError", "PREFIXES", "release_config", "release_entries",
           "release_to_pyface"]

#: GOHA module prefix -> pyface prefix (``segformer.`` of the HF encoders is dropped)
PREFIXES = (
    ("template_net.segformer.", "encoder_canonical."),
    ("template_net.decode_head.", "encoder_canonical.decode_head."),
    ("expr_net.segformer.", "encoder_expression."),
    ("expr_net.decode_head.", "encoder_expression.decode_head."),
    ("id_net.segformer.", "encoder_appearance."),
    ("id_net.decode_head.", "encoder_appearance.decode_head."),
    ("embedding2neutral.up_layers.", "embed_canonical.net."),
    ("embedding2expr.up_layers.", "embed_expression.net."),
    ("id_upsampler.", "upsampler."),
    ("decoder.", "decoder."),
    ("neural_layers.gfpgan.", "sr."),
)

#: GOHA keys (prefixes, or exact buffer names) pyface does not hold, and why
DROPPED = {
    "expr_upsampler.": "an IDUpsampler(96, 32) that model_s2's forward never calls",
    "face_parsing_net.": "the frozen BiSeNet face parser (face-parsing.PyTorch 79999_iter.pth): "
                         "pyface's GOHA takes its region masks from the morphable model, or "
                         "pyface.nn.FaceParser (`pyface convert face-parser`)",
    "exp_loss_fn.": "the Deep3DFaceRecon helper: pyface takes 3DMM coefficients as inputs",
    "cano_exemplar": "the exemplar image whose Deep3D pose frames the expression "
                     "pseudo-render: pyface's model.exemplar_angles / exemplar_trans",
    "cano_pose": "a canonical EG3D camera model_s2's forward does not use",
    "uv": "the texel grid of the cdist lift: points_to_triplane(align_corners=True) builds it",
    "image_mean": "ImageNet statistics (constants in pyface.models.goha.networks)",
    "image_std": "ImageNet statistics (constants in pyface.models.goha.networks)",
}

#: MiT sizes the converter recognises from the encoder's patch embeddings
_ENCODERS = {"b0": ([32, 64, 160, 256], [2, 2, 2, 2]),
             "tiny": ([16, 32, 32, 32], [1, 1, 1, 1])}


class GOHAConversionError(CheckpointError):
    """The file is not GOHA's release layout; the message names the key."""


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def release_entries(raw, where: str) -> tuple[dict, dict | None]:
    """The loaded release -> ``(model state, discriminator state or None)``, ``module.``
    prefixes stripped."""
    if not isinstance(raw, dict):
        raise GOHAConversionError(f"{where}: expected GOHA's checkpoint dict "
                                  f"(model_state_dict, discriminator_dict), got "
                                  f"{type(raw).__name__}")
    if isinstance(raw.get("model_state_dict"), dict):
        model, disc = raw["model_state_dict"], raw.get("discriminator_dict")
    elif isinstance(raw.get("state_dict"), dict):          # Lightning-style
        sd = _strip(raw["state_dict"], "module.")
        model = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        disc = {k[len("discriminator."):]: v for k, v in sd.items()
                if k.startswith("discriminator.")} or None
        if not model:
            model = {k: v for k, v in sd.items() if not k.startswith("discriminator.")}
    else:
        raise GOHAConversionError(f"{where}: no 'model_state_dict' (GOHA's train_s2 checkpoint) "
                                  f"or 'state_dict' entry; entries: {sorted(map(str, raw))[:8]}")
    for name, sd in (("model_state_dict", model), ("discriminator_dict", disc or {})):
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise GOHAConversionError(f"{where}: {name}[{bad[0]!r}] is not a tensor")
    return _strip(model, "module."), (_strip(disc, "module.") if disc else None)


def _need(state: dict, key: str, where: str, ndim: int) -> torch.Tensor:
    v = state.get(key)
    if v is None or v.ndim != ndim:
        raise GOHAConversionError(f"{where}: {key!r} " + ("is missing" if v is None else
                                  f"has shape {tuple(v.shape)}, expected {ndim} dimensions")
                                  + " (not GOHA's model_s2 layout)")
    return v


def release_config(model: dict, disc: dict | None, where: str, *,
                   render_resolution: int = 224) -> dict:
    """The ``model.*`` config of a release (GOHA's s2: R 512, MiT-b0, ...), read from its
    shapes; ``render_resolution`` is not stored in the weights (s2.yml: 224)."""
    from pyface.nn.gfpgan import gfpgan_config_from_state, gfpgan_discriminator_config_from_state

    hidden, depths = [], []
    i = 0
    while f"template_net.segformer.encoder.patch_embeddings.{i}.proj.weight" in model:
        hidden.append(int(model[f"template_net.segformer.encoder.patch_embeddings.{i}"
                                ".proj.weight"].shape[0]))
        depths.append(len({k.split(".")[5] for k in model
                           if k.startswith(f"template_net.segformer.encoder.block.{i}.")}))
        i += 1
    encoder = next((n for n, (h, d) in _ENCODERS.items() if h == hidden and d == depths), None)
    if encoder is None:
        raise GOHAConversionError(f"{where}: template_net is a MiT with widths {hidden} and "
                                  f"depths {depths}; expected MiT-b0 ({_ENCODERS['b0']})")
    fuse = _need(model, "template_net.decode_head.linear_fuse.weight", where, 4)
    dec0 = _need(model, "decoder.net.0.weight", where, 2)
    dec2 = _need(model, "decoder.net.2.weight", where, 2)
    emb = _need(model, "embedding2neutral.up_layers.2.weight", where, 4)
    sr_state = {k[len("neural_layers.gfpgan."):]: v for k, v in model.items()
                if k.startswith("neural_layers.gfpgan.")}
    if not sr_state:
        raise GOHAConversionError(f"{where}: no 'neural_layers.gfpgan.*' keys (the stage-2 "
                                  "super-resolution); is this a stage-1 checkpoint?")
    sr = gfpgan_config_from_state(sr_state, f"{where} (neural_layers.gfpgan)")
    cfg = {"resolution": sr.out_size, "encoder": encoder, "encoder_width": int(fuse.shape[0]),
           "plane_channels": int(dec0.shape[1]), "embed_width": int(emb.shape[0]),
           "decoder_hidden": int(dec0.shape[0]), "decoder_features": int(dec2.shape[0]) - 1,
           "share_upsampler_weights": True, "render_resolution": int(render_resolution),
           **GOHA_INFERENCE,
           "sr_narrow": float(sr.narrow), "sr_style_features": int(sr.num_style_feat)}
    if disc:
        d = gfpgan_discriminator_config_from_state(disc, f"{where} (discriminator_dict)")
        if d.in_channels != 6 or d.out_size != sr.out_size:
            raise GOHAConversionError(f"{where}: discriminator_dict takes {d.in_channels} "
                                      f"channels at {d.out_size}; GOHA's dual D takes 6 at "
                                      f"{sr.out_size}")
        cfg["disc_narrow"] = float(d.narrow)
    return cfg


def release_to_pyface(model: dict, disc: dict | None, where: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """GOHA names -> pyface names. Returns ``(state, dropped)``: ``dropped`` maps each
    :data:`DROPPED` entry to the keys it covered. Unknown keys raise naming them."""
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {}
    unknown = []
    for k, v in model.items():
        for src, dst in PREFIXES:
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            why = next((p for p in DROPPED if k == p or (p.endswith(".") and k.startswith(p))),
                       None)
            if why is None:
                unknown.append(k)
            else:
                dropped.setdefault(why, []).append(k)
    if unknown:
        raise GOHAConversionError(f"{where}: keys of no known GOHA module: {unknown[:6]}"
                                  + (f" ... ({len(unknown)} in all)" if len(unknown) > 6 else ""))
    for k, v in (disc or {}).items():
        out["discriminator." + k] = v
    return out, dropped


def check_against_model(state: dict, config: dict, where: str, *, fill_discriminator: bool):
    """Checks ``state`` key by key against :class:`GOHASR` built from ``config`` (on the meta
    device, nothing allocated). With ``fill_discriminator`` missing ``discriminator.*`` keys are
    taken from a freshly initialised model (inference does not use the D). Returns ``state``."""
    from pyface.models.goha.config import GOHAConfig
    from pyface.models.goha.stages import GOHASR
    from pyface.train.model import config_from_dict

    cfg = config_from_dict(GOHAConfig, config)
    if fill_discriminator:
        torch.manual_seed(0)
        fresh = GOHASR(cfg).discriminator.state_dict()
        state = {**state, **{"discriminator." + k: v for k, v in fresh.items()}}
    with torch.device("meta"):
        model = GOHASR(cfg)
    try:
        check_state_dict(model, state, f"{where} (GOHA s2 as pyface's GOHASR)")
    except CheckpointError as exc:
        raise GOHAConversionError(str(exc)) from None
    return state
