"""Typed training configuration: dataclasses, YAML files and ``--set key=value`` overrides.

An experiment is ``ExperimentConfig(model=..., model_config=<the model's dataclass>, data=...,
train=...)``. In YAML and ``--set`` the sections are ``model``, ``data`` and ``train``::

    model: {plane_channels: 16}
    data: {name: procedural, resolution: 64}
    train: {steps: 2000, batch_size: 8, ema: {decay: 0.999}}

``--set train.lr_schedule.kind=cosine --set model.plane_channels=24``. Unknown keys are errors that
list the valid ones; values are converted to the field's declared type.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScheduleConfig:
    """Learning-rate factor as a function of the step (multiplies every group's base lr)."""
    kind: str = "constant"          # constant | cosine | linear | step
    warmup_steps: int = 0           # linear ramp from 0 over the first steps
    min_factor: float = 0.0         # cosine/linear: factor reached at the last step
    step_size: int = 10000          # step: multiply by gamma every step_size steps
    gamma: float = 0.2

    def __post_init__(self):
        kinds = ("constant", "cosine", "linear", "step")
        if self.kind not in kinds:
            raise ConfigError(f"train.lr_schedule.kind: expected one of {', '.join(kinds)}, got "
                              f"{self.kind!r}{did_you_mean(self.kind, kinds)}")


@dataclass
class EMAConfig:
    """Exponential moving average of chosen sub-modules (kept in ``trainer.ema[name]``).

    ``half_life_kimg`` gives EG3D/StyleGAN-style decay ``0.5 ** (batch / (half_life_kimg*1000))``
    with an optional ramp-up (half-life <= rampup * images seen); otherwise ``decay`` is the
    plain per-step decay. ``modules`` empty: no EMA.
    """
    modules: list[str] = field(default_factory=list)
    decay: float = 0.999
    half_life_kimg: float | None = None
    rampup: float | None = None
    start_step: int = 0


@dataclass
class TrainConfig:
    run_dir: str = "runs/{model}"     # {model} is replaced by the model name
    steps: int = 1000
    batch_size: int = 8               # global batch over all ranks
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    precision: str = "fp32"           # fp32 | bf16 (autocast; meant for GPUs)
    grad_clip: float | None = None    # max global grad norm per optimizer; None: no clipping
    grad_clip_per: dict[str, float] = field(default_factory=dict)  # optimizer -> max norm
    #                                   (overrides grad_clip for that optimizer; <= 0: none)
    nan_guard: bool = True            # stop on non-finite loss / grad norm
    max_grad_norm: float = 1.0e6      # ... or on a grad norm above this (exploding training)
    ckpt_every: int = 500
    keep_ckpts: int = 3
    log_every: int = 10
    image_every: int = 250            # TensorBoard image grid + preview PNG
    video_every: int = 0              # mp4 preview; 0: only at the end
    video_frames: int = 24            # frames of a preview clip; 0: no clips
    num_workers: int = 0
    progress: bool = True
    tensorboard: bool = True
    init_from: str | None = None      # checkpoint or run folder: initial weights only
    backend: str | None = None        # force every op onto reference | cpu | cuda | triton
    overlap_grad_reduce: bool = True  # multi-rank: all-reduce gradient buckets during backward
    bucket_mb: float = 25.0           # ... bucket size in MiB
    compile: str = "off"              # torch.compile of the model's compile_modules: off |
    #                                   default | reduce-overhead | max-autotune |
    #                                   max-autotune-no-cudagraphs | aot_eager | eager
    lr_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self):
        # a leading ~ is the home folder (a --set value or YAML path reaches here unexpanded)
        self.run_dir = os.path.expanduser(self.run_dir)
        if self.init_from is not None:
            self.init_from = os.path.expanduser(self.init_from)
        # what can be checked without the model or the machine (--print-config reports it too)
        try:
            self.run_dir.format(model="m")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"train.run_dir: only {{model}} is replaced (a literal brace is "
                              f"written {{{{ or }}}}), got {self.run_dir!r}") from None
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision: expected 'fp32' or 'bf16', got "
                              f"{self.precision!r}{did_you_mean(self.precision, ('fp32', 'bf16'))}")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got "
                                  f"{self.device!r}") from None
        self.compile = _compile_choice(self.compile)
        for key in ("steps", "batch_size", "ckpt_every", "log_every",
                    "image_every", "video_every", "video_frames", "num_workers"):
            value, low = getattr(self, key), 1 if key == "batch_size" else 0
            if value < low:
                raise ConfigError(f"train.{key}: expected an int >= {low}, got {value!r}")


