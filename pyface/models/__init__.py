"""Trained portrait models as products: ``pyface.models.load(name, run) -> Pipeline``.

Each model lives in its own package ``pyface/models/<name>/`` (config dataclasses, networks, the
:class:`~pyface.train.model.TrainableModel`, its :class:`~pyface.train.model.Pipeline`,
converters) and is registered by one line in :mod:`pyface.train.registry`. A model package
imports only ``pyface.{nn, ops, face, data, checkpoint, train.model}`` (enforced by
``tests/test_models_imports.py``); never another model.

>>> import pyface.models
>>> pipe = pyface.models.load("example", "runs/example")
>>> state = pipe.encode_source(source)            # cache once
>>> for chunk in driving_chunks:                  # stream driving frames
...     frames = pipe.generate(state, pipe.encode_driving(chunk))

Names resolve lazily: importing this package imports no model.
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch

log = logging.getLogger("pyface.models")

__all__ = ["load", "names", "model_class", "inference_options", "check_options"]


def names() -> list[str]:
    """Every registered model, plugins (entry-point group ``pyface.models``) included."""
    from pyface.train.registry import model_names

    return model_names()


def model_class(name: str):
    """The registered TrainableModel class ``name`` (imported now)."""
    from pyface.train.registry import model_class as resolve

    return resolve(name)


def inference_options(name: str) -> tuple[str, ...]:
    """The config fields of model ``name`` that ``load(..., options=...)`` may set
    (:attr:`pyface.train.model.TrainableModel.inference_options`)."""
    return tuple(getattr(model_class(name), "inference_options", ()) or ())


def check_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` of :func:`load` checked for model ``name`` -> ``{field: value}`` (keys
    without the ``model.`` prefix, values converted as config values).

    A key is a field name (``"pti_steps"``) or the dotted path of a field of a nested config
    (``"generator.render.depth_resolution"``), with or without ``model.``. A key that is not one
    of the model's :func:`inference_options` is a ValueError naming it and listing the valid
    ones; a value of the wrong type or a bad choice a
    :class:`pyface.train.config.ConfigError` (a ValueError) naming ``model.KEY``, checked on
    the model's default config (what depends on the checkpoint's config is checked by
    :func:`load`). Nothing is read."""
    from pyface.train.config import from_dict
    from pyface.train.model import option_value, with_options

    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options: expected a dict of inference options, got "
                        f"{type(options).__name__}")
    cls = model_class(name)
    valid = tuple(getattr(cls, "inference_options", ()) or ())
    out: dict[str, Any] = {}
    for key, value in options.items():
        field = key[len("model."):] if isinstance(key, str) and key.startswith("model.") else key
        if field not in valid:
            listed = ", ".join(f"model.{k}" for k in valid) if valid else "none"
            raise ValueError(f"options: {key!r} is not an inference option of model {name!r} "
                             f"(set when it was trained; only the inference options may change "
                             f"on a trained model); valid: {listed}")
        if field in out:
            raise ValueError(f"options: model.{field} given twice (as {key!r} too)")
        out[field] = value
    if out:     # converted as config values: a nested key's errors name model.A.B.KEY
        cfg = from_dict(cls.Config, with_options({}, out), prefix="model.")
        out = {k: option_value(cfg, k) for k in out}
    return out


