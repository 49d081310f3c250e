# Provenance: reproduces the weight-file layouts (not code) of EG3D (NVlabs/eg3d, commit 7cf1fd1,
# NVIDIA Source Code License, non-commercial) network pickles, torchvision (BSD-3-Clause),
# insightface (MIT), GFPGAN (TencentARC/GFPGAN, Apache-2.0), face-parsing.PyTorch
# (zllrunning/face-parsing.PyTorch, commit d2e684c, MIT), HuggingFace transformers' SegFormer
# (Apache-2.0), Hopenet (natanielruiz/deep-head-pose, Apache-2.0), face-vid2vid as reimplemented in
# zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis (commit 9511d25, CC BY-NC 4.0),
# LivePortrait (KwaiVGI/LivePortrait, commit 1986663, MIT) and GOHA's release checkpoint
# (NVlabs/GOHA, commit 38e15ed, NVIDIA Source Code License). Our own implementation, written
# from the papers and the upstream's documented behaviour; no upstream code is copied. pyface's
# code is licensed under Apache-2.0 (LICENSE).
"""``pyface convert``: third-party weights -> pyface weight folders (safetensors + JSON).

* ``eg3d PKL OUT``      official EG3D network pickle (also OTAvatar's / GOHA's EG3D bases), read
  with :class:`RestrictedUnpickler`: it rebuilds tensors and plain containers, turns EG3D's
  persistent classes into inert records **without executing the source code they embed**, and
  refuses every other global.
* ``vgg19 PTH OUT``     torchvision VGG19 state dict (for :class:`pyface.nn.PerceptualLoss`).
* ``arcface PTH OUT``   insightface IResNet state dict (for :class:`pyface.nn.IdentityLoss`).
* ``gfpgan PTH OUT``    GFPGAN v1 "clean" checkpoint (``params_ema``), structure-checked.
* ``gfpgan-d PTH OUT``  GFPGAN's ``net_d`` (BasicSR StyleGAN2 discriminator) -> :class:`pyface.nn.
  GFPGANDiscriminator` weights (GOHA's s1_gan D; its dual D loads it with 6 channels).
* ``face-parser PTH OUT`` face-parsing.PyTorch BiSeNet (``79999_iter.pth``) -> :class:`pyface.nn.
  FaceParser` weights.
* ``segformer DIR OUT`` HuggingFace-format SegFormer folder (says what it drops: classifiers;
  an encoder-only checkpoint converts to an encoder-only folder).
* ``otavatar CKPT OUT`` OTAvatar's released checkpoint -> :class:`pyface.nn.MotionController`
  weights (the tied MLP's five stored copies must agree) + its EG3D generator.
* ``hopenet PKL_OR_PTH OUT`` Hopenet (natanielruiz/deep-head-pose, e.g.
  ``hopenet_robust_alpha1.pkl``) -> :class:`pyface.nn.Hopenet` weights (MMFA's rotation network).
* ``goha CKPT OUT``      GOHA's released stage-2 checkpoint -> the weights of pyface's GOHA
  (``pyface.models.load("goha", OUT)``); lists the keys pyface does not hold.
* ``dense-motion PTH OUT`` face-vid2vid (reimplementation) checkpoint or LivePortrait
  ``warping_module.pth`` -> :class:`pyface.nn.DenseMotion` weights.

``.pth`` files are read with ``torch.load(weights_only=True)``; nothing is downloaded. ``OUT``
must be new, an empty folder or an earlier pyface weights folder (replaced once the new one is
complete on disk); a file, a folder of other files or a training checkpoint is refused before
anything is read (:func:`check_output`), and so is an ``OUT`` that is ``SRC``
(:func:`check_distinct`). Errors start with ``SRC`` or ``OUT``; a file that does
not load is named for what it is (:func:`pyface.checkpoint.describe_weights_file`), another
model's release for its converter (:func:`identify_release`).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import sys
import types
from typing import Any

import torch

from pyface.checkpoint import (CheckpointError, check_state_dict, check_weights_replaceable,
                               load_weights_file, save_weights)


class ConversionError(CheckpointError):
    """The input is not what the converter expects; the message names the key and shapes."""


class ConversionWarning(UserWarning):
    """A converter dropped part of its input or wrote less than a full model; the message says
    what (``pyface convert`` prints these as notes)."""


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
    a storage, read with ``weights_only=True`` (refused on a torch whose weights-only loader
    runs code: :func:`pyface.checkpoint.check_torch_load_safe`)."""
    from pyface.checkpoint import check_torch_load_safe

    check_torch_load_safe("a tensor storage in the pickle")
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


def _reconstructor(cls, base, state):
    """Safe ``copyreg._reconstructor`` for records only."""
    if isinstance(cls, type) and issubclass(cls, (ObjectRecord, DictRecord)):
        obj = cls.__new__(cls)
        if state is not None and isinstance(obj, DictRecord):
            obj.update(state)
        return obj
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")