def _compile_choice(value) -> str:
    """``train.compile`` as one of :data:`pyface.nn.compiling.COMPILE_CHOICES`: ``on`` / ``true``
    are ``default``, ``none`` / ``false`` / an empty value are ``off`` (also as the bools a YAML
    file's ``on`` / ``off`` are read as), so config.yaml records the choice; another value raises
    ConfigError naming the choices."""
    if value is None or value is False or value == "off":
        return "off"            # the default, without importing pyface.nn
    from pyface.nn.compiling import COMPILE_CHOICES, parse_compile

    try:
        options = parse_compile(value, what="train.compile")
    except ValueError as exc:
        raise ConfigError(f"{exc}{did_you_mean(value, COMPILE_CHOICES)}") from None
    return "off" if options is None else options.choice


@dataclass
class DataConfig:
    """Common data fields plus ``options``: the selected dataset's own ``Options`` dataclass
    (``data: {name: clips, options: {frames: 8, min_gap: 4}}``, ``--set data.options.min_gap=4``),
    converted from a mapping when the config is built, like ``model_config``. Unknown option
    keys are errors listing the valid ones. See docs/data.md."""
    name: str = "procedural"          # a registered dataset (pyface.train.registry)
    resolution: int = 64
    size: int = 2048                  # number of items (procedural data)
    path: str | None = None           # on-disk datasets; unset: the cached built-in synthetic set
    seed: int = 0
    skip_bad: bool = False            # on-disk datasets: skip missing/corrupt videos with a warning
    options: Any = None               # the dataset's Options (a mapping is converted)

    def __post_init__(self):
        if self.path is not None:
            self.path = os.path.expanduser(self.path)
        self.options = dataset_options(self.name, self.options)


def dataset_options(name: str, options: Any) -> Any:
    """``options`` (None, a mapping or an instance) as the ``Options`` dataclass of registered
    dataset ``name``; None for a dataset without ``Options`` (then ``options`` must be empty)."""
    from pyface.train import registry

    try:
        target = registry.dataset_class(name)
    except KeyError as exc:
        raise ConfigError(f"data.name: {exc.args[0]}") from None
    opt_cls = getattr(target, "Options", None)
    if opt_cls is None:
        if options:
            raise ConfigError(f"data.options: dataset {name!r} takes no options, got "
                              f"{to_dict(options)!r}")
        return None
    if isinstance(options, opt_cls):
        return options
    if options is not None and dataclasses.is_dataclass(options):
        raise ConfigError(f"data.options: expected {opt_cls.__qualname__} for dataset {name!r}, "
                          f"got {type(options).__qualname__}")
    return from_dict(opt_cls, options or {}, prefix="data.options.")


