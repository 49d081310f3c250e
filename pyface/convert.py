"""``pyface convert``: third-party weights -> pyface weight folders (safetensors + JSON).

* ``eg3d PKL OUT``      official EG3D network pickle (also OTAvatar's / GOHA's EG3D bases), read
  with :class:`RestrictedUnpickler`: it rebuilds tensors and plain containers, turns EG3D's
  persistent classes into inert records **without executing the source code they embed**, and
  refuses every other global.
* ``vgg19 PTH OUT``     torchvision VGG19 state dict (for :class:`pyface.nn.PerceptualLoss`).
* ``arcface PTH OUT``   insightface IResNet state dict (for :class:`pyface.nn.IdentityLoss`).
* ``gfpgan PTH OUT``    GFPGAN v1 "clean" checkpoint (``params_ema``), structure-checked.
* ``segformer DIR OUT`` HuggingFace-format SegFormer folder.

``.pth`` files are read with ``torch.load(weights_only=True)``; nothing is downloaded.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import sys
from typing import Any

import torch

from pyface.checkpoint import CheckpointError, check_state_dict, load_weights_file, save_weights


class ConversionError(CheckpointError):
    """The input is not what the converter expects; the message names the key and shapes."""


# --------------------------------------------------------------------------------------------
# Restricted unpickling of EG3D network pickles
# --------------------------------------------------------------------------------------------

class ObjectRecord:
    """An object from a pickle, kept as data: its qualified class name and state. Never
    instantiates the original class."""

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        obj.__dict__["_state"] = {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__["_state"] = state if isinstance(state, dict) else {"_value": state}

    def __setattr__(self, name, value):  # BUILD without __setstate__ never reaches here
        self.__dict__["_state"][name] = value

    @property
    def class_name(self) -> str:
        return self._qualname

    @property
    def state(self) -> dict:
        return self.__dict__["_state"]

    def __repr__(self):
        return f"<record of {self._qualname}>"


class DictRecord(dict):
    """A dict subclass from a pickle (e.g. ``dnnlib.util.EasyDict``), kept as a plain dict."""

    _qualname = "?"

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


class PersistentRecord:
    """An EG3D ``persistence`` object: class name and state; ``module_src`` is dropped unread."""

    def __init__(self, meta: dict):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise pickle.UnpicklingError("unsupported persistent object record")
        self.class_name = str(meta.get("class_name"))
        self.state = meta.get("state") or {}
        self.version = meta.get("version")

    def __repr__(self):
        return f"<persistent record of {self.class_name}>"


def _storage_from_bytes(b: bytes):
    """Replacement for ``torch.storage._load_from_bytes``: the bytes are a legacy torch.save of
    a storage, read with ``weights_only=True``."""
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


def _reconstructor(cls, base, state):
    """Safe ``copyreg._reconstructor`` for records only."""
    if isinstance(cls, type) and issubclass(cls, (ObjectRecord, DictRecord)):
        obj = cls.__new__(cls)
        if state is not None and isinstance(obj, DictRecord):
            obj.update(state)
        return obj
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")


_SAFE = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
}
_DTYPES = {n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}
# modules whose classes become inert records (network / config classes in EG3D-style pickles)
_RECORD_MODULES = re.compile(r"^(torch\.nn\.modules\.|training\.|torch_utils\.|dnnlib\.|"
                             r"models\.|networks)")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for EG3D-style network pickles that cannot execute code.

    Allowed: tensors and storages (rebuilt by torch's weights-only loader), plain containers,
    numpy arrays, dtypes; EG3D persistent objects and ``torch.nn`` / ``training.*`` /
    ``dnnlib.*`` classes become :class:`PersistentRecord` / :class:`ObjectRecord` /
    :class:`DictRecord` data (their code is neither imported nor run). Every other global
    raises ``pickle.UnpicklingError`` naming it.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch" and name in _DTYPES:
            return getattr(torch, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
                "_reconstruct", "scalar"):
            import numpy

            return getattr(numpy.core.multiarray if hasattr(numpy, "core") else
                           numpy._core.multiarray, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            import numpy

            return getattr(numpy, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            import numpy.dtypes

            return getattr(numpy.dtypes, name)
        if _RECORD_MODULES.match(module) and name and name[0].isupper():
            base = DictRecord if name in ("EasyDict",) else ObjectRecord
            return type(name, (base,), {"_qualname": f"{module}.{name}"})
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: pyface only rebuilds tensors, plain "
            "containers and network records from pickles (this file may be malicious or not an "
            "EG3D network pickle)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not supported here; for torch.save "
                                     "files use torch.load(weights_only=True)")


def restricted_load(path_or_file) -> Any:
    """Unpickle with :class:`RestrictedUnpickler`."""
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "rb") as f:
            return RestrictedUnpickler(f).load()
    return RestrictedUnpickler(path_or_file).load()


def _record_state(obj) -> dict:
    if isinstance(obj, PersistentRecord):
        return obj.state
    if isinstance(obj, ObjectRecord):
        return obj.state
    raise ConversionError(f"expected a network record, got {type(obj).__name__}")


def module_state_dict(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a record of an ``nn.Module`` (``_parameters``, persistent ``_buffers``,
    ``_modules``) into a state dict."""
    st = _record_state(obj)
    out: dict[str, torch.Tensor] = {}
    skip = set(st.get("_non_persistent_buffers_set") or ())
    for k, v in (st.get("_parameters") or {}).items():
        if v is not None:
            out[prefix + k] = v.detach() if isinstance(v, torch.Tensor) else v
    for k, v in (st.get("_buffers") or {}).items():
        if v is not None and k not in skip:
            out[prefix + k] = v
    for k, v in (st.get("_modules") or {}).items():
        if v is not None:
            out.update(module_state_dict(v, prefix + k + "."))
    for k, v in out.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{k}: expected a tensor in the network record, got "
                                  f"{type(v).__name__}")
    return out