class _Global:
    """An allowed callable global as the unpickler sees it: REDUCE calls the function or class
    it wraps; BUILD on it is refused. BUILD on the function itself would set its attributes
    (e.g. ``torch._utils._rebuild_tensor_v2.__defaults__``, which every later tensor load of
    the process reads) or a class's methods, changing them for the whole process."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn, name: str):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __setstate__(self, state):
        raise pickle.UnpicklingError(
            f"refusing to set the state of global {self._name} (BUILD on a function or class "
            "would change it for the whole process; this file may be malicious or damaged)")

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError(f"refusing to set the state of global {self._name}")

    def __repr__(self):
        return f"<global {self._name}>"


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
# the Python functions and classes among them take attributes: handed out wrapped (the C types
# above, torch dtypes and numpy's globals refuse attribute assignment themselves)
_SAFE = {k: _Global(v, ".".join(k)) if isinstance(v, types.FunctionType) or v is PersistentRecord
         else v for k, v in _SAFE.items()}
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
    raises ``pickle.UnpicklingError`` naming it, and so does a BUILD on an allowed function or
    class itself (:class:`_Global`), which would change it for the whole process.
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


def module_state_dict(obj, prefix: str = "", _above: tuple = ()) -> dict[str, torch.Tensor]:
    """Flatten a record of an ``nn.Module`` (``_parameters``, persistent ``_buffers``,
    ``_modules``) into a state dict. A record among its own sub-modules (a damaged or crafted
    pickle) raises :class:`ConversionError` naming the path."""
    if any(obj is a for a in _above):
        raise ConversionError(f"{prefix[:-1]}: the network record contains itself (a loop in "
                              "its sub-modules); the pickle is damaged or not an EG3D network")
    _above = (*_above, obj)
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
            out.update(module_state_dict(v, prefix + k + ".", _above))
    for k, v in out.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{k}: expected a tensor in the network record, got "
                                  f"{type(v).__name__}")
    return out


def _plain(v, _above: tuple = ()):
    """Records/containers -> JSON-able data (for init kwargs and rendering options). A container
    inside itself (a damaged or crafted pickle) raises :class:`ConversionError`."""
    if isinstance(v, (dict, list, tuple)):
        if any(v is a for a in _above):
            raise ConversionError("the network's init kwargs / rendering_kwargs contain "
                                  "themselves (a loop); the pickle is damaged or not an EG3D "
                                  "network")
        _above = (*_above, v)
    if isinstance(v, dict):
        return {str(k): _plain(x, _above) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x, _above) for x in v]
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


def eg3d_state_config(state: dict[str, torch.Tensor], *, init: dict, rendering_kwargs: dict,
                      neural_rendering_resolution: int | None, sr_class_names: list,
                      where: str, network: str) -> dict:
    """Check an EG3D ``TriPlaneGenerator`` state dict (EG3D's names: ``backbone.*``,
    ``superresolution.*``, ``decoder.*``) against pyface's modules (every key and shape, on the
    meta device) and return the config of a kind-``"eg3d"`` weights folder: ``generator``
    (``EG3DGeneratorConfig`` as a dict), ``backbone``, ``superresolution``,
    ``rendering_kwargs``, ``init_kwargs``. Errors name ``where`` (the file) and ``network``
    (the entry). Shared by ``pyface convert eg3d`` and the converters
    of checkpoints that embed an EG3D generator (``pyface convert otavatar``)."""
    from pyface.models.eg3d.convert import generator_config
    from pyface.nn.stylegan import SuperResolution, TriplaneBackbone
    from pyface.train.config import to_dict

    rk = rendering_kwargs
    backbone_cfg = _eg3d_configs(state)
    sr_cfg = _eg3d_sr_config(state, backbone_cfg.mapping.w_dim,
                             list(sr_class_names) + [rk.get("superresolution_module")])
    if sr_cfg is not None and "sr_antialias" in rk:
        sr_cfg.antialias = bool(rk["sr_antialias"])
    if sr_cfg is not None and "superresolution_noise_mode" in rk:
        sr_cfg.noise_mode = str(rk["superresolution_noise_mode"])
    # check everything against our modules: names and shapes (built on the meta device)
    with torch.device("meta"):
        backbone = TriplaneBackbone(backbone_cfg)
        sr_module = SuperResolution(sr_cfg) if sr_cfg is not None else None
    check_state_dict(backbone, {k[9:]: v for k, v in state.items() if k.startswith("backbone.")},
                     f"{where} ({network}.backbone)")
    if sr_cfg is not None:
        check_state_dict(sr_module,
                         {k[16:]: v for k, v in state.items()
                          if k.startswith("superresolution.")},
                         f"{where} ({network}.superresolution)")
    known = ("backbone.", "superresolution.", "decoder.")
    other = [k for k in state if not k.startswith(known)]
    if other:
        raise ConversionError(f"{where}: unexpected keys {other[:5]} outside backbone / "
                              "superresolution / decoder")
    dec_state = {k[8:]: v for k, v in state.items() if k.startswith("decoder.")}
    if "net.0.weight" not in dec_state or "net.2.weight" not in dec_state:
        raise ConversionError(f"{where}: decoder.net.0.weight / decoder.net.2.weight missing")
    gen_cfg = generator_config(backbone_cfg, sr_cfg.variant if sr_cfg else None, dec_state,
                               _plain(init), _plain(rk), neural_rendering_resolution)
    return {"generator": to_dict(gen_cfg), "backbone": to_dict(backbone_cfg),
            "superresolution": to_dict(sr_cfg) if sr_cfg else None,
            "rendering_kwargs": _plain(rk),
            "init_kwargs": _plain({k: v for k, v in init.items() if k != "rendering_kwargs"})}


def _unpickle_failure(path: str, exc: BaseException) -> str:
    """Why a file did not unpickle, in words: a pickle cut short, or what else the file is
    (:func:`pyface.checkpoint.describe_weights_file`: empty, text, a video, ...)."""
    from pyface.checkpoint import describe_weights_file

    with open(path, "rb") as f:
        pickled = f.read(1) == b"\x80"
    if pickled:
        return (f"a truncated or damaged pickle ({os.path.getsize(path)} bytes; "
                f"{str(exc) or type(exc).__name__}): copy or download it again")
    return describe_weights_file(path)


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
    import zipfile

    if os.path.isdir(pkl):
        raise ConversionError(f"{pkl}: a folder; expected an EG3D network pickle file (.pkl)")
    if not os.path.isfile(pkl):
        if os.path.exists(pkl):
            raise ConversionError(f"{pkl}: not a regular file (a device, pipe or socket); "
                                  "expected an EG3D network pickle file (.pkl)")
        raise FileNotFoundError(f"{pkl}: not found (expected an EG3D network pickle, .pkl)")
    if zipfile.is_zipfile(pkl):
        raise ConversionError(f"{pkl}: a torch.save archive (.pth), not an EG3D network pickle "
                              "(.pkl); the converters of .pth files are listed by `pyface "
                              "convert --help`")
    try:
        data = restricted_load(pkl)
    except pickle.UnpicklingError as exc:
        if "refusing" in str(exc) or "unsupported" in str(exc):
            raise ConversionError(f"{pkl}: {exc}") from None
        raise ConversionError(f"{pkl}: not an EG3D network pickle: "
                              f"{_unpickle_failure(pkl, exc)}") from None
    except Exception as exc:  # noqa: BLE001 - any other byte stream: not a pickle
        raise ConversionError(f"{pkl}: not an EG3D network pickle: "
                              f"{_unpickle_failure(pkl, exc)}") from None
    if not isinstance(data, dict) or network not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConversionError(f"{pkl}: expected a dict with {network!r} (EG3D network pickle), "
                              f"got {keys}")
    net = data[network]
    state = module_state_dict(net)
    net_state = _record_state(net)
    # EG3D's persistence pickles the instance __dict__: the constructor's kwargs are under
    # ``_init_kwargs``; the ``rendering_kwargs`` attribute is what EG3D renders with (scripts
    # may edit it after construction), the constructor's copy is the fallback
    init = net_state.get("_init_kwargs") or net_state.get("init_kwargs") or {}
    rk = net_state.get("rendering_kwargs") or init.get("rendering_kwargs") or {}
    if not isinstance(init, dict) or not isinstance(rk, dict):
        raise ConversionError(f"{pkl}: _init_kwargs / rendering_kwargs are "
                              f"{type(init).__name__} / {type(rk).__name__}, expected mappings")
    sr_rec = (net_state.get("_modules") or {}).get("superresolution")
    nrr = net_state.get("neural_rendering_resolution")
    config = eg3d_state_config(
        state, init=init, rendering_kwargs=rk,
        neural_rendering_resolution=int(nrr) if isinstance(nrr, (int, float)) else None,
        sr_class_names=[getattr(sr_rec, "class_name", None), getattr(sr_rec, "_qualname", None)],
        where=pkl, network=network)
    config.update(network=network, class_name=getattr(net, "class_name", None))
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

    Infers the :class:`pyface.nn.GFPGANConfig` from the weights (out size, width, channel
    multiplier, style width, MLP depth, ``sft_half``, ``different_w``) and checks every key and
    shape against :class:`pyface.nn.GFPGANv1Clean`; the folder loads with
    :func:`pyface.nn.load_gfpgan`."""
    from dataclasses import asdict

    from pyface.nn.gfpgan import GFPGANv1Clean, gfpgan_config_from_state

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
    try:
        cfg = gfpgan_config_from_state(state, path)
        with torch.device("meta"):
            module = GFPGANv1Clean(cfg)
    except (CheckpointError, ValueError) as exc:
        raise ConversionError(f"{path}: not a GFPGANv1-clean state dict ({exc})") from None
    try:
        check_state_dict(module, state, f"{path} (GFPGANv1Clean {cfg})")
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    return save_weights(out, state, kind="gfpgan", config=asdict(cfg),
                        extra={"source": os.path.basename(path), "key": key})