@dataclass
class ExperimentConfig:
    model: str = "example"
    model_config: Any = None          # the model's own config dataclass
    preset: str | None = None         # the preset it was built with (recorded in config.yaml)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the settings addressed to the model's stages, {stage name: {model/data/train: ...}}
    # (``stages:`` of a YAML file, ``--set stages.<name>.<key>=<value>``; pyface.train.stages)
    stages: dict = field(default_factory=dict)
    # the run-wide settings (pyface.train.stages.SHARED_KEYS: device, precision, logging, seed,
    # data location) given by the --config file or --set, {section: {key: value}}: a staged
    # model's stages get them as well (recorded as ``run_wide:`` in --print-config and
    # config.yaml, so --config gives them back); empty for a model without stages
    run_wide: dict = field(default_factory=dict)
    # the data.options that build_experiment left out because they were set for another
    # dataset than the selected data.name: [(source, dataset, option keys)] (not a setting:
    # neither compared nor recorded as one; --print-config and config.yaml name them in a comment)
    dropped_options: list = field(default_factory=list, compare=False, repr=False)


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it."""


class ConfigFileError(ConfigError):
    """The ``--config`` file is missing or unreadable: an input's failure (``pyface train``
    exits 1), where a ConfigError in what it holds is the configuration's (exit code 2)."""


def did_you_mean(name: str, choices, prefix: str = "") -> str:
    """``"; did you mean PREFIX+X?"`` for the choices closest to ``name`` (difflib), or ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=2, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"{prefix}{c}" for c in close) + "?"


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with type conversion
# --------------------------------------------------------------------------------------------

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _SetText(str):
    """A ``--set`` value as typed (``007``, ``true``, ``1:2``) whose YAML reading (``value``)
    is not a string: a ``str`` field takes the text, every other type the YAML value."""

    def __new__(cls, text: str, value: Any):
        out = super().__new__(cls, text)
        out.value = value
        return out

    def __getnewargs__(self):            # copy and pickle
        return str(self), self.value


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, _SetText) else value


def _plain_all(value: Any) -> Any:
    """``value`` with every ``--set`` value inside it (mappings, lists) as its YAML value."""
    if isinstance(value, dict):
        return {k: _plain_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_all(v) for v in value]
    return _plain(value)


_BOOLS = {"true": True, "yes": True, "on": True, "1": True,
          "false": False, "no": False, "off": False, "0": False}


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, _SetText) and tp is not str and origin not in (
            typing.Union, types.UnionType, typing.Literal, list, tuple):
        value = value.value
    if tp is Any:
        return _plain_all(value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        plain = _plain(value)
        if plain is None or (isinstance(plain, str) and plain.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as exc:
                errors.append(str(exc))
        literals = [x for a in args if typing.get_origin(a) is typing.Literal
                    for x in typing.get_args(a)]
        if bool in args and literals and all(a in (bool, type(None)) or typing.get_origin(a)
                                             is typing.Literal for a in args):
            # bool | Literal[...] (e.g. recompute: true, false or 'decoder'): every choice
            choices = ["true", "false"] + [repr(x) for x in literals] \
                + (["null"] if type(None) in args else [])
            raise ConfigError(f"{key}: expected {', '.join(choices[:-1])} or {choices[-1]}, "
                              f"got {plain!r}")
        raise ConfigError(errors[0] if errors else f"{key}: cannot convert {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        for v in ([value.value, str(value)] if isinstance(value, _SetText) else [value]):
            for a in allowed:
                if v == a and type(v) is type(a) or (isinstance(v, str) and not isinstance(a, str)
                                                     and v.lower() == str(a).lower()):
                    return a
        value = _plain(value)
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, allowed))}, got "
                          f"{value!r}{did_you_mean(value, allowed)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is dict or tp is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, e.g. --set {key}.NAME=VALUE, got "
                              f"{value!r}")
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if isinstance(value, _SetText):       # a --set scalar: the text, read as A,B or A
            value = value.value if value.value is None else str(value)
        if isinstance(value, str):
            text = value.strip()
            if text[:1] + text[-1:] in ("()", "[]"):
                text = text[1:-1]
            value = [v.strip() for v in text.split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list (A,B or [A, B]), got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):           # tuple[T1, T2]: exactly that many items
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}: "
                                  f"{list(value)!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in
                         enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return origin(_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1) or isinstance(value, str) \
                and value.strip().lower() in _BOOLS:
            return _BOOLS[str(value).strip().lower()]
        raise ConfigError(f"{key}: expected a bool (true/false, yes/no, on/off, 1/0), got "
                          f"{value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        if tp is float:
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected float, got {value!r}") from None
        if not isinstance(value, float):
            try:
                return int(value)                 # an int, or the text of one
            except ValueError:                    # '3.0', '1e3': a whole number written so
                pass
            try:
                return int(value, 0)              # '0x10'
            except (TypeError, ValueError):
                pass
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected int, got {value!r}") from None
        if not math.isfinite(number) or number != int(number):
            raise ConfigError(f"{key}: expected int (a whole number), got {value!r}")
        return int(number)
    if tp is str:
        if isinstance(value, _SetText):
            return str(value)
        if not isinstance(value, (str, int, float, datetime.date)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return _plain_all(value)                   # a type without a conversion: the YAML value


def from_dict(cls, data: dict, *, prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise ConfigError."""
    data = _plain(data)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            raise ConfigError(f"{prefix}{k}: unknown key for {cls.__qualname__}; valid keys: "
                              f"{', '.join(fields)}{did_you_mean(k, fields, prefix)}")
        default = _field_default(fields[k])
        if isinstance(v, dict) and dataclasses.is_dataclass(default):
            # a partial mapping overrides the field's default instance (e.g. a preset of a
            # nested config keeps what the default factory chose for the keys it does not name)
            v = _deep_merge(to_dict(default), v)
        kwargs[k] = _convert(v, hints[k], prefix + k)
        if fields[k].metadata.get("keys_of") is not None:
            kwargs[k] = _keys_of(fields[k].metadata, kwargs[k], prefix + k)
    try:
        return cls(**kwargs)
    except TypeError as exc:                  # a required field without a default is missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from None