def load(name: str, checkpoint: str, *, device: str | torch.device | None = None,
         ema: bool = True, weights: dict[str, str] | None = None, compile=None,
         options: dict[str, Any] | None = None):
    """The inference pipeline of model ``name`` with the weights of ``checkpoint``.

    Args:
        name: a registered model (:func:`names`).
        checkpoint: a run folder (its latest checkpoint is used), a training checkpoint folder or
            a weights folder written by a converter; read safely (no code is executed).
        device: None (CUDA when available, else CPU), or a device.
        ema: use the EMA weights where the run kept an EMA copy.
        weights: pretrained networks the pipeline's source encoding uses, name -> path (e.g.
            OTAvatar's inversion: ``{"vgg": PATH, "arcface": PATH}``); they replace the
            checkpoint's. A model whose pipeline uses none refuses them (ValueError).
        compile: None / ``"off"`` (default), or a mode of
            :data:`pyface.nn.compiling.COMPILE_CHOICES` (``"default"``: Inductor; ``True``
            means ``"default"``): the pipeline's heavy modules are compiled in place
            (:meth:`~pyface.train.model.Pipeline.compile`; the first frames are slow while
            they compile, later ones faster). Checked before the checkpoint is read.
        options: inference options of the trained model, ``{key: value}`` (a key with or
            without ``model.``, e.g. ``{"pti_steps": 50}`` for OTAvatar, ``{"model.sr_noise":
            "random"}`` for GOHA; a field of a nested config by its dotted path, e.g.
            ``{"generator.render.depth_resolution": 96}`` for EG3D): they replace the
            checkpoint's values of those config fields before the model is built (a model's own
            ``load_pipeline`` gets them checked, as ``options=``). Only the model's declared :func:`inference_options`
            (fields that change no weights); anything else is a ValueError naming the key and
            listing the valid ones; a value is converted like a config value (a wrong type or
            a bad choice: a ValueError naming ``model.KEY``). See :func:`check_options`.

    ``checkpoint``, ``device``, ``ema``, ``compile`` and ``options`` are checked before the
    checkpoint is read: a TypeError / ValueError naming the argument (e.g. ``device="gpu"``, or
    ``"cuda"`` on a machine without CUDA).

    Raises KeyError (unknown name), ValueError (the model has no pipeline, or the checkpoint
    belongs to another model: :class:`pyface.train.model.WrongModelError`, a CheckpointError
    too) and :class:`pyface.checkpoint.CheckpointError` (missing, corrupt
    or mismatching checkpoint).
    """
    from pyface import checkpoint as ckpt
    from pyface.nn.compiling import parse_compile
    from pyface.train.config import ConfigError, from_dict, saved_config
    from pyface.train.model import (WrongModelError, read_pretrained, resolve_device,
                                    with_options)

    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint: expected a path (a run, checkpoint or converted weights "
                        f"folder), got {type(checkpoint).__name__}")
    checkpoint = os.fspath(checkpoint)
    resolve_device(device)
    if not isinstance(ema, bool):
        raise TypeError(f"ema: expected True or False, got {ema!r}")
    compiling = parse_compile(compile, what="compile")
    opts = check_options(name, options)
    cls = model_class(name)
    if getattr(cls, "Pipeline", None) is None:
        raise ValueError(f"model {name!r} has no inference pipeline ({cls.__name__}.Pipeline is "
                         "None)")
    custom = getattr(cls, "load_pipeline", None)
    takes = custom is not None and "weights" in inspect.signature(custom).parameters
    if weights and not takes:
        raise ValueError(f"weights: model {name!r}'s pipeline uses no pretrained networks, got "
                         f"{sorted(weights)}")
    if opts and (custom is not None
                 and "options" not in inspect.signature(custom).parameters):
        raise ValueError(f"options: model {name!r}'s load_pipeline takes no options, got "
                         f"{sorted(opts)}")
    if custom is not None:     # a model whose weights also come from converted release folders
        return _compiled(custom(checkpoint, device=device, ema=ema,
                                **({"weights": dict(weights)} if weights else {}),
                                **({"options": opts} if opts else {})), compiling)
    pre = read_pretrained(checkpoint, ema=ema)
    if pre.model is not None and pre.model != name:
        raise WrongModelError(pre.path, pre.meta, name)
    saved = saved_config(cls.Config, pre.config)
    try:
        cfg = from_dict(cls.Config, saved, prefix="model.")
    except ConfigError as exc:
        raise ckpt.CheckpointError(f"checkpoint {pre.path!r}: its model config does not fit "
                                   f"{cls.__name__}.Config: {exc}") from None
    if opts:    # the saved config with the inference options replaced (errors name model.KEY)
        cfg = from_dict(cls.Config, with_options(saved, opts), prefix="model.")
        check = getattr(cls, "check_option_values", None)
        if check is not None:   # the options with the saved values (a clash names the option)
            check(cfg, opts)
        log.info("inference options of %s: %s", name, opts)
    _relocate_stages(cls, cfg, pre.path)
    model = cls(cfg)
    ckpt.load_module_state(model, pre.state, f"checkpoint {pre.path!r}")
    log.info("loaded %s from %s%s", name, pre.path, " (EMA weights)" if ema else "")
    return _compiled(cls.Pipeline(model, device=device), compiling)


def _compiled(pipe, options):
    """``pipe`` with its heavy modules compiled (``options``: None leaves it as it is)."""
    if options is not None:
        if not callable(getattr(pipe, "compile", None)):
            raise ValueError(f"compile: {type(pipe).__name__} (the model's pipeline) has no "
                             "compile(); a pyface.train.model.Pipeline has")
        done = pipe.compile(options)
        log.info("compiled %s of %s (%s)", ", ".join(done) or "nothing", type(pipe).__name__,
                 options.describe())
    return pipe


def _relocate_stages(cls, cfg, checkpoint_folder: str) -> None:
    """A stage run recorded at a path that no longer exists (the run folder was moved, or the
    path was relative to another working directory) is taken from the run folder itself,
    ``<run>/stages/<name>``, where ``pyface train`` puts it. Found in neither place: a
    :class:`~pyface.checkpoint.CheckpointError` naming the stage's config key and both paths
    (the model is built from the stage's checkpoint)."""
    from pyface.checkpoint import CheckpointError

    run = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_folder)))
    for stage in getattr(cls, "stages", ()) or ():
        path = getattr(cfg, stage.checkpoint_key, None)
        local = os.path.join(run, "stages", stage.name)
        if path and not os.path.exists(path):
            if not os.path.isdir(local):
                raise CheckpointError(
                    f"checkpoint {checkpoint_folder!r}: its stage {stage.name!r} "
                    f"(model.{stage.checkpoint_key} = {path!r}) does not exist, nor does "
                    f"{local!r}; the model is built from it: put the stage's run back at either "
                    "path")
            log.info("stage %r: %s not found; using %s", stage.name, path, local)
            setattr(cfg, stage.checkpoint_key, local)