def convert_gfpgan_discriminator(path: str, out: str) -> str:
    """GFPGAN ``net_d`` (BasicSR StyleGAN2 discriminator, e.g. ``GFPGANv1_net_d.pth``) -> weights
    folder (kind ``"gfpgan_d"``) for :class:`pyface.nn.GFPGANDiscriminator`; keys unchanged,
    config inferred, every key and shape checked. Load with
    :func:`pyface.nn.load_gfpgan_discriminator` (``in_channels=6`` for GOHA's dual D)."""
    from dataclasses import asdict

    from pyface.nn.gfpgan import (GFPGANDiscriminator, _discriminator_state,
                                  gfpgan_discriminator_config_from_state)

    try:
        state = _discriminator_state(path)
        cfg = gfpgan_discriminator_config_from_state(state, path)
        with torch.device("meta"):
            module = GFPGANDiscriminator(cfg)
        check_state_dict(module, state, f"{path} (GFPGAN discriminator {cfg})")
    except ConversionError:
        raise
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    return save_weights(out, state, kind="gfpgan_d", config=asdict(cfg),
                        extra={"source": os.path.basename(path)})


def convert_face_parser(path: str, out: str) -> str:
    """face-parsing.PyTorch BiSeNet ``.pth`` (``79999_iter.pth``) -> weights folder (kind
    ``"face_parser"``) for :class:`pyface.nn.FaceParser`; every key and shape checked.

    Read with ``torch.load(weights_only=True)``; ``module.`` prefixes are stripped and missing
    BatchNorm ``num_batches_tracked`` counters filled in. Load with
    :func:`pyface.nn.load_face_parser`."""
    from pyface.nn.face_parser import face_parser_state

    try:
        state = face_parser_state(load_weights_file(path), path)
    except ConversionError:
        raise
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    n = int(state["conv_out.conv_out.weight"].shape[0])
    return save_weights(out, state, kind="face_parser", config={"num_classes": n},
                        extra={"source": os.path.basename(path)})


