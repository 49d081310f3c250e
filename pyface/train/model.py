"""What a model supplies to the training engine.

A trainable model is an ``nn.Module`` subclass of :class:`TrainableModel` that provides

* ``Config``: its typed config dataclass (``model.*`` keys in YAML / ``--set``);
* ``build_optimizers()``: named optimizers over its parameters;
* ``phases()``: the optimisation phases of one step (default: one phase ``"main"``), each with its
  optimizer, an interval for lazy regularisation (EG3D: ``Phase("Dreg", "D", interval=16)``) and
  the sub-modules it freezes;
* ``step(phase, batch, ctx)``: the losses of one phase, a dict with the total under ``"loss"``
  (other entries are logged); inner loops apply updates with ``ctx.update(optimizer, loss)`` and
  read EMA copies with ``ctx.ema(name)``;
* optionally ``preview(batch)`` (image grids) and ``preview_video(batch)`` (a short clip);
* optionally ``presets`` (named configs: ``pyface train M --preset tiny``), ``stages`` (earlier
  models this one is built on, trained first) and ``Pipeline`` (its inference pipeline, used by
  :func:`pyface.models.load` and ``pyface animate``);
* optionally ``compile_modules``: the sub-modules ``train.compile`` compiles.

The engine does everything else: devices, distribution, precision, clipping, NaN guard, EMA,
schedules, checkpoints, logging and previews.
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pyface.checkpoint import CheckpointError


class ModelDefinitionError(TypeError, ValueError):
    """A model class (a plugin's, typically) that does not follow the :class:`TrainableModel`
    contract: the message names the class, the attribute or method and what it should be.
    ``pyface train`` reports it in one line and exits with code 2. A TypeError (a wrong kind of
    object) and a ValueError, so every command that reports bad input in one line reports it."""


@dataclass(frozen=True)
class Phase:
    """One optimisation phase: ``step(name, ...)`` runs every ``interval`` steps and the
    ``"loss"`` it returns updates ``optimizer``. A lazy regulariser should scale its loss by
    ``interval`` itself.

    Attributes:
        name: passed to ``step``; prefixes the logged values.
        optimizer: the optimizer the returned ``"loss"`` updates (a tuple of names: several,
            from one backward), or None when ``step`` applies all its updates itself through
            ``ctx.update`` (``"loss"`` is then only logged).
        interval: run every ``interval`` steps.
        frozen: names of sub-modules (``model.get_submodule``) whose parameters do not require
            grad during this phase (restored after it): they get no gradients and are neither
            all-reduced nor updated.
        overlap: on several ranks, let the gradient all-reduce overlap the backward (bucketed
            hooks, ``train.overlap_grad_reduce``); False forces one flat all-reduce after it.
            Results are identical either way.
    """
    name: str
    optimizer: str | tuple[str, ...] | None
    interval: int = 1
    frozen: tuple[str, ...] = ()
    overlap: bool = True

    def __post_init__(self):
        where = f"Phase({self.name!r}, ...)"
        if not isinstance(self.name, str) or not self.name:
            raise ModelDefinitionError(f"Phase: name must be a non-empty string, got "
                                       f"{self.name!r}")
        opt = self.optimizer
        if not (opt is None or isinstance(opt, str) or (
                isinstance(opt, tuple) and opt and all(isinstance(o, str) for o in opt))):
            raise ModelDefinitionError(f"{where}: optimizer must be a name, a tuple of names or "
                                       f"None, got {opt!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) \
                or self.interval < 1:
            raise ModelDefinitionError(f"{where}: interval must be an int >= 1 (run every "
                                       f"interval steps), got {self.interval!r}")
        if isinstance(self.frozen, str) or not all(isinstance(f, str) for f in self.frozen):
            raise ModelDefinitionError(f"{where}: frozen must be a tuple of sub-module names, "
                                       f"got {self.frozen!r}"
                                       + (f" (write ({self.frozen!r},))"
                                          if isinstance(self.frozen, str) else ""))
        object.__setattr__(self, "frozen", tuple(self.frozen))


@dataclass
class StepContext:
    """What ``step`` may need besides the batch.

    Inside the engine it also applies in-step updates (``update``) and hands out EMA copies
    (``ema``); a context built by hand (``engine=None``) has neither.
    """
    step: int
    images_seen: int          # global images before this step (EG3D's cur_nimg)
    batch_size: int           # global batch size
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    phase: str = ""           # the phase being run
    engine: Any = field(default=None, repr=False, compare=False)

    @property
    def kimg(self) -> float:
        return self.images_seen / 1000.0

    def update(self, optimizer: str | tuple[str, ...], loss: torch.Tensor, *,
               retain_graph: bool = False, lr_scale: float = 1.0) -> torch.Tensor:
        """Apply one update of optimizer ``optimizer`` now, inside ``step``.

        ``optimizer``: a name, or a tuple of names to step several optimizers from one backward
        (e.g. OTAvatar's latent and intrinsics, or its controller and generator: stepping one
        and then back-propagating the same graph into the other would find the first one's
        parameters modified in place).
        ``loss``: a scalar tensor (this rank's share of the batch). The engine back-propagates it
        into that optimizer's parameters only (other parameters' ``.grad`` stay untouched),
        averages the gradients over ranks, applies the NaN / grad-norm guard, the group and
        optimizer clipping, steps the optimizer and sets its gradients to None, exactly as for a
        phase's final loss. ``retain_graph=True`` keeps the graph for another backward through it.
        ``lr_scale``: this update steps with every param group's learning rate times
        ``lr_scale`` (a finite number > 0; 1: the rates as the schedule set them), restored
        right after the step, so the rates the schedule sets, the logged ``lr/*`` and the
        optimizer state a checkpoint saves are unchanged (e.g. OTAvatar's controller at a
        reference-rule rate in its inversion iterations).

        Parameters of a param group with ``"local": True`` are rank-local (e.g. one latent per
        sample of this rank's share of the batch): they are not averaged over ranks; their
        gradient is divided by the number of ranks (the gradient of the global loss, the mean of
        the ranks' losses) and their norm, for the guard and for clipping, is taken over all
        ranks, so N ranks compute what one process does with the whole batch.

        Returns the gradient norm before clipping (a 0-dim tensor; over all the named
        optimizers' parameters, after averaging over ranks).
        """
        if self.engine is None:
            raise RuntimeError("ctx.update: this StepContext is not attached to a Trainer; "
                               "in-step updates run inside Trainer.train_step only")
        return self.engine._apply_update(optimizer, loss, phase=self.phase, inner=True,
                                         retain_graph=retain_graph, lr_scale=lr_scale)

    def reset_optimizer(self, optimizer: str) -> None:
        """Clear optimizer ``optimizer``'s state (moments, step counts), e.g. before an inner
        loop that starts afresh on every batch."""
        if self.engine is None:
            raise RuntimeError("ctx.reset_optimizer: this StepContext is not attached to a "
                               "Trainer")
        self.engine.reset_optimizer(optimizer)

    def ema(self, name: str) -> nn.Module:
        """The EMA copy of sub-module ``name`` (``train.ema.modules``), or the live sub-module
        when it has no EMA. The copy is in eval mode and does not require grad; gradients
        still flow through it to its inputs (e.g. a latent inverted with the EMA generator)."""
        if self.engine is None:
            raise RuntimeError("ctx.ema: this StepContext is not attached to a Trainer")
        return self.engine.ema_module(name)


@dataclass(frozen=True)
class Stage:
    """An earlier training stage a model is built on.

    The stage is trained as the registered model ``model``; this model's config has a field
    ``checkpoint_key: str | None`` naming that run (a run folder or checkpoint folder, read with
    :func:`load_pretrained`). ``pyface train M --preset P`` trains every stage whose key is empty
    first (with the same preset, in ``<run_dir>/stages/<name>``), then sets the key to its run.

    ``presets``: per preset name of M, a config ``{"model": {...}, "data": {...}, "train":
    {...}}`` merged above the stage model's own preset of that name when M trains the stage
    (e.g. OTAvatar's ``tiny`` trains its EG3D stage on backgrounds), so M's preset can set up
    its stage without changing the stage model's preset.
    """
    name: str
    model: str
    checkpoint_key: str
    presets: dict = field(default_factory=dict, hash=False, compare=False)


class TrainableModel(nn.Module):
    """Base class of models trained by :class:`pyface.train.Trainer`."""

    Config: type = None  # the config dataclass
    #: experiment defaults of this model's recipe (``{"data": {...}, "train": {...}}``), applied
    #: below the preset, the YAML file and ``--set`` overrides.
    recipe: dict = {}
    #: named configs ``{"tiny": {"model": {...}, "data": {...}, "train": {...}}, ...}`` applied
    #: above ``recipe`` and below ``--config`` / ``--set`` (``pyface train M --preset tiny``).
    #: Every portrait model has ``tiny`` (2-core CPU, <= 10 minutes), ``gpu-short`` (about 8
    #: minutes on one H100/H200) and ``full`` (paper scale).
    presets: dict[str, dict] = {}
    #: earlier stages trained first when their checkpoint key is empty (see :class:`Stage`).
    stages: tuple[Stage, ...] = ()
    #: the inference pipeline class (a :class:`Pipeline` subclass) or None.
    Pipeline: type | None = None
    #: the name of a ``Config`` field that holds this rank's share of the global batch (a model
    #: with rank-local parameters of one row per item, e.g. OTAvatar's inverted latents), or
    #: None. The Trainer sets the field, when it is None, to ``train.batch_size / world size``
    #: before it builds the model (so ``config.yaml`` and the checkpoints record the number);
    #: an explicit value below that share is an error naming both.
    local_batch_field: str | None = None
    #: the sub-modules ``train.compile`` compiles (dotted names for ``get_submodule``; ``""``
    #: is the model itself; a name whose attribute is None is skipped): the modules most of a
    #: step's time is spent in, whose ``__call__`` the step uses (a method such as
    #: ``G.synthesis(...)`` other than ``forward`` is not compiled through its module; name the
    #: modules it calls). ``"ema.<module>.<path>"`` names a sub-module of the engine's EMA copy
    #: of ``<module>`` (``train.ema.modules``), for a model whose step runs an EMA copy (OTAvatar
    #: inverts with the EMA generator); skipped when that module has no EMA copy. Leave out
    #: modules whose graphs take a gradient of a gradient (an R1 penalty's discriminator):
    #: AOTAutograd has no double backward. Naming a module whose ``forward`` is torch's own (an
    #: ``nn.Sequential`` of ``nn`` layers) is an error (TorchDynamo would skip it and leave it
    #: uncompiled); name the model's own module that calls it. Empty:
    #: ``train.compile`` warns and compiles nothing.
    compile_modules: tuple[str, ...] = ()
    #: the ``Config`` fields that only inference reads and that change no weights or parameter
    #: shapes (how a source is encoded, how frames are rendered): ``pyface.models.load(...,
    #: options={...})`` and ``pyface animate / pyface eval --option KEY=VALUE`` may set them on
    #: a trained model; every other field comes from the checkpoint. A field of a nested config
    #: dataclass is named by its dotted path (``"generator.render.depth_resolution"``,
    #: :func:`option_path`). Empty: none.
    inference_options: tuple[str, ...] = ()

    @classmethod
    def check_option_values(cls, cfg, options: dict) -> None:
        """``options`` (inference options, ``{key: value}`` without ``model.``) set in a saved
        config, ``cfg`` (the complete config with them), checked against the saved values
        before the model is built (``pyface.models.load``), so that a clash names the key that
        was set where the model's own checks, which cannot tell given from saved values, would
        name the other one (GOHA: importance samples given for a run saved with fewer than 4
        coarse samples). A ValueError naming ``model.KEY``; the default checks nothing."""

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        return [Phase("main", "main")]

    def step(self, phase: str, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def label_pools(self) -> tuple[str, ...]:
        """Item keys whose values over the whole training dataset this model draws from (e.g.
        EG3D's ``gen_c_source="dataset"``: the generator's cameras drawn from every item's
        ``camera``), or ``()`` (default). Once the dataset is built the Trainer stacks each
        key's value of every item, in item order, into a tensor ``(len(dataset), ...)`` and
        hands it to :meth:`set_label_pool`; a dataset with an ``item_labels(key)`` method gives
        them without decoding images, any other is read item by item. Every rank builds the
        same pool from the same dataset; it is not saved in checkpoints (rebuilt on resume)."""
        return ()

    def label_pool_shape(self, key: str) -> tuple[int, ...] | None:
        """The shape every item's ``key`` of :meth:`label_pools` must have (e.g. EG3D's
        ``camera``: ``(25,)``), checked on the dataset's first item before the pool is built
        (a dataset of another kind is refused before its items are read), or None (default:
        any shape, the same for every item)."""
        return None

    def set_label_pool(self, key: str, labels: torch.Tensor) -> None:
        """Keeps ``labels`` (``(N, ...)``, every item's ``key``) as the non-persistent buffer
        ``label_pool_<key>``: it moves with ``.to(device)`` and is not in ``state_dict()``."""
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"set_label_pool: key: expected an item key usable as a name, got "
                             f"{key!r}")
        if not isinstance(labels, torch.Tensor) or labels.ndim < 1 or not len(labels):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) \
                else type(labels).__name__
            raise ValueError(f"set_label_pool({key!r}): expected a tensor (N, ...) with N > 0, "
                             f"got {got}")
        self.register_buffer(f"label_pool_{key}", labels, persistent=False)

    def label_pool(self, key: str) -> torch.Tensor | None:
        """The pool :meth:`set_label_pool` set for ``key``, or None."""
        return self._buffers.get(f"label_pool_{key}")

    def data_transform(self):
        """A picklable per-item function ``fn(item) -> item`` that the engine applies to every
        dataset item in the loader's workers (data preparation that belongs beside the loading,
        e.g. renders computed from an item's coefficients), or None (default)."""
        return None

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """Named image batches (N, 3, H, W) in [-1, 1] shown side by side as one grid per row."""
        return {}

    @torch.no_grad()
    def preview_video(self, batch: dict, frames: int) -> torch.Tensor | None:
        """(T, 3, H, W) in [-1, 1], or None."""
        return None


def check_model_class(cls, name: str | None = None) -> None:
    """Checks what the engine needs from a model class before anything is built, so a mistake
    in a model (a plugin's) is an error naming it instead of a traceback deep in the engine:
    a :class:`TrainableModel` subclass, ``Config`` a dataclass, ``build_optimizers`` and
    ``step`` defined, ``__init__(self, cfg)``, ``recipe`` / ``presets`` dicts (each preset a
    dict), ``stages`` :class:`Stage` objects, ``Pipeline`` a :class:`Pipeline` subclass or
    None, ``local_batch_field`` a field of ``Config`` or None, ``compile_modules`` a tuple of
    sub-module names (strings), ``inference_options`` a tuple of (dotted) ``Config`` field
    paths (:func:`option_path`), none inside another.

    Raises :class:`ModelDefinitionError`."""
    import dataclasses
    import inspect

    what = f"model {name!r}" if name else "model"
    if not (isinstance(cls, type) and issubclass(cls, TrainableModel)):
        kind = f"class {cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) \
            else f"a {type(cls).__name__}"
        raise ModelDefinitionError(f"{what}: the registered target is {kind}, not a subclass of "
                                   "pyface.train.TrainableModel")
    label = f"{what} ({cls.__qualname__})" if name else cls.__qualname__
    cfg = cls.Config
    if not (isinstance(cfg, type) and dataclasses.is_dataclass(cfg)):
        got = "None (not set)" if cfg is None else (
            f"class {cfg.__qualname__}, not a dataclass" if isinstance(cfg, type)
            else f"an instance of {type(cfg).__name__}, not a class")
        raise ModelDefinitionError(f"{label}: Config must be a @dataclass class (its fields are "
                                   f"the model.* keys); got {got}")
    required = [f.name for f in dataclasses.fields(cfg)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise ModelDefinitionError(f"{label}: every field of Config ({cfg.__qualname__}) needs a "
                                   f"default (the model.* keys are optional); no default: "
                                   f"{', '.join(required)}")
    for meth, sig in (("build_optimizers", "build_optimizers(self) -> {name: optimizer}"),
                      ("step", "step(self, phase, batch, ctx) -> {'loss': tensor, ...}")):
        if getattr(cls, meth, None) is getattr(TrainableModel, meth):
            raise ModelDefinitionError(f"{label}: does not define {sig}")
    try:
        inspect.signature(cls).bind(object())
    except TypeError as exc:
        raise ModelDefinitionError(f"{label}: __init__ must take the config as its one "
                                   f"argument, __init__(self, cfg) ({exc})") from None
    except ValueError:          # no signature to inspect (a C type): let the call tell
        pass
    if not isinstance(cls.recipe, dict):
        raise ModelDefinitionError(f"{label}: recipe must be a dict of sections (model, data, "
                                   f"train), got {type(cls.recipe).__name__}")
    if not isinstance(cls.presets, dict):
        raise ModelDefinitionError(f"{label}: presets must be a dict {{name: config dict}}, "
                                   f"got {type(cls.presets).__name__}")
    for pname, preset in cls.presets.items():
        if not isinstance(preset, dict):
            raise ModelDefinitionError(f"{label}: preset {pname!r} must be a dict of sections "
                                       f"(model, data, train), got {type(preset).__name__}")
    stages = cls.stages
    if not isinstance(stages, (tuple, list)) or not all(isinstance(s, Stage) for s in stages):
        raise ModelDefinitionError(f"{label}: stages must be a tuple of "
                                   f"pyface.train.model.Stage, got {stages!r}")
    fields = {f.name for f in dataclasses.fields(cfg)}
    for s in stages:
        if s.checkpoint_key not in fields:
            raise ModelDefinitionError(f"{label}: stage {s.name!r} stores its run in "
                                       f"model.{s.checkpoint_key}, which is not a field of "
                                       f"{cfg.__qualname__} (add '{s.checkpoint_key}: str | "
                                       "None = None')")
    pipe = cls.Pipeline
    if pipe is not None and not (isinstance(pipe, type) and issubclass(pipe, Pipeline)):
        raise ModelDefinitionError(f"{label}: Pipeline must be a subclass of "
                                   f"pyface.train.model.Pipeline or None, got {pipe!r}")
    if pipe is not None:
        for meth, sig in (("encode_source", "encode_source(self, source)"),
                          ("encode_driving", "encode_driving(self, driving)"),
                          ("generate", "generate(self, state, motion, **controls)")):
            if getattr(pipe, meth) is getattr(Pipeline, meth):
                raise ModelDefinitionError(f"{label}: its Pipeline {pipe.__qualname__} does not "
                                           f"define {sig}")
    lbf = cls.local_batch_field
    if lbf is not None and lbf not in fields:
        raise ModelDefinitionError(f"{label}: local_batch_field {lbf!r} is not a field of "
                                   f"{cfg.__qualname__}")
    names = cls.compile_modules
    if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
        hint = f" (write ({names!r},))" if isinstance(names, str) else ""
        raise ModelDefinitionError(f"{label}: compile_modules must be a tuple of sub-module "
                                   f"names (strings) for train.compile, got {names!r}{hint}")
    opts = cls.inference_options
    if not isinstance(opts, tuple) or not all(isinstance(n, str) for n in opts):
        hint = f" (write ({opts!r},))" if isinstance(opts, str) else ""
        raise ModelDefinitionError(f"{label}: inference_options must be a tuple of (dotted) "
                                   f"Config field names, got {opts!r}{hint}")
    for key in opts:
        try:
            option_path(cfg, key)
        except ValueError as exc:
            raise ModelDefinitionError(f"{label}: {exc}") from None
        inside = [o for o in opts if o.startswith(key + ".")]
        if inside:
            raise ModelDefinitionError(f"{label}: inference option {key!r} contains the "
                                       f"inference option {inside[0]!r} (name the fields "
                                       f"inside, or the whole, not both)")


# --------------------------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------------------------

@dataclass
class Pretrained:
    """What :func:`read_pretrained` found: the checkpoint folder, the trained model's registered
    name (a weights folder's ``kind``), its config dict and state dict, and the meta."""
    path: str
    model: str | None
    config: dict
    state: dict
    meta: dict


def checkpoint_contents(meta: dict) -> str:
    """What a checkpoint folder's ``meta`` says it holds, for messages: "model 'goha' (a training
    checkpoint of step 5)", "model 'goha' (converted weights, kind 'goha')", "'vgg19' weights
    (kind 'vgg19', not a model)"."""
    kind = meta.get("kind")
    if kind == "train":
        model = (meta.get("experiment") or {}).get("model")
        return (f"model {model!r} (a training checkpoint of step {meta.get('step')})" if model
                else f"a training checkpoint of step {meta.get('step')} that names no model")
    model = meta.get("model") or kind
    if not model:
        return "no model (its meta.json names no kind)"
    try:
        from pyface.train.registry import model_names

        registered = model in model_names()
    except Exception:  # noqa: BLE001 - a broken plugin: described without the registry
        registered = False
    return (f"model {model!r} (converted weights, kind {kind!r})" if registered
            else f"{kind!r} weights (kind {kind!r}, not a model)")


def checkpoint_sources(model: str, also: str = "") -> str:
    """What model ``model``'s loader takes, for messages: its runs and training checkpoints, and
    the folders of ``pyface convert MODEL`` where there is such a converter; ``also``: more."""
    text = f"a run folder or training checkpoint of {model!r} (pyface train {model})"
    try:
        from pyface.convert import CONVERTERS

        source = CONVERTERS[model][1].split(" -> ")[0] if model in CONVERTERS else None
    except ImportError:
        source = None
    if source:
        text += f" or a pyface convert {model} folder (converted from the {source})"
    return text + (f" or {also}" if also else "")


class WrongModelError(CheckpointError, ValueError):
    """A checkpoint of another model (or of none) given to model ``model``'s loader. A
    :class:`~pyface.checkpoint.CheckpointError` and a ValueError (the loaders raised one or the
    other). ``path``: the checkpoint folder read (a run folder's latest checkpoint);
    :meth:`for_option` words the message for the command-line option that named it."""

    def __init__(self, path: str, meta: dict, model: str, also: str = ""):
        self.path = path
        self.detail = (f"holds {checkpoint_contents(meta)}, not {model!r}: expected "
                       f"{checkpoint_sources(model, also)}")
        super().__init__(f"checkpoint {path!r} {self.detail}")

    def for_option(self, option: str, given: str) -> str:
        """``--checkpoint runs/goha (its latest checkpoint .../ckpt-000005): holds ...``
        (``option`` ending in ``=``, e.g. ``--runs goha=``, is followed by ``given`` directly)."""
        same = os.path.normpath(os.path.abspath(given)) == os.path.normpath(
            os.path.abspath(self.path))
        return (f"{option}{'' if option.endswith('=') else ' '}{given}"
                f"{'' if same else f' (its latest checkpoint {self.path})'}: {self.detail}")


def resolve_checkpoint(path: str) -> str:
    """A run folder (``path/checkpoints/``) -> its latest checkpoint; a checkpoint folder -> itself.

    Raises :class:`pyface.checkpoint.CheckpointError` naming ``path`` when neither."""
    from pyface import checkpoint as ckpt

    if os.path.isdir(os.path.join(path, "checkpoints")):
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise ckpt.CheckpointError(f"run folder {path!r} holds no complete checkpoint yet "
                                       f"({os.path.join(path, 'checkpoints')} is empty)")
        return latest
    if os.path.isfile(os.path.join(path, ckpt.META_FILE)):
        return path
    raise ckpt.CheckpointError(f"checkpoint {path!r}: expected a run folder (with checkpoints/) "
                               f"or a checkpoint folder (with {ckpt.META_FILE} and "
                               f"{ckpt.TENSORS_FILE})" + ckpt.not_a_folder_hint(path))


def read_pretrained(path: str, *, ema: bool = True,
                    device: str | torch.device = "cpu") -> Pretrained:
    """Reads a run folder, a training checkpoint or a weights folder (``save_weights``) safely
    (safetensors + JSON; nothing is executed). With ``ema`` the EMA copies of a training
    checkpoint replace the live weights of their sub-modules in the returned state dict."""
    from pyface import checkpoint as ckpt

    folder = resolve_checkpoint(path)
    tensors, meta = ckpt.load_folder(folder, device=device)
    if meta.get("kind") == "train":
        exp = meta.get("experiment") or {}
        config = dict(exp.get("model_config") or {})
        state = ckpt.sub_state(tensors, "model")
        if ema:
            for name in meta.get("ema_modules") or []:
                for k, v in ckpt.sub_state(tensors, f"ema.{name}").items():
                    key = f"{name}.{k}"
                    if key not in state:
                        raise ckpt.CheckpointError(
                            f"checkpoint {folder!r}: EMA entry ema.{key} has no live weight "
                            f"model.{key}")
                    state[key] = v
        return Pretrained(folder, exp.get("model"), config, state, meta)
    # a weights-only folder written by a converter (pyface.checkpoint.save_weights): its kind
    # names the model ("eg3d")
    return Pretrained(folder, meta.get("model") or meta.get("kind"),
                      dict(meta.get("config") or {}), dict(tensors), meta)


def config_from_dict(config_cls, data: dict, *, prefix: str = "model."):
    """A model config dataclass from a (nested) dict, e.g. the one :func:`load_pretrained`
    returns; unknown keys and wrong types raise ``pyface.train.config.ConfigError`` naming the
    key. ``data`` is a saved config: the fields it lacks that ``config_cls.saved_before``
    lists get those values (the behaviour of runs saved before the field,
    :func:`pyface.train.config.saved_config`), the others their defaults."""
    from pyface.train.config import from_dict, saved_config

    return from_dict(config_cls, saved_config(config_cls, data), prefix=prefix)


def option_path(config_cls, key: str) -> tuple[str, ...]:
    """The field names along inference option ``key`` of config dataclass ``config_cls``: a
    field name (``"pti_steps"``) or a dotted path through nested config dataclasses
    (``"generator.render.depth_resolution"``: ``EG3DConfig.generator`` ->
    ``EG3DGeneratorConfig.render`` -> ``RenderConfig.depth_resolution``), or into a mapping
    field that declares its keys (``field(metadata={"keys_of": C, "fixed": (...)})``,
    :func:`pyface.train.config.from_dict`): ``"render.depth_resolution"`` of OTAvatar's
    ``render`` overrides, a field of ``C`` other than the ``fixed`` ones. A part that is not a
    field (or is a fixed key), or a field on the way whose type is neither a config dataclass
    nor such a mapping, is a ValueError naming ``key`` and the part."""
    import dataclasses
    import typing

    if not isinstance(key, str) or not key:
        raise ValueError(f"inference option: expected a config field name, got {key!r}")
    parts = tuple(key.split("."))
    cls, fixed = config_cls, ()
    for i, part in enumerate(parts):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ValueError(f"inference option {key!r}: {'.'.join(parts[:i])} is not a config "
                             f"dataclass (a nested key goes through config dataclasses and "
                             f"mappings that declare keys_of only)")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}
        if part not in fields:
            why = " (fixed: it cannot be overridden)" if part in fixed else ""
            raise ValueError(f"inference option {key!r}: {part!r} is not a field of "
                             f"{cls.__qualname__}{why}; its fields: "
                             f"{', '.join(sorted(fields))}")
        meta = fields[part].metadata
        if meta.get("keys_of") is not None:      # a mapping of the named dataclass's fields
            cls, fixed = meta["keys_of"], tuple(meta.get("fixed") or ())
        else:
            cls, fixed = typing.get_type_hints(cls).get(part), ()
    return parts


def option_value(cfg, key: str):
    """The value of (dotted) inference option ``key`` in config ``cfg`` (a dataclass; a part
    inside a ``keys_of`` mapping field is looked up in the mapping, None when absent)."""
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def with_options(data: dict | None, options: dict) -> dict:
    """A copy of the nested config dict ``data`` (a saved model config) with ``options``, a
    ``{key: value}`` of (dotted) field paths (:func:`option_path`), set in it: the mappings on
    each key's way are copied (``data`` is not changed) and made where ``data`` lacks them (a
    field saved without them takes its default for the rest). A key whose way runs through a
    saved value that is not a mapping is a ValueError naming it."""
    out = dict(data or {})
    for key, value in options.items():
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            sub = node.get(part)
            if sub is None:
                sub = {}
            elif not isinstance(sub, dict):
                raise ValueError(f"options: {key!r}: the saved config's "
                                 f"{'.'.join(parts[:i + 1])} is {sub!r}, not a mapping")
            node[part] = sub = dict(sub)
            node = sub
        node[parts[-1]] = value
    return out


def load_pretrained(path: str, *, ema: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(model_config_dict, state_dict)`` of a run folder (its latest checkpoint), a training
    checkpoint folder or a weights folder, read safely; with ``ema`` (default) the EMA weights
    replace the live ones where the run kept an EMA. For stage-2 models::

        cfg, state = load_pretrained(self.cfg.stage1_checkpoint)
        self.stage1 = Stage1Model(config_from_dict(Stage1Model.Config, cfg))
        self.stage1.load_state_dict(state)
        self.stage1.requires_grad_(False)
    """
    p = read_pretrained(path, ema=ema)
    return p.config, p.state



def load_registered(model: str, path: str, *, ema: bool = True,
                    device: str | torch.device | None = "cpu"):
    """The inference pipeline of another registered model ``model`` with the weights of
    ``path`` (:func:`pyface.models.load`, resolved through the registry by name), for a model
    built on it: OTAvatar fine-tunes the EG3D generator of an ``eg3d`` run or converted folder
    (``load_registered("eg3d", path).G``) without importing the ``eg3d`` package."""
    from pyface.models import load

    return load(model, path, device=device, ema=ema)

# --------------------------------------------------------------------------------------------
# Inference pipelines
# --------------------------------------------------------------------------------------------

#: frame-dict keys and their per-frame shapes (``None``: any size; checked and resized by
#: :meth:`Pipeline.prepare`)
FRAME_KEYS = {"image": (3, None, None), "camera": (25,), "coeffs": (257,),
              "landmarks": (None, 2), "mask": (1, None, None)}

_SHAPE_TEXT = {"image": "3, H, W", "camera": "25", "coeffs": "257", "landmarks": "68|478, 2",
               "mask": "1, H, W"}


#: how far a float image / mask may stray outside its range before :meth:`Pipeline.prepare`
#: calls it another convention (e.g. 0..255 floats), as a fraction of the range's half-width
#: (1.0 for an image in [-1, 1], 0.5 for a mask in [0, 1]). Resampling overshoots: bicubic
#: upsampling of a hard-edged [-1, 1] image reaches about +-1.8, so a caller who resized an
#: image themselves is not refused.
PIXEL_TOLERANCE = 1.0


def _check_pixels(value: torch.Tensor, what: str, bounds: tuple[float, float]) -> None:
    """An image or mask is uint8 (0..255) or float within ``bounds`` (finite); anything else
    (other integer types, 0..255 floats, NaN) is a ValueError naming ``what``."""
    lo, hi = bounds
    if value.dtype == torch.uint8:
        return
    if not value.is_floating_point():
        raise ValueError(f"{what}: expected float in [{lo:g}, {hi:g}] or uint8 (0..255), got "
                         f"dtype {str(value.dtype).replace('torch.', '')}")
    from pyface.ops._checks import has_values

    if value.numel() == 0 or not has_values(value):     # fake / meta: the shape is checked
        return
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what}: expected finite values in [{lo:g}, {hi:g}], got NaN or inf")
    vmin, vmax = (float(v) for v in torch.aminmax(value.detach().float()))
    slack = PIXEL_TOLERANCE * (hi - lo) / 2
    if vmin < lo - slack or vmax > hi + slack:
        hint = " (0..255 pixels: divide by 127.5 and subtract 1, or pass uint8)" \
            if hi == 1.0 and lo == -1.0 and vmax > 2 else ""
        raise ValueError(f"{what}: expected float values in [{lo:g}, {hi:g}], got "
                         f"[{vmin:.4g}, {vmax:.4g}]{hint}")
    if lo == -1.0 and vmin >= 0.0 and vmax > 0.5:     # bright, with no dark pixel: [0, 1]?
        import warnings

        warnings.warn(f"{what}: float values in [{vmin:.3g}, {vmax:.3g}], none negative: taken "
                      "as [-1, 1] pixels (a [0, 1] image, e.g. torchvision's to_tensor, comes "
                      "out washed out: pass 2 * image - 1, or uint8)", UserWarning, stacklevel=4)


def resolve_device(device, what: str = "device") -> torch.device:
    """The ``torch.device`` a pipeline runs on: ``None`` is CUDA when available, else the CPU;
    a string or ``torch.device`` is taken as it is. A string torch cannot parse (``"gpu"``), a
    value of another type, or a CUDA device this machine does not have is a ValueError /
    TypeError naming ``what``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"{what}: expected None, a string such as 'cpu' or 'cuda:0', or a "
                        f"torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{what}: expected None, 'cpu', 'cuda', 'cuda:N' (or another torch "
                         f"device string), got {device!r}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise ValueError(f"{what}: got {str(device)!r}, but this machine has "
                             f"{n} CUDA device{'' if n == 1 else 's'} visible to torch "
                             "(device=None picks "
                             "CUDA when there is one, else the CPU)")
    return dev


def _check_finite(value: torch.Tensor, what: str) -> None:
    """A label (camera, coefficients, landmarks) has finite values: NaN or inf is a ValueError
    naming ``what`` (the frames of a NaN label would be NaN, or silently wrong)."""
    from pyface.ops._checks import has_values

    if not value.is_floating_point() or value.numel() == 0 or not has_values(value):
        return
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what}: expected finite values, got NaN or inf")


class Pipeline:
    """Inference with a trained model, one method per stage (LivePortrait style): encode the
    source once, then stream driving frames through ``encode_driving`` and ``generate``.

    A *source* is a frame dict: ``image (3, H, W)`` RGB float in [-1, 1] plus optional
    ``camera (25,)`` (EG3D label), ``coeffs (257,)`` (Deep3DFaceRecon), ``landmarks (68, 2)``
    (pixels), ``mask (1, H, W)`` in [0, 1]. *driving* has the same keys with a leading ``T``.
    Pipelines resize images to ``resolution`` (antialiased) themselves (:meth:`prepare`), so any
    input size is accepted; an image must be uint8 or float within [-1, 1] (a mask: [0, 1]),
    give or take :data:`PIXEL_TOLERANCE`.

    Subclasses implement ``encode_source``, ``encode_driving`` and ``generate``; ``reconstruct``
    and ``animate`` compose them. A pipeline whose model can animate without driving frames
    (e.g. a camera orbit) overrides :meth:`default_motion`.

    Args:
        model: the trained model (a :class:`TrainableModel`), put in eval mode on ``device``.
        device: ``None`` (CUDA when available, else CPU), a string or a ``torch.device``.
    """

    #: output size (H = W); default ``model.cfg.resolution``
    resolution: int
    #: True when the driving frames' ``camera`` labels (T, 25) set the view of the generated
    #: frames, so that replacing them moves the camera (``pyface animate --camera``); None
    #: (default): inferred by :meth:`camera_control`.
    driving_camera: bool | None = None
    #: the heavy submodules of ``model`` that :meth:`compile` compiles: dotted names relative
    #: to ``model`` of the modules a frame's ``generate`` spends most of its time in (EG3D:
    #: ``backbone.synthesis``, ``renderer``, ``superresolution``); a name whose attribute is
    #: None (an optional part the config left out) is skipped. Default: none. Name modules
    #: whose ``__call__`` the stages use (a method other than ``forward`` runs uncompiled) and
    #: of your own classes: ``Module.compile`` does not trace the ``forward`` of a torch
    #: built-in module (an ``nn.Sequential``, an ``nn.Conv2d``), so naming one is an error;
    #: name the module calling it.
    compile_modules: tuple[str, ...] = ()
    #: how :meth:`compile` compiled them (a :class:`pyface.nn.compiling.CompileOptions`), None
    #: until it did
    compile_options = None
    #: the modules :meth:`compile` compiled, names relative to ``model``
    compiled_modules: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, *, device: str | torch.device | None = None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        res = getattr(getattr(model, "cfg", None), "resolution", None)
        if res is not None and not getattr(self, "resolution", None):
            self.resolution = int(res)
        if not isinstance(getattr(self, "resolution", None), int) or self.resolution <= 0:
            raise ValueError(f"{type(self).__name__}: no output resolution (set the class "
                             f"attribute 'resolution' or give the model a cfg.resolution)")

    def compile(self, mode="default") -> list[str]:
        """Compiles :attr:`compile_modules` in place with ``torch.compile``
        (:func:`pyface.nn.compiling.compile_modules`) and returns the names compiled.

        ``mode``: one of :data:`pyface.nn.compiling.COMPILE_CHOICES` (``"default"``: Inductor;
        ``"aot_eager"`` / ``"eager"``: graph capture without code generation, for debugging;
        ``"off"`` / None: nothing), a bool or a :class:`~pyface.nn.compiling.CompileOptions`.
        Frames are the same as without compilation (to float rounding); parameter names and
        ``state_dict`` keys do not change. The first calls compile (seconds to minutes: the
        first frames are slow), so warm up before timing; a new input shape (a shorter last
        chunk, another batch size) compiles again. Inductor on CPU needs a C++ compiler. A
        second call with another mode is refused (the modules are compiled already); with the
        same mode it compiles nothing more. The options and names are kept in
        :attr:`compile_options` / :attr:`compiled_modules` (:attr:`compile_mode` for
        reports)."""
        from pyface.nn.compiling import CompileOptions, compile_modules, parse_compile

        options = mode if isinstance(mode, CompileOptions) else parse_compile(mode,
                                                                              what="compile")
        if options is None:
            return []
        if self.compile_options is not None and options != self.compile_options:
            raise ValueError(f"compile: {type(self).__name__} was compiled with "
                             f"{self.compile_mode!r} already, got {mode!r} (compile a freshly "
                             "loaded pipeline)")
        done = compile_modules(self.model, tuple(self.compile_modules), options)
        self.compile_options = options
        self.compiled_modules = tuple(dict.fromkeys((*self.compiled_modules, *done)))
        return done

    @property
    def compile_mode(self) -> str:
        """``"off"``, or the :data:`~pyface.nn.compiling.COMPILE_CHOICES` value
        :meth:`compile` was given (``"default"``, ``"aot_eager"``, ...): what ``pyface eval``
        records in its JSON."""
        return "off" if self.compile_options is None else self.compile_options.choice

    def protocol_controls(self, protocol: str) -> dict:
        """The ``generate`` controls this pipeline's model defines for an evaluation protocol
        (``"same"``, ``"cross"``; ``pyface eval`` passes them and records them in its JSON as
        ``controls``). Default: none. A model whose cross-identity reenactment is a mode of its
        own (MMFA keeps the source's scale and translation) returns it for ``"cross"``."""
        return {}

    # -- input --------------------------------------------------------------------------------
    def prepare(self, frames: dict, *, batched: bool, name: str = "source",
                image: bool = True) -> dict:
        """Checks a frame dict, moves it to ``device``, converts images to float and resizes
        ``image`` / ``mask`` to ``resolution`` with antialiasing (landmarks are rescaled to the
        new pixel grid). ``batched``: tensors have a leading ``T``. ``image``: the dict must
        have one (False: labels alone may drive, e.g. EG3D's cameras). Idempotent.

        Every :data:`FRAME_KEYS` entry must be a tensor or a numpy array (anything else, None
        included, is a TypeError naming it) of its shape; labels (``camera``, ``coeffs``,
        ``landmarks``) must be finite and images within their range (:func:`_check_pixels`), a
        ValueError otherwise. Tensors are detached (a ``requires_grad`` input is taken as its
        values: no gradient reaches it). The checks read the values where the caller put them (a driving
        chunk on a GPU: one synchronisation per chunk and key, not per frame)."""
        lead_shape = "(T, 3, H, W)" if batched else "(3, H, W)"
        if not isinstance(frames, dict) or (image and "image" not in frames):
            raise ValueError(f"{name}: expected a dict with an 'image' {lead_shape} tensor, got "
                             f"{type(frames).__name__}"
                             + (f" with keys {sorted(frames)}" if isinstance(frames, dict) else ""))
        out = {}
        T = None
        scale = None
        R = self.resolution
        for key, value in frames.items():
            if key in FRAME_KEYS and type(value).__module__ == "numpy":
                value = torch.as_tensor(value)          # a numpy array: same checks as a tensor
            if key in FRAME_KEYS and not isinstance(value, torch.Tensor):
                pre = "T, " if batched else ""
                raise TypeError(f"{name}['{key}']: expected a torch.Tensor or a numpy array of "
                                f"shape ({pre}{_SHAPE_TEXT[key]}), got {type(value).__name__}")
            if key not in FRAME_KEYS:
                out[key] = value
                continue
            want = FRAME_KEYS[key]
            shape = tuple(value.shape)
            lead = 1 if batched else 0
            ok = len(shape) == len(want) + lead and all(
                w is None or w == s for w, s in zip(want, shape[lead:]))
            if key == "landmarks" and ok:
                ok = shape[lead] in (68, 478)
            if ok and batched:
                T = shape[0] if T is None else T
                ok = shape[0] == T
            if not ok:
                pre = "T, " if batched else ""
                exp = _SHAPE_TEXT[key]
                raise ValueError(f"{name}['{key}']: expected shape ({pre}{exp})"
                                 + (f" with T={T}" if batched and T is not None else "")
                                 + f", got {shape}")
            if key in ("image", "mask"):
                _check_pixels(value, f"{name}['{key}']", (-1.0, 1.0) if key == "image"
                              else (0.0, 1.0))
            else:
                _check_finite(value, f"{name}['{key}']")
            # inputs, not parameters: an inversion (EG3D, OTAvatar) must not write the caller's
            # .grad nor keep its graph
            value = value.detach().to(self.device)
            if key in ("image", "mask"):
                if value.dtype == torch.uint8:
                    value = value.float() / 255.0
                    if key == "image":
                        value = value * 2 - 1
                value = value.float()
                x = value if batched else value[None]
                H, W = x.shape[-2:]
                if H != W:
                    import warnings

                    warnings.warn(f"{name}['{key}']: {H}x{W} (H x W) is not square; resized to "
                                  f"{R}x{R} without keeping its aspect ratio (a face comes out "
                                  "stretched): crop it to a square first "
                                  "(pyface.data.driving.read_source / read_driving centre-crop)",
                                  UserWarning, stacklevel=3)
                if (H, W) != (R, R):
                    x = torch.nn.functional.interpolate(x, size=(R, R), mode="bilinear",
                                                        antialias=True, align_corners=False)
                    if key == "image":
                        scale = (R / W, R / H)
                value = x if batched else x[0]
            else:
                value = value.float()
            out[key] = value
        if scale is not None and "landmarks" in out and isinstance(out["landmarks"], torch.Tensor):
            out["landmarks"] = out["landmarks"] * torch.tensor(scale, device=self.device)
        return out

    @staticmethod
    def check_finite(value, what: str) -> None:
        """A tensor a caller handed the pipeline outside the frame dicts (a control such as a
        rotation or a scale, motion windows) has finite values: NaN or inf is a ValueError
        naming ``what``, as for the labels. One device synchronisation; fake / meta tensors and
        non-float ones pass."""
        _check_finite(value, what)

    def check_state(self, value, keys, *, what: str = "state",
                    stage: str = "encode_source", device: bool = False) -> None:
        """Refuses a ``generate`` argument that is not what this pipeline's ``stage`` returned:
        not a dict (None: ``generate`` called before ``encode_source``) is a TypeError, a dict
        without one of ``keys`` (another model's state, the state and motion swapped, raw
        driving frames for the motion) a ValueError, each naming ``what``, the stage and the
        keys, before any network runs. ``device``: its tensors must be on this pipeline's
        device too (a state encoded by a pipeline on another device; a ValueError naming both).
        Reads no tensor's values (no device synchronisation)."""
        where = f"{type(self).__name__}.{stage}"
        if not isinstance(value, dict):
            raise TypeError(f"{what}: expected the dict {where} returns, got "
                            f"{type(value).__name__}"
                            + (f" (call {stage} first)" if value is None else ""))
        missing = [k for k in keys if k not in value]
        if missing:
            raise ValueError(f"{what}: expected the dict {where} returns (keys {list(keys)}), "
                             f"got a dict with keys {sorted(map(str, value))} (without "
                             f"{missing}: another model's {what}, or state and motion swapped?)")
        if device:
            dev = torch.device(self.device)
            for k, v in value.items():
                if isinstance(v, torch.Tensor) and (v.device.type != dev.type or (
                        dev.index is not None and v.device.index != dev.index)):
                    raise ValueError(f"{what}['{k}']: on {v.device}, but this pipeline runs on "
                                     f"{dev} ({what} of a pipeline on another device? "
                                     f"{stage} it with this pipeline)")

    # -- what the inputs must carry ----------------------------------------------------------
    @classmethod
    def check_labels(cls, source=None, driving=None) -> None:
        """Refuses a source or driving frames that lack a label this pipeline needs, from the
        label names alone (``source`` / ``driving``: a collection of keys such as
        ``{"image", "camera"}``, or a frame dict; None: not checked), with the error
        ``encode_source`` / ``encode_driving`` would raise on those frames. A caller checks its
        inputs with it before loading weights or encoding the source (``pyface animate``).
        Labels that depend on the model's config are checked by the stages only. Default: an
        image is all it needs."""

    @classmethod
    def needs_driving(cls) -> bool:
        """True when the pipeline cannot animate without driving frames: it does not override
        :meth:`default_motion`."""
        return cls.default_motion is Pipeline.default_motion

    @classmethod
    def camera_control(cls) -> str | None:
        """How the view of the generated frames is chosen (``pyface animate --camera``):
        ``"generate"`` when ``generate`` takes a ``camera`` control (``"driving"``,
        ``"source"``, ``"orbit"``: OTAvatar, Export3D), ``"labels"`` when the driving frames'
        ``camera`` labels set it (:attr:`driving_camera` True, or :meth:`check_labels` refuses
        driving frames without a ``camera``: EG3D, GOHA), None when the pipeline has no camera
        (:attr:`driving_camera` False, or neither: a 2D model)."""
        import inspect

        if cls.driving_camera is False:
            return None
        try:
            if "camera" in inspect.signature(cls.generate).parameters:
                return "generate"
        except (TypeError, ValueError):         # no signature to read
            pass
        if cls.driving_camera:
            return "labels"
        try:
            cls.check_labels(driving={k for k in FRAME_KEYS if k != "camera"} | {"motion"})
        except (KeyError, ValueError) as exc:
            if "camera" in str(exc):
                return "labels"
        return None

    # -- the three stages ------------------------------------------------------------------
    def encode_source(self, source: dict):
        """source frame dict -> a state (any object) cached and reused for every driving frame."""
        raise NotImplementedError

    def encode_driving(self, driving: dict):
        """driving frame dict with leading ``T`` -> motion (any object, batched over T)."""
        raise NotImplementedError

    def generate(self, state, motion, **controls) -> torch.Tensor:
        """-> ``(T, 3, resolution, resolution)`` in [-1, 1]."""
        raise NotImplementedError

    def default_motion(self, frames: int):
        """Motion to animate without driving frames (e.g. an orbit), or None (driving needed)."""
        return None

    # -- composed --------------------------------------------------------------------------
    def locate(self, motion, start: int, total: int):
        """``motion`` of the frames ``start``, ``start + 1``, ... of a ``total``-frame
        animation, told where they are in it: :meth:`stream` calls it on every chunk, so that a
        control that depends on a frame's place in the whole animation does not restart at
        every chunk (OTAvatar's and Export3D's ``camera="orbit"``: one turn over ``total``
        frames). Default: ``motion`` unchanged."""
        return motion

    def seed_frames(self, motion, seed: int | None, start: int):
        """``motion`` of the frames ``start``, ``start + 1``, ... of an animation seeded with
        ``seed`` (None: unseeded), told that seed: :meth:`stream`, :meth:`animate`, ``pyface
        animate`` and ``pyface eval`` call it on every chunk (after :meth:`locate`), so that a ``generate`` that
        draws random numbers for every frame can draw frame ``i``'s from a generator of
        ``(seed, i)`` alone (:func:`frame_seeds`, :func:`frame_generators`) and give the same
        frames whatever the chunking (EG3D's and GOHA's ray samples). Default: ``motion``
        unchanged (the chunk's draws come from torch's generators, seeded with ``seed + t``
        before the chunk of first frame ``t``)."""
        return motion

    @torch.no_grad()
    def animate(self, source: dict, driving: dict, *, seed: int | None = None,
                **controls) -> torch.Tensor:
        """``generate(encode_source(source), encode_driving(driving))``: (T, 3, R, R) in [-1, 1].

        ``seed``: None (default) draws from torch's generators as they are; an int >= 0 seeds
        them (CPU and the pipeline's CUDA device) with ``seed`` before the source encoding and
        again before the driving frames, inside :func:`seeded` (the caller's random state is
        left as it was): the frames ``pyface animate --seed`` writes for one chunk of all the
        frames."""
        check_seed(seed)
        with seeded(seed, self.device):
            state = self.encode_source(source)
        with seeded(seed, self.device):
            motion = self.seed_frames(self.encode_driving(driving), seed, 0)
            return self.generate(state, motion, **controls)

    @torch.no_grad()
    def reconstruct(self, source: dict) -> torch.Tensor:
        """The source driven by itself: (1, 3, R, R) in [-1, 1]."""
        source = _numpy_frames(source)
        driving = {k: v[None] if isinstance(v, torch.Tensor) else v for k, v in source.items()}
        return self.animate(source, driving)

    @torch.no_grad()
    def stream(self, state, driving: dict | None, *, chunk: int = 8, motion=None,
               seed: int | None = None, **controls):
        """Yields ``(t, frames)`` chunks of ``(n, 3, R, R)`` for ``driving`` (``T`` frames, encoded
        ``chunk`` at a time) or for a precomputed batched ``motion`` (sliced along its first
        axis); ``state`` from :meth:`encode_source`. Every chunk's motion is passed through
        :meth:`locate` (its place in the ``T`` frames) before ``generate``.

        ``seed``: None (default) draws from torch's generators as they are; an int >= 0 seeds
        them with ``seed + t`` before the chunk of first frame ``t`` (``pyface animate --seed``,
        as ``pyface eval`` seeds its chunks), inside :func:`seeded`: the caller's random state
        is restored before each chunk is yielded."""
        if (driving is None) == (motion is None):
            raise ValueError("stream: give exactly one of driving and motion")
        if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
            raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
        check_seed(seed)
        if driving is not None:
            # T from the per-frame tensors: a camera-only driving dict (EG3D) has no image
            if not isinstance(driving, dict):
                raise TypeError(f"driving: expected a dict of (T, ...) tensors, got "
                                f"{type(driving).__name__}")
            driving = _numpy_frames(driving)
            per_frame = {k: v for k, v in driving.items() if isinstance(v, torch.Tensor)}
            if not per_frame:
                raise ValueError(f"driving: expected a dict of (T, ...) tensors, got keys "
                                 f"{sorted(driving)}")
            lengths = {k: int(v.shape[0]) if v.dim() else None for k, v in per_frame.items()}
            if len(set(lengths.values())) != 1 or None in lengths.values():
                raise ValueError(f"driving: expected the same number of frames T for every "
                                 f"per-frame key, got {dict(sorted(lengths.items()))}")
            T = motion_length(per_frame)
            for t in range(0, T, chunk):
                part = {k: v[t:t + chunk] if isinstance(v, torch.Tensor) else v
                        for k, v in driving.items()}
                with seeded(None if seed is None else seed + t, self.device):
                    m = self.seed_frames(self.locate(self.encode_driving(part), t, T), seed, t)
                    frames = self.generate(state, m, **controls)
                yield t, frames
        else:
            T = motion_length(motion)
            for t in range(0, T, chunk):
                with seeded(None if seed is None else seed + t, self.device):
                    m = self.seed_frames(self.locate(_slice_motion(motion, t, t + chunk), t, T),
                                         seed, t)
                    frames = self.generate(state, m, **controls)
                yield t, frames


def compiled_graphs() -> int:
    """How many graphs TorchDynamo has compiled in this process so far (``torch.compile``'s
    count of unique graphs; a recompilation for a new shape or grad mode adds one). A caller
    that times a pipeline reads it before and after a call to tell a call that compiled (the
    first frames of a compiled pipeline, a new chunk size) from one that ran compiled code
    only: ``pyface animate`` and ``pyface eval`` leave the former out of their frames per
    second."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:                     # a torch build without TorchDynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


def locate_frames(motion: dict, start: int, total: int) -> dict:
    """A :meth:`Pipeline.locate` for a dict motion: ``motion`` plus ``stream_index`` (n,)
    (``start .. start + n - 1``, its frames' indices in the animation) and ``stream_length``
    (``total``)."""
    n = motion_length({k: v for k, v in motion.items() if isinstance(v, torch.Tensor)})
    return {**motion, "stream_index": torch.arange(start, start + n),
            "stream_length": int(total)}


def frame_place(motion, T: int) -> tuple[torch.Tensor, int]:
    """``(index (T,), length)``: the place of a motion's ``T`` frames in its animation, as
    :func:`locate_frames` wrote it, else frames ``0 .. T - 1`` of a ``T``-frame animation (a
    ``generate`` called on its own)."""
    if isinstance(motion, dict) and "stream_index" in motion:
        return motion["stream_index"].long().cpu(), int(motion["stream_length"])
    return torch.arange(T), T


def frame_seed(seed: int, index: int) -> int:
    """The seed of frame ``index`` of an animation seeded with ``seed``: 63 bits of the SHA-256
    of both (frames of one seed, and the same frame of two seeds, get unrelated streams)."""
    import hashlib

    digest = hashlib.sha256(f"pyface-frame:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def frame_seeds(motion: dict, seed: int | None, start: int) -> dict:
    """A :meth:`Pipeline.seed_frames` for a dict motion: ``motion`` plus ``frame_seeds`` (n,)
    int64, the :func:`frame_seed` of its frames ``start .. start + n - 1``; ``motion`` unchanged
    when ``seed`` is None."""
    if seed is None:
        return motion
    check_seed(seed)
    n = motion_length({k: v for k, v in motion.items() if isinstance(v, torch.Tensor)})
    return {**motion, "frame_seeds": torch.tensor([frame_seed(seed, start + i) for i in range(n)],
                                                  dtype=torch.int64)}


def frame_generators(motion, device) -> list[torch.Generator] | None:
    """One ``torch.Generator`` on ``device`` per frame of ``motion``, seeded with its
    ``frame_seeds`` (:func:`frame_seeds`); None when the motion carries none (an unseeded
    animation, or ``generate`` called on its own: draw from torch's generators)."""
    if not isinstance(motion, dict) or motion.get("frame_seeds") is None:
        return None
    dev = torch.device(device)
    return [torch.Generator(device=dev).manual_seed(int(s)) for s in motion["frame_seeds"]]


def check_choice(name: str, value, choices) -> None:
    """ValueError unless ``value`` is one of ``choices`` (any iterable; the message shows it as
    a tuple): ``model.cond: expected one of ('direct', 'e2e', 'clebs'), got 'x'``. The check a
    model package uses for a config field or an argument that takes one of a fixed set of
    values; it is the ops' own (``pyface.ops._checks.check_choice``), imported when called so
    that importing this module still does not import ``pyface.ops``."""
    from pyface.ops._checks import check_choice as _check_choice

    _check_choice(name, value, choices)


def check_seed(seed, what: str = "seed") -> None:
    """ValueError unless ``seed`` is None or an int >= 0 (a bool is not a seed)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or seed < 0):
        raise ValueError(f"{what}: expected an int >= 0 or None, got {seed!r}")


def seeded(seed: int | None, device: str | torch.device | None = None):
    """A context in which torch's generators are seeded with ``seed`` (``torch.manual_seed``:
    the CPU's and every CUDA device's) and after which the random state of the CPU and of
    ``device`` (when it is a CUDA device) is restored (:func:`torch.random.fork_rng`); None:
    no seeding, nothing restored (a no-op context)."""
    import contextlib

    if seed is None:
        return contextlib.nullcontext()
    check_seed(seed)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(
        devices=[dev] if dev.type == "cuda" else [], device_type=dev.type))
    torch.manual_seed(int(seed))
    return stack


def _numpy_frames(frames):
    """``frames`` with its numpy arrays under :data:`FRAME_KEYS` as tensors (sharing memory),
    as :meth:`Pipeline.prepare` takes them; anything but a dict is returned as it is."""
    if not isinstance(frames, dict):
        return frames
    return {k: torch.as_tensor(v) if k in FRAME_KEYS and type(v).__module__ == "numpy" else v
            for k, v in frames.items()}


def motion_length(motion) -> int:
    """The number of frames of a batched motion (a tensor, or a dict / sequence of them)."""
    if isinstance(motion, torch.Tensor):
        return int(motion.shape[0])
    if isinstance(motion, dict):
        return motion_length(next(iter(motion.values())))
    if isinstance(motion, (list, tuple)):
        return motion_length(motion[0])
    raise TypeError(f"motion: cannot find the frame axis of {type(motion).__name__}")


def _slice_motion(motion, a: int, b: int):
    if isinstance(motion, torch.Tensor):
        return motion[a:b]
    if isinstance(motion, dict):
        return {k: _slice_motion(v, a, b) for k, v in motion.items()}
    if isinstance(motion, (list, tuple)):
        return type(motion)(_slice_motion(v, a, b) for v in motion)
    return motion
