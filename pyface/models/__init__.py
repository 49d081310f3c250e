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

import torch

log = logging.getLogger("pyface.models")

__all__ = ["load", "names", "model_class"]


def names() -> list[str]:
    """Every registered model, plugins (entry-point group ``pyface.models``) included."""
    from pyface.train.registry import model_names

    return model_names()


def model_class(name: str):
    """The registered TrainableModel class ``name`` (imported now)."""
    from pyface.train.registry import model_class as resolve

    return resolve(name)


def load(name: str, checkpoint: str, *, device: str | torch.device | None = None,
         ema: bool = True, weights: dict[str, str] | None = None, compile=None):
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

    ``checkpoint``, ``device``, ``ema`` and ``compile`` are checked before the checkpoint is
    read: a TypeError / ValueError naming the argument (e.g. ``device="gpu"``, or ``"cuda"`` on
    a machine without CUDA).

    Raises KeyError (unknown name), ValueError (the model has no pipeline, or the checkpoint
    belongs to another model: :class:`pyface.train.model.WrongModelError`, a CheckpointError
    too) and :class:`pyface.checkpoint.CheckpointError` (missing, corrupt
    or mismatching checkpoint).
    """
    from pyface import checkpoint as ckpt
    from pyface.nn.compiling import parse_compile
    from pyface.train.config import ConfigError, from_dict, saved_config
    from pyface.train.model import WrongModelError, read_pretrained, resolve_device

    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint: expected a path (a run, checkpoint or converted weights "
                        f"folder), got {type(checkpoint).__name__}")
    checkpoint = os.fspath(checkpoint)
    resolve_device(device)
    if not isinstance(ema, bool):
        raise TypeError(f"ema: expected True or False, got {ema!r}")
    options = parse_compile(compile, what="compile")
    cls = model_class(name)
    if getattr(cls, "Pipeline", None) is None:
        raise ValueError(f"model {name!r} has no inference pipeline ({cls.__name__}.Pipeline is "
                         "None)")
    custom = getattr(cls, "load_pipeline", None)
    takes = custom is not None and "weights" in inspect.signature(custom).parameters
    if weights and not takes:
        raise ValueError(f"weights: model {name!r}'s pipeline uses no pretrained networks, got "
                         f"{sorted(weights)}")
    if custom is not None:     # a model whose weights also come from converted release folders
        return _compiled(custom(checkpoint, device=device, ema=ema,
                                **({"weights": dict(weights)} if weights else {})), options)
    pre = read_pretrained(checkpoint, ema=ema)
    if pre.model is not None and pre.model != name:
        raise WrongModelError(pre.path, pre.meta, name)
    try:
        cfg = from_dict(cls.Config, saved_config(cls.Config, pre.config), prefix="model.")
    except ConfigError as exc:
        raise ckpt.CheckpointError(f"checkpoint {pre.path!r}: its model config does not fit "
                                   f"{cls.__name__}.Config: {exc}") from None
    _relocate_stages(cls, cfg, pre.path)
    model = cls(cfg)
    ckpt.load_module_state(model, pre.state, f"checkpoint {pre.path!r}")
    log.info("loaded %s from %s%s", name, pre.path, " (EMA weights)" if ema else "")
    return _compiled(cls.Pipeline(model, device=device), options)


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