def saved_config(cls, data: Any) -> Any:
    """``data``, a model config that a run saved (a checkpoint's ``model_config``, a run's
    ``config.yaml``: complete when written), with the fields it lacks that ``cls`` lists in its
    ``saved_before`` (a ``ClassVar`` mapping ``{field: value}``) set to those values.

    A field added with a default that changes what earlier runs did (a fix) lists the earlier
    behaviour there, so a run saved before the field existed is resumed, reused and loaded as
    it was trained; every other missing field counts as its default. ``data`` that is not a
    mapping is returned as it is (``from_dict`` reports it)."""
    before = getattr(cls, "saved_before", None) or {}
    if not isinstance(data, dict) or not before:
        return data
    return {**before, **data}


def _keys_of(metadata, value: Any, key: str) -> Any:
    """A mapping field declared ``field(metadata={"keys_of": C, "fixed": (names...)})``: its
    keys are fields of dataclass ``C`` other than ``fixed`` (the overrides a model applies to
    a ``C`` it builds or loads, e.g. OTAvatar's ``model.render``, :class:`RenderConfig`
    fields), its values converted to their types; other keys raise ConfigError with the
    valid ones and the near matches."""
    if not isinstance(value, dict):
        return value
    target, fixed = metadata["keys_of"], tuple(metadata.get("fixed") or ())
    hints = _hints(target)
    valid = [f.name for f in dataclasses.fields(target) if f.name not in fixed]
    out = {}
    for k, v in value.items():
        if k in fixed:
            raise ConfigError(f"{key}.{k}: {target.__qualname__}.{k} cannot be overridden here "
                              f"(fixed); valid keys: {', '.join(valid)}")
        if k not in valid:
            raise ConfigError(f"{key}.{k}: unknown key for {target.__qualname__} (overrides); "
                              f"valid keys: {', '.join(valid)}"
                              f"{did_you_mean(k, valid, key + '.')}")
        out[k] = _convert(v, hints[k], f"{key}.{k}")
    return out


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_set(items: list[str] | None, *, texts: bool = False, option: str = "--set") -> dict:
    """``["train.steps=10", "model.a.b=1"]`` -> nested dict (values parsed as YAML scalars).

    The same key given twice: the last value wins (a mapping value and later keys inside it
    merge: ``train.ema={decay: 0.5}`` then ``train.ema.start_step=10``). ``texts``: a value
    whose YAML reading is not a string, a list or a mapping (``007``, ``true``, ``null``,
    ``1:2``) keeps its text too, which a ``str`` field takes as written (``build_experiment``).
    ``option``: the flag the errors name."""
    import yaml

    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r}: expected key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"{option} {item!r}: empty key")
        parts = key.split(".")
        if "" in parts:
            raise ConfigError(f"{option} {item!r}: empty part in the key {key!r}, e.g. "
                              f"train.ema.decay=0.999")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if texts and not isinstance(value, (str, list, dict)):
            value = _SetText(raw.strip(), value)
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{option} {item!r}: {'.'.join(parts[:i + 1])} is set to a "
                                  f"value and used as a section")
        node[parts[-1]] = value
    return out