def convert_segformer(path: str, out: str, keep_classifier: bool = False) -> str:
    """HuggingFace-format SegFormer folder -> weights folder (kind ``"segformer"``).

    What the folder holds, and what is dropped, is said in a :class:`ConversionWarning` and
    recorded in the folder's ``extra`` (``dropped``, ``decode_head``, ``num_labels``):

    * a segmentation checkpoint (``SegformerForSemanticSegmentation``): encoder + decode head;
      its classifier (``decode_head.classifier``, one output per label) is dropped unless
      ``keep_classifier`` (then ``num_labels`` and ``id2label`` are kept too);
    * an encoder-only checkpoint (``SegformerModel``, or ``SegformerForImageClassification``, whose
      ImageNet ``classifier`` is always dropped): the encoder only. No decode head is written,
      so nothing random is saved as if it were weights; loading the folder into a
      :class:`~pyface.nn.SegFormer` leaves the head at its initialisation (reported).

    The folder is read back by :func:`pyface.nn.segformer.load_hf_segformer` /
    :func:`~pyface.nn.segformer.load_segformer` and :func:`~pyface.nn.segformer.config_from_hf`.
    """
    import json
    import warnings

    from pyface.nn.segformer import (MixTransformer, SegFormer, config_from_hf,
                                     load_hf_segformer, read_hf_segformer)
    from pyface.train.config import to_dict

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        what = ("not found" if not os.path.exists(path) else "a file" if os.path.isfile(path)
                else "a folder without config.json")
        raise ConversionError(f"{path}: {what}; expected a HuggingFace SegFormer folder "
                              "(config.json + model.safetensors or pytorch_model.bin)")
    cfg = config_from_hf(path)
    _, info = read_hf_segformer(path)
    dropped = list(info["dropped"])
    notes = []
    if dropped:
        notes.append(f"dropped {len(dropped)} keys no pyface module holds: {dropped[:4]} "
                     "(the image-classification head)")
    num_labels = 0
    if not info["decode_head"]:
        module = MixTransformer(cfg)
        notes.append("encoder-only checkpoint: wrote the encoder only (no decode head in the "
                     "file, none saved); a SegFormer loading this folder keeps a freshly "
                     "initialised decode head")
    else:
        if info["num_labels"]:
            if keep_classifier:
                num_labels = info["num_labels"]
            else:
                dropped += ["decode_head.classifier.weight", "decode_head.classifier.bias"]
                notes.append(f"dropped the segmentation classifier decode_head.classifier "
                             f"({info['num_labels']} labels); keep it with keep_classifier=True "
                             "(--keep-classifier)")
        if not info["head_norm"]:
            cfg.head_norm = False
        module = SegFormer(cfg, num_labels)
    load_hf_segformer(module, path, allow_missing_head=False)
    state = module.state_dict()
    if isinstance(module, MixTransformer):
        state = {"encoder." + k: v for k, v in state.items()}
    extra = {"source": os.path.basename(os.path.abspath(path)), "dropped": dropped,
             "decode_head": info["decode_head"], "num_labels": num_labels}
    if num_labels and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as fh:
            id2label = json.load(fh).get("id2label")
        if id2label:
            extra["id2label"] = id2label
    for note in notes:
        warnings.warn(f"{path}: {note}", ConversionWarning, stacklevel=2)
    return save_weights(out, state, kind="segformer", config=to_dict(cfg), extra=extra)


# --------------------------------------------------------------------------------------------
# face-vid2vid / LivePortrait dense motion
# --------------------------------------------------------------------------------------------

# upstream (face-vid2vid reimplementation, LivePortrait) -> pyface.nn.DenseMotion, inside the
# hourglass; every other key of the dense motion network has the same name
_DENSE_MOTION_RENAMES = (
    (re.compile(r"^hourglass\.encoder\.down_blocks\.(\d+)\."), r"hourglass.down.\1."),
    (re.compile(r"^hourglass\.decoder\.up_blocks\.(\d+)\."), r"hourglass.up.\1."),
    (re.compile(r"^hourglass\.decoder\.(conv|norm)\."), r"hourglass.\1."),
)
_DENSE_MOTION_PREFIX = "dense_motion_network."


def rename_dense_motion_key(key: str) -> str:
    """A face-vid2vid / LivePortrait ``DenseMotionNetwork`` key (without the
    ``dense_motion_network.`` prefix) -> the :class:`pyface.nn.DenseMotion` key."""
    for pat, rep in _DENSE_MOTION_RENAMES:
        key, n = pat.subn(rep, key)
        if n:
            break
    return key