def _plain(v):
    """Records/containers -> JSON-able data (for init kwargs and rendering options)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    try:
        import numpy

        if isinstance(v, numpy.generic):
            return v.item()
    except ImportError:
        pass
    return repr(v)


# --------------------------------------------------------------------------------------------
# EG3D
# --------------------------------------------------------------------------------------------

def _eg3d_configs(state: dict[str, torch.Tensor]):
    from pyface.nn.stylegan import MappingConfig, SynthesisConfig, TriplaneBackboneConfig

    def need(key):
        if key not in state:
            raise ConversionError(f"EG3D state: expected key {key!r} (is this an EG3D "
                                  "TriPlaneGenerator?)")
        return state[key]

    fc = sorted(int(m.group(1)) for k in state
                if (m := re.match(r"backbone\.mapping\.fc(\d+)\.weight$", k)))
    if not fc:
        raise ConversionError("EG3D state: no backbone.mapping.fc*.weight keys")
    w_dim = need(f"backbone.mapping.fc{fc[-1]}.weight").shape[0]
    c_dim = state["backbone.mapping.embed.weight"].shape[1] \
        if "backbone.mapping.embed.weight" in state else 0
    embed = state["backbone.mapping.embed.weight"].shape[0] if c_dim else 0
    z_dim = need("backbone.mapping.fc0.weight").shape[1] - embed
    res = sorted(int(m.group(1)) for k in state
                 if (m := re.match(r"backbone\.synthesis\.b(\d+)\.conv1\.weight$", k)))
    R = res[-1]
    ch = {r: need(f"backbone.synthesis.b{r}.conv1.weight").shape[0] for r in res}
    channel_max = max(ch.values())
    below = [r for r in res if ch[r] < channel_max]
    channel_base = ch[below[0]] * below[0] if below else channel_max * R
    img_channels = need(f"backbone.synthesis.b{R}.torgb.weight").shape[0]
    use_noise = f"backbone.synthesis.b{R}.conv1.noise_strength" in state
    backbone = TriplaneBackboneConfig(
        mapping=MappingConfig(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_layers=len(fc)),
        synthesis=SynthesisConfig(w_dim=w_dim, img_resolution=R, img_channels=img_channels,
                                  channel_base=channel_base, channel_max=channel_max,
                                  use_noise=use_noise),
        plane_channels=img_channels // 3)
    return backbone


def _eg3d_sr_config(state, w_dim, class_names):
    from pyface.models.eg3d.convert import sr_variant_from
    from pyface.nn.stylegan import SuperResolutionConfig

    if "superresolution.block1.conv1.weight" not in state:
        return None
    variant = sr_variant_from(class_names, state)
    cin = state["superresolution.block0.conv0.weight"].shape[1]
    return SuperResolutionConfig(variant=variant, channels=cin, w_dim=w_dim)


def convert_eg3d(pkl: str, out: str, network: str = "G_ema") -> str:
    """EG3D network pickle -> pyface weights folder (kind ``"eg3d"``).

    Keys keep EG3D's layout: ``backbone.*`` (:class:`~pyface.nn.TriplaneBackbone`),
    ``superresolution.*`` (:class:`~pyface.nn.SuperResolution`, every EG3D module: Hybrid2X,
    4X, 8X, 8XDC, Deepfp32) and ``decoder.*`` (the OSG decoder, for the renderer). The config
    holds ``generator`` (``pyface.models.eg3d.EG3DGeneratorConfig``: the rendering options of
    EG3D's ``rendering_kwargs`` - ray range, samples, box_warp, white_back, SR module and noise
    mode, camera pivot and radius, c_scale, c_gen_conditioning_zero - and the network's
    ``neural_rendering_resolution``), the module configs, and EG3D's raw ``rendering_kwargs`` /
    ``init_kwargs``. ``pyface.models.eg3d.EG3DGenerator.from_converted(OUT)`` loads it.
    """
    from pyface.nn.stylegan import SuperResolution, TriplaneBackbone
    from pyface.train.config import to_dict

    try:
        data = restricted_load(pkl)
    except pickle.UnpicklingError as exc:
        raise ConversionError(f"{pkl}: {exc}") from None
    if not isinstance(data, dict) or network not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConversionError(f"{pkl}: expected a dict with {network!r} (EG3D network pickle), "
                              f"got {keys}")
    net = data[network]
    state = module_state_dict(net)
    from pyface.models.eg3d.convert import generator_config

    net_state = _record_state(net)
    init = net_state.get("init_kwargs") or {}
    rk = init.get("rendering_kwargs") or {}
    if not isinstance(rk, dict):
        raise ConversionError(f"{pkl}: init_kwargs['rendering_kwargs'] is "
                              f"{type(rk).__name__}, expected a mapping")
    backbone_cfg = _eg3d_configs(state)
    sr_rec = (net_state.get("_modules") or {}).get("superresolution")
    sr_cfg = _eg3d_sr_config(state, backbone_cfg.mapping.w_dim,
                             [getattr(sr_rec, "class_name", None),
                              getattr(sr_rec, "_qualname", None),
                              rk.get("superresolution_module")])
    if sr_cfg is not None and "sr_antialias" in rk:
        sr_cfg.antialias = bool(rk["sr_antialias"])
    if sr_cfg is not None and "superresolution_noise_mode" in rk:
        sr_cfg.noise_mode = str(rk["superresolution_noise_mode"])
    # check everything against our modules: names and shapes (built on the meta device)
    with torch.device("meta"):
        backbone = TriplaneBackbone(backbone_cfg)
        sr_module = SuperResolution(sr_cfg) if sr_cfg is not None else None
    check_state_dict(backbone, {k[9:]: v for k, v in state.items() if k.startswith("backbone.")},
                     f"{pkl} ({network}.backbone)")
    if sr_cfg is not None:
        check_state_dict(sr_module,
                         {k[16:]: v for k, v in state.items()
                          if k.startswith("superresolution.")},
                         f"{pkl} ({network}.superresolution)")
    known = ("backbone.", "superresolution.", "decoder.")
    other = [k for k in state if not k.startswith(known)]
    if other:
        raise ConversionError(f"{pkl}: unexpected keys {other[:5]} outside backbone / "
                              "superresolution / decoder")
    dec_state = {k[8:]: v for k, v in state.items() if k.startswith("decoder.")}
    if "net.0.weight" not in dec_state or "net.2.weight" not in dec_state:
        raise ConversionError(f"{pkl}: decoder.net.0.weight / decoder.net.2.weight missing")
    nrr = net_state.get("neural_rendering_resolution")
    gen_cfg = generator_config(backbone_cfg, sr_cfg.variant if sr_cfg else None, dec_state,
                               _plain(init), _plain(rk),
                               int(nrr) if isinstance(nrr, (int, float)) else None)
    config = {"generator": to_dict(gen_cfg), "backbone": to_dict(backbone_cfg),
              "superresolution": to_dict(sr_cfg) if sr_cfg else None,
              "rendering_kwargs": _plain(init.get("rendering_kwargs", {})),
              "init_kwargs": _plain({k: v for k, v in init.items() if k != "rendering_kwargs"}),
              "network": network, "class_name": getattr(net, "class_name", None)}
    return save_weights(out, state, kind="eg3d", config=config,
                        extra={"source": os.path.basename(pkl)})


def load_eg3d(path: str, device="cpu"):
    """A converted EG3D folder -> (TriplaneBackbone, SuperResolution or None, OSGDecoder,
    rendering_kwargs). The decoder's sizes come from its weights and its lr multiplier from
    ``rendering_kwargs["decoder_lr_mul"]`` (default 1)."""
    from pyface.checkpoint import load_module_state, load_weights, sub_state
    from pyface.nn.render import OSGDecoder
    from pyface.nn.stylegan import (SuperResolution, SuperResolutionConfig, TriplaneBackbone,
                                    TriplaneBackboneConfig)

    tensors, meta = load_weights(path, kind="eg3d", device=device)
    cfg = meta["config"]
    rk = cfg.get("rendering_kwargs") or {}
    backbone = TriplaneBackbone(TriplaneBackboneConfig(**cfg["backbone"]))
    load_module_state(backbone, sub_state(tensors, "backbone"), f"{path} (backbone)")
    sr = None
    if cfg.get("superresolution"):
        sr = SuperResolution(SuperResolutionConfig(**cfg["superresolution"]))
        load_module_state(sr, sub_state(tensors, "superresolution"), f"{path} (superresolution)")
    dec_state = sub_state(tensors, "decoder")
    if "net.0.weight" not in dec_state or "net.2.weight" not in dec_state:
        raise ConversionError(f"{path}: decoder.net.0.weight / decoder.net.2.weight missing")
    hidden, n_features = dec_state["net.0.weight"].shape
    decoder = OSGDecoder(n_features, hidden, dec_state["net.2.weight"].shape[0] - 1,
                         lr_multiplier=float(rk.get("decoder_lr_mul", 1.0)))
    load_module_state(decoder, dec_state, f"{path} (decoder)")
    return backbone.to(device), (sr.to(device) if sr else None), decoder.to(device), rk


# --------------------------------------------------------------------------------------------
# State-dict converters
# --------------------------------------------------------------------------------------------

def _state_from(path: str) -> dict[str, torch.Tensor]:
    state = load_weights_file(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors")
    # strip DataParallel prefixes
    if all(k.startswith("module.") for k in state):
        state = {k[7:]: v for k, v in state.items()}
    return state


def convert_vgg19(path: str, out: str) -> str:
    """torchvision VGG19 ``.pth`` -> weights folder (``features.*`` only; kind ``"vgg19"``)."""
    from pyface.nn.vgg import VGG19

    state = {k: v for k, v in _state_from(path).items() if k.startswith("features.")}
    check_state_dict(VGG19(), state, f"{path} (torchvision VGG19)")
    return save_weights(out, state, kind="vgg19", extra={"source": os.path.basename(path)})


def convert_arcface(path: str, out: str) -> str:
    """insightface IResNet ``.pth`` -> weights folder (kind ``"arcface"``; arch inferred)."""
    from pyface.nn.arcface import IRESNET_LAYERS, IResNet

    state = _state_from(path)
    depth = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")})
                  for i in range(1, 5))
    arch = next((a for a, d in IRESNET_LAYERS.items() if d == depth), None)
    if arch is None:
        raise ConversionError(f"{path}: blocks per stage {depth} match no IResNet "
                              f"({', '.join(f'{a}: {d}' for a, d in IRESNET_LAYERS.items())})")
    check_state_dict(IResNet(arch), state, f"{path} (insightface IResNet-{arch})")
    return save_weights(out, state, kind="arcface", config={"arch": arch},
                        extra={"source": os.path.basename(path)})


_GFPGAN_REQUIRED = ("conv_body_first.weight", "final_linear.weight",
                    "stylegan_decoder.style_mlp.", "stylegan_decoder.to_rgbs.",
                    "conv_body_down.", "conv_body_up.", "condition_scale.", "condition_shift.",
                    "toRGB.")


def convert_gfpgan(path: str, out: str, key: str = "params_ema") -> str:
    """GFPGANv1-clean checkpoint -> weights folder (kind ``"gfpgan"``), keys unchanged.

    Checks the structure (required key groups, 3-channel input, style width) - pyface has no
    GFPGAN module yet, so the full shape check happens when one loads it."""
    raw = load_weights_file(path)
    if isinstance(raw, dict) and key in raw:
        state = raw[key]
    elif isinstance(raw, dict) and "params" in raw:
        state = raw["params"]
    else:
        state = raw
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ConversionError(f"{path}: expected {key!r} / 'params' with a state dict of tensors")
    missing = [r for r in _GFPGAN_REQUIRED if not any(k.startswith(r) for k in state)]
    if missing:
        raise ConversionError(f"{path}: not a GFPGANv1-clean state dict; missing {missing}")
    w = state["conv_body_first.weight"]
    if w.ndim != 4 or w.shape[1] != 3:
        raise ConversionError(f"{path}: conv_body_first.weight: expected (C, 3, k, k), got "
                              f"{tuple(w.shape)}")
    n_down = len({k.split(".")[1] for k in state if k.startswith("conv_body_down.")})
    config = {"first_channels": int(w.shape[0]), "num_down": n_down,
              "num_style_feat": int(state["final_linear.weight"].shape[0]) if
              state["final_linear.weight"].ndim == 2 else None}
    return save_weights(out, state, kind="gfpgan", config=config,
                        extra={"source": os.path.basename(path), "key": key})


def convert_segformer(path: str, out: str) -> str:
    """HuggingFace-format SegFormer folder -> weights folder (kind ``"segformer"``)."""
    from pyface.nn.segformer import SegFormer, config_from_hf, load_hf_segformer
    from pyface.train.config import to_dict

    cfg = config_from_hf(path)
    model = SegFormer(cfg)
    load_hf_segformer(model, path)
    return save_weights(out, model.state_dict(), kind="segformer", config=to_dict(cfg),
                        extra={"source": os.path.basename(os.path.abspath(path))})


CONVERTERS = {
    "eg3d": (convert_eg3d, "official EG3D network pickle (.pkl) -> backbone/SR/decoder weights"),
    "vgg19": (convert_vgg19, "torchvision vgg19 .pth -> perceptual-loss weights"),
    "arcface": (convert_arcface, "insightface IResNet .pth -> identity-loss weights"),
    "gfpgan": (convert_gfpgan, "GFPGANv1-clean .pth (params_ema) -> weights"),
    "segformer": (convert_segformer, "HuggingFace SegFormer folder -> weights"),
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert third-party weights to pyface weight folders (no code runs)",
        description="Convert third-party weights into pyface weight folders (safetensors + "
                    "JSON). Pickles are read with a restricted unpickler; .pth files with "
                    "torch.load(weights_only=True). Nothing is downloaded.")
    sub = p.add_subparsers(dest="format", metavar="FORMAT")
    for name, (fn, help_) in CONVERTERS.items():
        q = sub.add_parser(name, help=help_, description=(fn.__doc__ or help_).split("\n\n")[0])
        q.add_argument("src", help="input file or folder")
        q.add_argument("out", help="output folder")
        if name == "eg3d":
            q.add_argument("--network", default="G_ema", choices=("G_ema", "G"),
                           help="which generator of the pickle (default: G_ema)")
        q.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args) -> int:
    fn = CONVERTERS[args.format][0]
    kwargs = {"network": args.network} if args.format == "eg3d" else {}
    try:
        out = fn(args.src, args.out, **kwargs)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"pyface convert {args.format}: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0