def parse_options(items: list[str] | None, option: str = "--option") -> dict:
    """``pyface animate / eval --option KEY=VALUE`` items -> ``{"KEY": value}`` with dotted keys
    as given (``model.pti_steps=50`` -> ``{"model.pti_steps": 50}``), values read as
    :func:`parse_set` reads ``--set`` values (a ``str`` field takes the text as written);
    the keys are checked by :func:`pyface.models.check_options`."""
    def flat(node: dict, prefix: str) -> dict:
        out = {}
        for k, v in node.items():
            if isinstance(v, dict) and not isinstance(v, _SetText) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    return flat(parse_set(items, texts=True, option=option), "")


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str) -> dict:
    """A YAML config file as a dict; a missing or unreadable file raises ConfigFileError, a
    malformed one ConfigError, naming it (and the position of a syntax error)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigFileError(f"--config {path}: no such file") from None
    except OSError as exc:
        raise ConfigFileError(f"--config {path}: cannot read it ({exc.strerror or exc})") \
            from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        pos = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--config {path}: not valid YAML{pos}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping at the top level (sections "
                          f"model, data, train, stages, or a run's config.yaml), got {data!r}")
    return data


def _sections(data: dict) -> dict:
    """A run's ``config.yaml`` (``experiment_to_dict``: model name, preset, model_config, data,
    train, stages, run_wide) -> the ``model`` / ``data`` / ``train`` (/ ``stages``) sections
    (``build_experiment`` reads ``run_wide`` itself); other YAML passes through."""
    if isinstance(data.get("model"), str) and "model_config" in data:
        out = {"model": data.get("model_config") or {}, "data": data.get("data") or {},
               "train": data.get("train") or {}}
        if data.get("stages"):
            out["stages"] = data["stages"]
        return out
    return data


SECTIONS = ("model", "data", "train")


def _stage_section(stages: Any, source: str) -> dict:
    """``stages`` (``{name: {model/data/train: ...}}``) checked for its shape (the names are
    checked against the model's stages by ``pyface.train.stages.check_stage_section``)."""
    stages = _plain(stages)
    if stages is None:
        return {}
    if not isinstance(stages, dict) or not all(isinstance(_plain(v), dict)
                                               for v in stages.values()):
        raise ConfigError(f"{source}: stages: expected a mapping {{stage name: {{model: ..., "
                          f"data: ..., train: ...}}}}, e.g. stages: {{s1: {{train: {{steps: "
                          f"100}}}}}}, got {stages!r}")
    for name, section in stages.items():
        bad = sorted(set(section) - set(SECTIONS))
        if bad:
            raise ConfigError(f"{source}: stages.{name}.{bad[0]}: unknown section; valid "
                              f"sections: model, data, train{did_you_mean(bad[0], SECTIONS)}")
    return stages


def preset_config(model: str, preset: str, presets: dict | None = None) -> dict:
    """The config dict of ``preset`` among ``presets`` (default: the registered model's
    ``presets``); an unknown name raises ConfigError listing the valid ones."""
    if presets is None:
        from pyface.train.registry import model_class

        presets = getattr(model_class(model), "presets", None) or {}
    if preset not in presets:
        raise ConfigError(f"--preset {preset!r}: model {model!r} has no such preset; valid "
                          f"presets: {', '.join(sorted(presets)) or '(none)'}"
                          f"{did_you_mean(preset, presets)}")
    data = presets[preset] or {}
    unknown = set(data) - {"model", "data", "train"}
    if unknown:
        raise ConfigError(f"preset {preset!r} of {model!r}: unknown section {sorted(unknown)[0]}; "
                          "valid sections: model, data, train")
    return data


def build_experiment(model: str, model_config_cls, *, yaml_path: str | None = None,
                     overrides: list[str] | None = None, defaults: dict | None = None,
                     preset: str | None = None, presets: dict | None = None,
                     stage: tuple[str, dict] | None = None,
                     run_wide: dict | None = None) -> ExperimentConfig:
    """The experiment config: model defaults < ``defaults`` (the recipe) < ``preset`` < YAML
    file < ``--set`` overrides (< ``stage``: ``(name, sections)``, the settings addressed to
    this model as the stage ``name`` of another, used by ``pyface.train.stages``).

    A ``stages`` section of the YAML file and ``--set stages.<name>.<key>=<value>`` items
    (the latter win) are kept in ``ExperimentConfig.stages`` for the model's stages (checked
    and applied by ``pyface.train.stages``).

    The run-wide keys (``pyface.train.stages.SHARED_KEYS``) that the YAML file's ``train`` and
    ``data`` sections or the ``--set`` items set are kept in ``ExperimentConfig.run_wide`` for
    a model with stages (they reach its stages, like ``--set`` items: the file is the same
    settings written down); a run's ``config.yaml`` gives back its ``run_wide:`` record (its
    ``train`` and ``data`` sections are the final model's resolved values). ``run_wide``: the
    run-wide settings of the model this one is a stage of, layered with the ``--set`` items.

    ``preset`` names one of ``presets`` (default: the ``presets`` of the registered model
    ``model``); an unknown name raises ConfigError listing the valid presets. A YAML file that
    is a run's ``config.yaml`` (or ``--print-config`` output) must be one of ``model``; without
    ``preset`` its recorded preset is kept as the record (not applied again: the file holds the
    resolved values), so its stages train with the same preset.

    ``data.options`` follow the dataset they were set for: when ``data.name`` ends up another
    dataset than the one a layer's options belong to, that layer's options are left out
    (listed in ``dropped_options``; see :func:`_options_of_the_selected_dataset`).
    """
    layers = [("the recipe", dict(defaults or {}), True)]
    if preset is not None:
        layers.append((f"preset {preset!r}", preset_config(model, preset, presets), True))
    recorded = preset
    given: list[dict] = []                  # run-wide settings, lowest first
    if yaml_path:
        file = load_yaml(yaml_path)
        if isinstance(file.get("model"), str) and "model_config" in file:
            # a run's config.yaml or --print-config output: the resolved config of one model,
            # built with a preset that is kept as the record (stages are trained with it)
            if file["model"] != model:
                raise ConfigError(f"--config {yaml_path}: the config of model {file['model']!r}, "
                                  f"not {model!r} (pyface train {file['model']} --config "
                                  f"{yaml_path})")
            if recorded is None:
                recorded = file.get("preset")
            elif file.get("preset") != recorded:
                # the file's values replace every value of --preset, which would only change
                # the record (and the preset its stages train with)
                built = (f"preset {file['preset']!r}" if file.get("preset") is not None
                         else "no preset")
                raise ConfigError(f"--preset {recorded!r}: --config {yaml_path} is a resolved "
                                  f"config built with {built}, whose values replace the "
                                  f"preset's; leave out --preset (the file's is kept), or use "
                                  f"--preset {recorded} without that file")
            given.append(_run_wide_record(file.get("run_wide"), f"--config {yaml_path}"))
        else:
            given.append(_run_wide_of(file))
        sections = dict(_sections(file))
        if "model_config" in file and isinstance(file.get("model"), str):
            # a resolved config: the model fields it lacks were added since it was written
            sections["model"] = saved_config(model_config_cls, sections["model"])
        for name in SECTIONS:         # else a later --set of the section's keys replaces it
            value = _plain(sections.get(name))
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"--config {yaml_path}: {name}: expected a mapping of "
                                  f"{name}.* keys, got {value!r}"[:300])
        layers.append((f"--config {yaml_path}", sections, False))
    items = parse_set(overrides, texts=True)
    given.append(_run_wide_of(items))
    layers.append(("--set", merge(dict(run_wide or {}), items), False))
    stages: dict = {}
    for source, layer, _ in layers[1 + (preset is not None):]:
        if "stages" in layer:
            stages = merge(stages, _stage_section(layer.pop("stages"), source))
    if stage is not None:
        layers.append((f"stages.{stage[0]}", dict(stage[1]), False))
    layers, dropped = _options_of_the_selected_dataset(layers)
    data: dict = {}
    for _, layer, _ in layers:
        data = merge(data, layer)
    unknown = set(data) - set(SECTIONS)
    if unknown:
        bad = sorted(unknown)[0]
        valid = SECTIONS + ("stages",)
        hint = ("; a preset is chosen with --preset NAME (a run's config.yaml records it next "
                "to model_config)" if bad == "preset" else did_you_mean(bad, valid))
        raise ConfigError(f"{bad}: unknown section; valid sections: {', '.join(valid)}{hint}")
    from pyface.train.registry import MODELS, model_class

    shared: dict = dict(run_wide or {})
    if model in MODELS and getattr(model_class(model), "stages", ()):
        for layer in given:
            shared = merge(shared, layer)
    else:
        shared = {}
    return ExperimentConfig(
        model=model, preset=recorded, run_wide=shared,
        model_config=from_dict(model_config_cls, data.get("model") or {}, prefix="model."),
        data=from_dict(DataConfig, data.get("data") or {}, prefix="data."),
        train=from_dict(TrainConfig, data.get("train") or {}, prefix="train."),
        stages=stages, dropped_options=dropped)