def _dense_motion_config(state: dict[str, torch.Tensor], where: str):
    """DenseMotionConfig from the (pyface-named) weights' shapes."""
    from pyface.nn.motion import DenseMotionConfig

    def need(key):
        if key not in state:
            raise ConversionError(f"{where}: expected key {key!r} of a dense motion network")
        return state[key]

    num_blocks = len({k.split(".")[2] for k in state if k.startswith("hourglass.down.")})
    if num_blocks == 0:
        raise ConversionError(f"{where}: no hourglass down blocks "
                              "(hourglass.encoder.down_blocks.* upstream)")
    compress = need("compress.weight")
    k1 = need("mask.weight").shape[0]
    in_features = k1 * (compress.shape[0] + 1)
    out_filters = need("hourglass.conv.weight").shape[0]
    widths = [need(f"hourglass.down.{i}.conv.weight").shape[0] for i in range(num_blocks)]
    occ = state.get("occlusion.weight")
    return DenseMotionConfig(
        num_kp=k1 - 1, feature_channel=compress.shape[1], block_expansion=out_filters - in_features,
        num_blocks=num_blocks, max_features=max(widths),
        reshape_depth=(occ.shape[1] // out_filters) if occ is not None else 16,
        compress=compress.shape[0], estimate_occlusion_map=occ is not None)


def convert_dense_motion(path: str, out: str, layout: str = "auto") -> str:
    """face-vid2vid / LivePortrait dense-motion weights -> weights folder (kind
    ``"dense_motion"``) for :class:`pyface.nn.DenseMotion`; read back with
    :func:`load_dense_motion`.

    Accepted inputs (``.pth`` / ``.tar`` read with ``torch.load(weights_only=True)``, or
    ``.safetensors``):

    * ``face-vid2vid``: the reimplementation's training checkpoint (a dict with ``generator``;
      its ``dense_motion_network.*`` keys), or a bare generator / DenseMotionNetwork state dict;
    * ``liveportrait``: ``warping_module.pth`` (a WarpingNetwork state dict; its
      ``dense_motion_network.*`` keys).

    Three renames inside the hourglass (:func:`rename_dense_motion_key`); BatchNorm
    ``num_batches_tracked`` counters absent from old files are set to 0. The config (K, widths,
    depth, occlusion) is inferred from the shapes and every key and shape is checked. The
    folder's ``extra`` records ``layout`` and ``pi``: the value of pi that the layout's pose code
    used for degrees (3.14 for face-vid2vid, math.pi for LivePortrait); pass it as
    ``euler_to_rotation(..., pi=...)`` to reproduce that model's rotations.
    """
    import math

    from pyface.nn.motion import FACE_VID2VID_PI, DenseMotion
    from pyface.train.config import to_dict

    if layout not in ("auto", "face-vid2vid", "liveportrait"):
        raise ValueError(f"layout: expected 'auto', 'face-vid2vid' or 'liveportrait', got "
                         f"{layout!r}")
    raw = load_weights_file(path)
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a dict, got {type(raw).__name__}")
    container = None
    if "generator" in raw and isinstance(raw["generator"], dict):
        container, raw = "generator", raw["generator"]
        if layout == "auto":
            layout = "face-vid2vid"
    elif "state_dict" in raw and isinstance(raw["state_dict"], dict):
        container, raw = "state_dict", raw["state_dict"]
    if not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors"
                              + (f" under {container!r}" if container else ""))
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    ignored = 0
    if any(k.startswith(_DENSE_MOTION_PREFIX) for k in raw):
        ignored = sum(not k.startswith(_DENSE_MOTION_PREFIX) for k in raw)
        if layout == "auto":
            # face-vid2vid's generator holds the appearance encoder (`first`, `down_blocks`, ...)
            # next to the dense motion; LivePortrait's warping module does not
            layout = "face-vid2vid" if any(k.startswith("first.") for k in raw) \
                else "liveportrait"
        raw = {k[len(_DENSE_MOTION_PREFIX):]: v for k, v in raw.items()
               if k.startswith(_DENSE_MOTION_PREFIX)}
    if layout == "auto":
        import warnings

        layout = "face-vid2vid"
        warnings.warn(f"{path}: a bare dense-motion state dict does not tell face-vid2vid from "
                      "LivePortrait; recorded face-vid2vid's degree convention (pi = 3.14); "
                      "pass layout= (--layout) to choose", ConversionWarning, stacklevel=2)
    state = {rename_dense_motion_key(k): v for k, v in raw.items()}
    where = f"{path} ({layout} dense motion)"
    cfg = _dense_motion_config(state, where)
    module = DenseMotion(cfg)
    for k, v in module.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    try:
        check_state_dict(module, state, where)
    except CheckpointError as exc:
        raise ConversionError(f"{exc} (pyface names: upstream hourglass.encoder.down_blocks.i = "
                              "hourglass.down.i, hourglass.decoder.up_blocks.i = hourglass.up.i, "
                              "hourglass.decoder.conv/norm = hourglass.conv/norm)") from None
    pi = FACE_VID2VID_PI if layout == "face-vid2vid" else math.pi
    return save_weights(out, state, kind="dense_motion", config=to_dict(cfg),
                        extra={"source": os.path.basename(path), "layout": layout, "pi": pi,
                               "ignored_keys": ignored})


def load_dense_motion(path: str, device="cpu"):
    """A ``pyface convert dense-motion`` folder -> (:class:`pyface.nn.DenseMotion`, extra) with
    ``extra["pi"]`` the layout's degree convention (see :func:`convert_dense_motion`)."""
    from pyface.checkpoint import load_module_state, load_weights
    from pyface.nn.motion import DenseMotion, DenseMotionConfig

    tensors, meta = load_weights(path, kind="dense_motion", device=device)
    module = DenseMotion(DenseMotionConfig(**meta["config"]))
    load_module_state(module, tensors, path)
    return module.to(device), meta.get("extra", {})


# --------------------------------------------------------------------------------------------
# Which release a loaded file is (for the errors of a converter given another model's file)
# --------------------------------------------------------------------------------------------

def identify_release(raw) -> tuple[str, str] | None:
    """A loaded weights file -> (``pyface convert`` format, description) of the release it looks
    like, from its entry and key names; None when it matches none."""
    if not isinstance(raw, dict):
        return None
    keys = {str(k) for k in raw}
    if keys & {"net_Warp_ema", "net_Warp"}:
        return "otavatar", "an OTAvatar release (net_Warp_ema / net_G_ema)"
    if "model_state_dict" in keys or "discriminator_dict" in keys:
        return "goha", "a GOHA release (model_state_dict / discriminator_dict)"
    if keys & {"G_ema", "G"}:
        return "eg3d", "an EG3D network dict (G_ema)"
    if "params_ema" in keys:
        return "gfpgan", "a GFPGAN checkpoint (params_ema)"
    for inner in ("params", "state_dict"):
        if isinstance(raw.get(inner), dict):
            return identify_release(raw[inner])
    if isinstance(raw.get("generator"), dict):
        return "dense-motion", "a face-vid2vid checkpoint (generator)"
    flat = {k[len("module."):] if k.startswith("module.") else k for k in keys}

    def has(*prefixes):
        return any(k.startswith(prefixes) for k in flat)

    if has("fc_yaw.", "fc_pitch."):
        return "hopenet", "a Hopenet state dict (fc_yaw / fc_pitch)"
    if has("cp.resnet.", "ffm."):
        return "face-parser", "a face-parsing.PyTorch BiSeNet state dict (cp.resnet)"
    if has("conv_body_first.", "stylegan_decoder."):
        return "gfpgan", "a GFPGANv1-clean state dict (conv_body_first / stylegan_decoder)"
    if has("conv_body.0.0.") and has("final_linear."):
        return "gfpgan-d", "a GFPGAN net_d state dict (conv_body / final_linear)"
    if has("dense_motion_network."):
        return "dense-motion", "a dense-motion state dict (dense_motion_network)"
    if has("features.") and has("classifier."):
        return "vgg19", "a torchvision VGG state dict (features / classifier)"
    if has("layer1.") and has("features.") and not has("fc."):
        return "arcface", "an insightface IResNet state dict (layer1 / features)"
    return None


def _entries(raw) -> str:
    """What a loaded file holds, briefly: its type, or a dict's first entries."""
    if not isinstance(raw, dict):
        return f"a {type(raw).__name__}"
    names = sorted(map(str, raw))
    return ("a dict with entries " + ", ".join(names[:6])
            + (f" ... ({len(names)} in all)" if len(names) > 6 else "") if names
            else "an empty dict")


def _other_release(exc: Exception, raw, fmt: str) -> ConversionError:
    """``exc`` as a ConversionError, with the converter that fits ``raw`` when it is another
    model's release."""
    other = identify_release(raw)
    msg = str(exc)
    if other is not None and other[0] != fmt:
        msg += f" (the file looks like {other[1]}: pyface convert {other[0]} SRC OUT)"
    return ConversionError(msg)


# --------------------------------------------------------------------------------------------
# OTAvatar's released checkpoint
# --------------------------------------------------------------------------------------------

def convert_otavatar(path: str, out: str, ema: bool = True) -> str:
    """OTAvatar's released checkpoint (``torch.save`` dict) -> weights folder (kind
    ``"otavatar"``): ``controller.*`` (:class:`pyface.nn.MotionController`, tied MLP) and
    ``generator.*`` (EG3D names, as ``pyface convert eg3d`` writes them).

    Read with ``torch.load(weights_only=True)``. Uses ``net_Warp_ema`` / ``net_G_ema`` (the
    trained ``net_Warp`` / ``net_G`` with ``ema=False``, ``--no-ema``); ``module.`` prefixes are
    stripped. The tied MLP is stored five times (``mapping_Refine.{0,2,4,6,8}``): the copies
    must be identical, else the file is refused naming the keys. The generator is checked key by
    key by the EG3D converter's code, with OTAvatar's rendering options (the release holds no
    options). ``pyface.models.otavatar.convert.load_controller(OUT)`` and
    ``EG3DGenerator.from_converted(OUT)`` load the two parts. A release without a generator
    (``net_G_ema`` None) converts the controller only (a note says so).
    """
    import warnings

    from pyface.models.otavatar import convert as ota
    from pyface.train.config import to_dict

    raw = load_weights_file(path)
    try:
        try:
            warp, gen, names = ota.release_entries(raw, path, ema=ema)
        except CheckpointError as exc:
            raise _other_release(exc, raw, "otavatar") from None
        config = {}
        tensors = {}
        num_ws = 14
        if gen is not None:
            config = eg3d_state_config(
                gen, init={}, rendering_kwargs=dict(ota.OTAVATAR_RENDERING_KWARGS),
                neural_rendering_resolution=ota.OTAVATAR_NEURAL_RENDERING_RESOLUTION,
                sr_class_names=[], where=path, network=names[1])
            # W+ layers: one per synthesis conv, plus the last block's toRGB
            num_ws = 1 + sum(bool(re.match(r"backbone\.synthesis\.b\d+\.conv[01]\.weight$", k))
                             for k in gen)
            tensors.update({"generator." + k: v for k, v in gen.items()})
        cfg, cstate = ota.controller_state(warp, f"{path} ({names[0]})", num_ws=num_ws)
        if gen is not None and cfg.w_dim != config["generator"]["w_dim"]:
            raise ConversionError(f"{path}: {names[0]}.direction.weight spans w_dim {cfg.w_dim} "
                                  f"but {names[1]} has w_dim {config['generator']['w_dim']}")
    except ConversionError:
        raise
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    tensors.update({"controller." + k: v for k, v in cstate.items()})
    config["controller"] = to_dict(cfg)
    ignored = sorted(str(k) for k in raw if k not in names)
    if gen is None:
        warnings.warn(f"{path}: {names[1]!r} is empty; wrote the controller only (take the "
                      "generator from an EG3D pickle: pyface convert eg3d)", ConversionWarning,
                      stacklevel=2)
    return save_weights(out, tensors, kind="otavatar", config=config,
                        extra={"source": os.path.basename(path),
                               "entries": {"controller": names[0],
                                           "generator": names[1] if gen is not None else None},
                               "ignored_entries": ignored})


def convert_hopenet(path: str, out: str) -> str:
    """Hopenet (natanielruiz/deep-head-pose) ``.pkl`` / ``.pth`` state dict -> weights folder
    (kind ``"hopenet"``) for :class:`pyface.nn.Hopenet`; every key and shape checked.

    Read with ``torch.load(weights_only=True)`` (upstream's ``.pkl`` files are ``torch.save``
    state dicts); ``module.`` prefixes are stripped, missing BatchNorm ``num_batches_tracked``
    counters filled in, and the vestigial ``fc_finetune`` dropped (said in a note). Load with
    :func:`pyface.nn.load_hopenet`, or MMFA's ``model.rotation=hopenet``."""
    import warnings

    from pyface.nn.hopenet import hopenet_state

    raw = None
    try:
        raw = load_weights_file(path)
        state, dropped = hopenet_state(raw, path)
    except CheckpointError as exc:
        if "state dict of tensors" in str(exc):
            exc = ConversionError(f"{path}: expected Hopenet's state dict of tensors, got "
                                  f"{_entries(raw)}")
        raise _other_release(exc, raw, "hopenet") from None
    if dropped:
        warnings.warn(ConversionWarning(f"dropped {', '.join(sorted(dropped))} (Hopenet's "
                                        "vestigial fc_finetune, unused by its forward)"))
    return save_weights(out, state, kind="hopenet", extra={"source": os.path.basename(path),
                                                           "dropped": sorted(dropped)})


# --------------------------------------------------------------------------------------------
# GOHA's released checkpoint
# --------------------------------------------------------------------------------------------