def _run_wide_of(sections: dict) -> dict:
    """The run-wide keys (``pyface.train.stages.SHARED_KEYS``) that ``sections`` (a YAML file
    of sections, or the ``--set`` items) sets, ``{section: {key: value}}``."""
    from pyface.train.stages import SHARED_KEYS

    out: dict = {}
    for name in SHARED_KEYS:
        section, key = name.split(".")
        values = sections.get(section)
        if isinstance(values, dict) and key in values:
            out.setdefault(section, {})[key] = values[key]
    return out


def _run_wide_record(record: Any, source: str) -> dict:
    """The ``run_wide:`` record of a run's ``config.yaml``, checked: run-wide keys only."""
    from pyface.train.stages import SHARED_KEYS

    if record is None:
        return {}
    if not isinstance(record, dict) or not all(isinstance(v, dict) for v in record.values()):
        raise ConfigError(f"{source}: run_wide: expected a mapping {{section: {{key: value}}}}, "
                          f"e.g. run_wide: {{train: {{device: cpu}}}}, got {record!r}")
    for section, values in record.items():
        for key in values:
            name = f"{section}.{key}"
            if name not in SHARED_KEYS:
                raise ConfigError(f"{source}: run_wide.{name}: not a run-wide key; run-wide "
                                  f"keys: {', '.join(SHARED_KEYS)}"
                                  f"{did_you_mean(name, SHARED_KEYS, 'run_wide.')}")
    return record