def convert_goha(path: str, out: str, render_resolution: int = 224) -> str:
    """GOHA's released stage-2 checkpoint (``logs/s3/checkpoint825000.ckpt``: ``torch.save`` of
    ``model_state_dict`` and ``discriminator_dict``) -> weights folder (kind ``"goha"``) that
    ``pyface.models.load("goha", OUT)`` and ``pyface animate goha --checkpoint OUT`` load.

    Read with ``torch.load(weights_only=True)``. The config (R, MiT size, widths, SR and D
    widths) is read from the shapes, ``share_upsampler_weights`` is set (the release's
    up-branch sharing) and ``render_resolution`` is s2.yml's 224. Every key is checked against
    pyface's GOHA s2 model; keys with no pyface counterpart (the unused expression upsampler,
    the BiSeNet face parser, the Deep3D helper, constant buffers) are listed in a note and in the
    folder's meta (``extra.dropped``). A release without ``discriminator_dict`` gets a freshly
    initialised dual discriminator (a note says so; inference does not use it).
    """
    import warnings

    from pyface.models.goha import convert as gc

    raw = load_weights_file(path)
    try:
        model, disc = gc.release_entries(raw, path)
    except CheckpointError as exc:
        raise _other_release(exc, raw, "goha") from None
    config = gc.release_config(model, disc, path, render_resolution=render_resolution)
    state, dropped = gc.release_to_pyface(model, disc, path)
    state = gc.check_against_model(state, config, path, fill_discriminator=disc is None)
    if disc is None:
        warnings.warn(f"{path}: no discriminator_dict; the dual discriminator is freshly "
                      "initialised (only training uses it)", ConversionWarning, stacklevel=2)
    if dropped:
        warnings.warn(f"{path}: dropped {sum(map(len, dropped.values()))} tensors with no pyface "
                      "counterpart: " + "; ".join(f"{p}* ({len(v)}): {gc.DROPPED[p]}"
                                                  for p, v in dropped.items()),
                      ConversionWarning, stacklevel=2)
    return save_weights(out, state, kind="goha", config=config,
                        extra={"source": os.path.basename(path),
                               "iter": int(raw["iter"]) if isinstance(raw.get("iter"), int)
                               else None,
                               "dropped": {p: len(v) for p, v in dropped.items()},
                               "discriminator": "release" if disc is not None else "fresh"})


CONVERTERS = {
    "eg3d": (convert_eg3d, "official EG3D network pickle (.pkl) -> backbone/SR/decoder weights"),
    "vgg19": (convert_vgg19, "torchvision vgg19 .pth -> perceptual-loss weights"),
    "arcface": (convert_arcface, "insightface IResNet .pth -> identity-loss weights"),
    "gfpgan": (convert_gfpgan, "GFPGANv1-clean .pth (params_ema) -> weights"),
    "segformer": (convert_segformer, "HuggingFace SegFormer folder -> weights"),
    "gfpgan-d": (convert_gfpgan_discriminator,
                 "GFPGAN net_d .pth (BasicSR StyleGAN2 discriminator) -> weights"),
    "face-parser": (convert_face_parser,
                    "face-parsing.PyTorch BiSeNet .pth (79999_iter.pth) -> FaceParser weights"),
    "dense-motion": (convert_dense_motion,
                     "face-vid2vid checkpoint / LivePortrait warping_module.pth -> DenseMotion "
                     "weights"),
    "hopenet": (convert_hopenet,
                "Hopenet (deep-head-pose) .pkl/.pth -> frozen head-pose weights (MMFA rotation)"),
    "otavatar": (convert_otavatar,
                 "OTAvatar release checkpoint (net_Warp_ema / net_G_ema) -> controller + EG3D "
                 "generator weights"),
    "goha": (convert_goha,
             "GOHA release checkpoint (logs/s3/checkpoint825000.ckpt) -> GOHA s2 weights "
             "(pyface.models.load('goha', OUT))"),
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert third-party weights to pyface weight folders (no code runs)",
        description="Convert third-party weights into pyface weight folders (safetensors + "
                    "JSON). Pickles are read with a restricted unpickler; .pth files with "
                    "torch.load(weights_only=True). Nothing is downloaded. OUT is a new or "
                    "empty folder, or an earlier pyface weights folder, which is replaced once "
                    "the new one is complete; a file, a folder of other files or a training "
                    "checkpoint is refused.")
    sub = p.add_subparsers(dest="format", metavar="FORMAT")
    for name, (fn, help_) in CONVERTERS.items():
        q = sub.add_parser(name, help=help_,
                           description=(fn.__doc__ or help_).split("\n\n")[0].replace("``", ""))
        q.add_argument("src", metavar="SRC", help="the released weights file (a folder for "
                                                  "segformer)")
        q.add_argument("out", metavar="OUT",
                       help="output folder: new, empty, or an earlier pyface weights folder "
                            "(replaced once the new one is complete); a file, a folder of other "
                            "files or a training checkpoint is refused")
        if name == "eg3d":
            q.add_argument("--network", default="G_ema", choices=("G_ema", "G"),
                           help="which generator of the pickle (default: G_ema)")
        if name == "segformer":
            q.add_argument("--keep-classifier", action="store_true",
                           help="keep the segmentation classifier (dropped by default)")
        if name == "dense-motion":
            q.add_argument("--layout", default="auto",
                           choices=("auto", "face-vid2vid", "liveportrait"),
                           help="upstream layout (default: inferred; it only sets the recorded "
                                "degree convention)")
        if name == "goha":
            q.add_argument("--render-resolution", type=int, default=224,
                           help="render side r of the converted model (default 224, GOHA's s2.yml)")
        if name == "otavatar":
            q.add_argument("--no-ema", dest="ema", action="store_false",
                           help="convert the trained net_Warp / net_G instead of the EMA copies")
        q.set_defaults(func=run)
    def no_format(args) -> int:
        p.print_usage(sys.stderr)
        print(f"pyface convert: FORMAT: expected one of {', '.join(CONVERTERS)}, got none "
              "(pyface convert --help describes each)", file=sys.stderr)
        return 2

    p.set_defaults(func=no_format)