def _options_of_the_selected_dataset(layers: list) -> tuple[list, list]:
    """``layers`` ``[(source, sections, model_authored)]``, lowest first, without the
    ``data.options`` that belong to another dataset than the one finally selected, and the list
    of what was left out ``[(source, dataset, keys)]``.

    The options a layer sets belong to the ``data.name`` set in the same layer; the recipe's and
    a preset's options without a ``data.name`` next to them belong to the dataset the layers
    below select (default ``procedural``). Options of ``--config`` or ``--set`` without a
    ``data.name`` next to them belong to the dataset finally selected (they are checked against
    its ``Options``). So changing ``data.name`` leaves behind what the recipe and preset (or a
    run's ``config.yaml``) set for their own dataset, while the options given for the new one
    apply."""
    def name_of(layer):
        section = layer.get("data")
        if isinstance(section, dict) and _plain(section.get("name")) is not None:
            return str(section["name"])
        return None

    selected = DataConfig.name
    for _, layer, _ in layers:
        selected = name_of(layer) or selected
    out, dropped, below = [], [], DataConfig.name
    for source, layer, model_authored in layers:
        owner = name_of(layer) or (below if model_authored else None)
        below = name_of(layer) or below
        section = layer.get("data")
        if owner is not None and owner != selected and isinstance(section, dict) \
                and _plain(section.get("options")) is not None:
            options = _plain(section["options"])
            keys = sorted(options) if isinstance(options, dict) else [str(options)]
            dropped.append((source, owner, keys))
            layer = {**layer, "data": {k: v for k, v in section.items() if k != "options"}}
        out.append((source, layer, model_authored))
    return out, dropped


def experiment_to_dict(cfg: ExperimentConfig) -> dict:
    """The config as plain data (config.yaml, checkpoints, ``--print-config``); ``stages`` only
    when settings are addressed to the stages, ``run_wide`` only when run-wide settings were
    given to a model with stages."""
    out = {"model": cfg.model, "preset": cfg.preset, "model_config": to_dict(cfg.model_config),
           "data": to_dict(cfg.data), "train": to_dict(cfg.train)}
    if getattr(cfg, "stages", None):
        out["stages"] = _as_written(cfg.stages)
    if getattr(cfg, "run_wide", None):
        out["run_wide"] = _as_written(cfg.run_wide)
    return out


def _as_written(obj: Any) -> Any:
    """``obj`` with every ``--set`` value as YAML writes it back: its YAML value, or its text
    where that reads differently (``007``, ``0.10``, ``True``), which every field type reads as
    the ``--set`` did."""
    if isinstance(obj, dict):
        return {k: _as_written(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_as_written(v) for v in obj]
    if isinstance(obj, _SetText):
        v = obj.value
        canonical = {True: "true", False: "false", None: "null"}.get(v) \
            if v is None or isinstance(v, bool) else repr(v)
        return v if canonical == str(obj) else str(obj)
    return obj


def experiment_yaml(cfg: ExperimentConfig) -> str:
    """``experiment_to_dict(cfg)`` as YAML (``--print-config``, a run's ``config.yaml``), after
    one comment line per source whose ``data.options`` were left out for another dataset
    (comments: ``--config`` reads the values back unchanged)."""
    import yaml

    return dropped_notes(cfg) + yaml.safe_dump(experiment_to_dict(cfg), sort_keys=False)


def dropped_notes(cfg: ExperimentConfig, prefix: str = "") -> str:
    """One YAML comment line per source whose ``data.options`` ``cfg`` left out for another
    dataset than its ``data.name`` (``prefix``: a stage's ``"stage 's1' (model): "``)."""
    return "".join(f"# {prefix}data.options of {source} for dataset {dataset!r} not applied to "
                   f"data.name {cfg.data.name!r}: {', '.join(keys)}\n"
                   for source, dataset, keys in getattr(cfg, "dropped_options", ()))