def _explained(fmt: str, src: str, msg: str) -> str:
    """A converter's message about the structure of SRC, completed with what the file holds when
    the message does not say, and with the converter of the release it looks like (another
    model's file given to ``fmt``). Read errors and messages that already say are unchanged."""
    import warnings

    if ("(the file looks like" in msg or not os.path.isfile(src)
            or any(w in msg for w in ("not a readable", "refused", "does not exist",
                                      "truncated", "EG3D network pickle:"))):
        return msg
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = load_weights_file(src)
    except Exception:  # noqa: BLE001 - a pickle (eg3d), or unreadable: nothing to add
        return msg
    if "state dict of tensors" in msg and " got " not in msg:
        msg += f"; the file holds {_entries(raw)}"
    other = identify_release(raw)
    if other is not None and other[0] != fmt:
        msg += f" (the file looks like {other[1]}: pyface convert {other[0]} SRC OUT)"
    return msg


def _below(path: str, folder: str) -> bool:
    """``path`` is ``folder``, inside it, or one of the writer's temporaries next to it
    (``OUT.tmp-PID``, ``OUT.old-PID``)."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith((folder + os.sep, folder + ".tmp-",
                                              folder + ".old-"))


def _weights_meta(path: str) -> dict | None:
    """The meta of the pyface folder at ``path``, or None (none there, or unreadable)."""
    import json

    from pyface.checkpoint import META_FILE

    try:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def check_output(out: str) -> None:
    """``OUT`` of ``pyface convert``: new, an empty folder, or a pyface *weights* folder (one a
    converter wrote, replaced once the new one is complete). A file, a folder of other files and
    a training checkpoint (its optimizer state and step would be lost) are refused with
    :class:`CheckpointError`, before any input is read."""
    check_weights_replaceable(out)
    meta = _weights_meta(out)
    if meta is None:
        return                            # new or empty
    if not meta.get("kind") or meta.get("step") is not None:
        what = (f"step {meta['step']}" if meta.get("step") is not None else "no weights kind")
        model = f" of model {meta['model']!r}" if meta.get("model") else ""
        raise CheckpointError(f"{out}: a pyface training checkpoint ({what}{model}), not a "
                              "weights folder; pyface convert replaces only weights folders: "
                              "choose a new or empty output folder")


def check_distinct(src: str, out: str) -> None:
    """``SRC`` and ``OUT`` of ``pyface convert`` are not one path (spelled alike, or two names of
    one file or folder): :class:`CheckpointError` naming ``SRC`` otherwise, a wrong command line
    whatever the path holds (exit code 2)."""
    same = os.path.abspath(src) == os.path.abspath(out)
    if not same and os.path.exists(src) and os.path.exists(out):
        try:
            same = os.path.samefile(src, out)
        except OSError:
            pass
    if same:
        raise CheckpointError(f"{src}: the same path as OUT; expected a released weights file "
                              "and a different output folder")


def check_source(src: str, out: str) -> None:
    """``SRC`` of ``pyface convert``: a pyface weights folder is already converted (it loads as
    it is), and ``SRC`` may not be ``OUT`` (:func:`check_distinct`); :class:`CheckpointError`
    naming both otherwise."""
    from pyface.checkpoint import FORMAT

    check_distinct(src, out)
    meta = _weights_meta(src) if os.path.isdir(src) else None
    if meta is not None and meta.get("format") == FORMAT:
        raise CheckpointError(f"{src}: already a pyface weights folder (kind "
                              f"{meta.get('kind')!r}); expected a released weights file to "
                              "convert (pyface loads this folder as it is)")


def run(args) -> int:
    import warnings

    from pyface.train.distributed import refuse_under_torchrun

    refused = refuse_under_torchrun(
        f"pyface convert {args.format}", "run the same pyface convert command without torchrun")
    if refused is not None:
        return refused
    fn = CONVERTERS[args.format][0]
    kwargs = {}
    if args.format == "eg3d":
        kwargs["network"] = args.network
    elif args.format == "segformer":
        kwargs["keep_classifier"] = args.keep_classifier
    elif args.format == "dense-motion":
        kwargs["layout"] = args.layout
    elif args.format == "otavatar":
        kwargs["ema"] = args.ema
    elif args.format == "goha":
        if args.render_resolution < 1:
            print(f"pyface convert goha: --render-resolution: expected an integer >= 1, got "
                  f"{args.render_resolution}", file=sys.stderr)
            return 2
        kwargs["render_resolution"] = args.render_resolution
    try:                                  # SRC given again as OUT: the command line's
        check_distinct(args.src, args.out)
    except CheckpointError as exc:
        print(f"pyface convert {args.format}: SRC {exc}", file=sys.stderr)
        return 2
    try:
        check_output(args.out)            # before the conversion: OUT is never half-replaced
    except CheckpointError as exc:        # an OUT that cannot be one: the command line's
        print(f"pyface convert {args.format}: OUT {exc}", file=sys.stderr)
        return 2
    replaced = _weights_meta(args.out)
    try:
        check_source(args.src, args.out)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConversionWarning)
            out = fn(args.src, args.out, **kwargs)
    except OSError as exc:
        if exc.filename and _below(str(exc.filename), args.out):
            print(f"pyface convert {args.format}: OUT {args.out}: cannot write the weights "
                  f"folder there ({exc.strerror or exc})", file=sys.stderr)
        else:
            print(f"pyface convert {args.format}: SRC {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError) as exc:
        print(f"pyface convert {args.format}: SRC {_explained(args.format, args.src, str(exc))}",
              file=sys.stderr)
        return 1
    for w in caught:
        if issubclass(w.category, ConversionWarning):
            print(f"pyface convert {args.format}: note: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if replaced is not None:
        source = (replaced.get("extra") or {}).get("source")
        print(f"pyface convert {args.format}: note: OUT {args.out}: replaced the earlier "
              f"{replaced.get('kind')!r} weights folder"
              + (f" (converted from {source})" if source else ""), file=sys.stderr)
    print(out)
    return 0
