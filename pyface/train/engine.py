"""The training engine: one :class:`Trainer` for every model.

Randomness is a pure function of ``(seed, rank, step)``: every step reseeds torch's and Python's
generators from it, and batches are a pure function of ``(seed, step)`` (``StepBatchSampler``).
Together with the saved modules, EMA copies and optimizer states this makes ``--resume`` continue
bit-exactly on CPU (a deterministic GPU run needs ``torch.use_deterministic_algorithms`` too).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import torch

from pyface import checkpoint as ckpt
from pyface.train import distributed as D
from pyface.train.config import (ExperimentConfig, experiment_to_dict, experiment_yaml,
                                 saved_config, to_dict)
from pyface.train.ema import EMA
from pyface.train.model import ModelDefinitionError, Phase, StepContext, TrainableModel
from pyface.train.monitor import Board, image_grid, save_png, save_video
from pyface.train.schedules import lr_factor

log = logging.getLogger("pyface.train")


#: Where a dataset item's key comes from on disk (docs/data.md), for the error of
#: :func:`check_data_keys`.
_KEY_SOURCES = {"image": "frames/", "camera": "each video's dataset.json (EG3D cameras)",
                "coeffs": "each video's coeffs.npy (257 3DMM coefficients)",
                "landmarks": "each video's landmarks.npy", "mask": "each video's masks/",
                "motion": "coeffs.npy, read by data.name=motion_windows"}


def check_data_keys(model, dataset, cfg=None) -> None:
    """Raises :class:`pyface.data.format.DataError` when item 0 of ``dataset`` lacks a key that
    ``model.data_keys()`` (optional) lists: a nested mapping ``{key: sub-keys or None}``, e.g.
    ``{"source": {"image": None, "coeffs": None}}``. The message names the model, the dataset,
    the missing key, the file it comes from and the keys the items have."""
    need = model.data_keys() if hasattr(model, "data_keys") else None
    if not need:
        return
    from pyface.data.format import DataError

    item = dataset[0]

    def missing(spec, it, prefix):
        for k, sub in spec.items():
            where = f"{prefix}[{k!r}]"
            if not isinstance(it, dict) or k not in it:
                return where, k, prefix, sorted(it) if isinstance(it, dict) else type(it).__name__
            if sub:
                found = missing(sub, it[k], where)
                if found:
                    return found
        return None

    found = missing(need, item, "item")
    if found is None:
        return
    where, key, parent, have = found
    name = type(model).__name__ if cfg is None else f"{cfg.model}"
    data = "" if cfg is None else (f" (data.name={cfg.data.name}, data.path="
                                   f"{cfg.data.path or 'unset: the built-in set'})")
    src = _KEY_SOURCES.get(key)
    have = ", ".join(have) if isinstance(have, list) else have
    raise DataError(f"data{data}: model {name} needs {where}" + (f", from {src}" if src else "")
                    + "; the dataset's " + ("items have" if parent == "item" else f"{parent} has")
                    + f" {have}")


def label_pool_of(dataset, key: str, *, where: str = "", progress: bool = False,
                  shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Every item's ``key`` of ``dataset``, in item order, stacked ``(len(dataset), ...)`` (floats
    as float32; :meth:`TrainableModel.label_pools`): from ``dataset.item_labels(key)`` when the
    dataset has it and it answers (no image decoded), else read item by item (with a progress
    bar when ``progress``); a dataset wrapped by the model's ``data_transform`` is always read
    item by item (the transform may change the key). ``shape``: the shape each item's value
    must have, checked on item 0 before any other item is read. Raises
    :class:`pyface.data.format.DataError` naming the dataset (``where``) and the key when an
    item lacks the key, the values differ in shape (or from ``shape``) or are not finite."""
    from pyface.data.format import DataError

    what = f"data ({where or type(dataset).__name__})"
    n = len(dataset)
    if n == 0:
        raise DataError(f"{what}: no items to take the label pool {key!r} from")
    first = dataset[0]
    if not isinstance(first, dict) or key not in first:
        have = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise DataError(f"{what}: the model draws from every item's {key!r} (label_pools), "
                        f"the dataset's items have {have}")
    want = tuple(torch.as_tensor(first[key]).shape)
    if shape is not None and want != tuple(shape):
        raise DataError(f"{what}: the model draws from every item's {key!r} (label_pools), "
                        f"expected of shape {tuple(shape)}, item 0's has shape {want}")
    cheap = None if isinstance(dataset, MappedDataset) else getattr(dataset, "item_labels", None)
    pool = cheap(key) if callable(cheap) else None
    if pool is None:
        from tqdm import tqdm

        rows = []
        for i in tqdm(range(n), desc=f"label pool {key!r}", unit="item", disable=not progress,
                      dynamic_ncols=True):
            item = first if i == 0 else dataset[i]
            if key not in item:
                raise DataError(f"{what}: the model draws from every item's {key!r} "
                                f"(label_pools); item {i} has {sorted(item)}")
            row = torch.as_tensor(item[key])
            if tuple(row.shape) != want:
                raise DataError(f"{what}: label pool {key!r}: item {i} has shape "
                                f"{tuple(row.shape)}, item 0 {want}")
            rows.append(row)
        pool = torch.stack(rows)
    pool = torch.as_tensor(pool)
    pool = pool.float() if pool.is_floating_point() else pool
    if tuple(pool.shape) != (n, *want):
        raise DataError(f"{what}: label pool {key!r}: expected shape {(n, *want)} (one row per "
                        f"item, shaped as item 0's), got {tuple(pool.shape)}")
    bad = ~torch.isfinite(pool.reshape(n, -1)).all(1)
    if bad.any():
        raise DataError(f"{what}: label pool {key!r}: NaN or inf values in {int(bad.sum())} "
                        f"item(s), the first item {int(bad.nonzero()[0])}")
    return pool


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm, or an exploding gradient norm."""


@dataclass
class FitResult:
    step: int
    run_dir: str
    checkpoint: str | None
    losses: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    previews: list[str] = field(default_factory=list)
    seconds: float = 0.0


# where a run's checkpoints of steps after the one training starts from are moved
# (Trainer._set_aside_later_checkpoints): never listed, so never "latest" nor pruned
ABANDONED_DIR = "abandoned"

#: signals that stop training after the current step with a checkpoint: SIGTERM (SLURM's
#: preemption and time limit, torchrun's shutdown of its workers), SIGINT (Ctrl-C) and SIGUSR1
#: (SLURM's warning before the time limit, ``--signal=USR1@SECONDS``)
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1")
                     if hasattr(signal, n))


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the workers ignore the stop signals (a terminal's Ctrl-C
    or a job scheduler signals the whole process group), so the main process can finish its step
    and checkpoint before it shuts them down."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _exit_at_once(code: int, signum, frame) -> None:
    """The stop signals' handler once a stop has ended :meth:`Trainer.fit` (with
    ``Trainer.exit_after_stop``): the process is on its way out, and a further stop signal
    (torchrun's SIGTERM to the ranks still exiting once one has exited) ends it at once with
    ``code`` rather than by the signal's default action (exit code -15)."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a write this signal interrupted: exit all the same
            pass
    os._exit(code)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


def _total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _flat(d, prefix: str) -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


#: settings whose change on resume is expected (a moved run, the batch's own warning)
_RESUME_QUIET = {"train.run_dir", "train.batch_size", "train.init_from"}


def _changed_settings(theirs: dict, ours: dict) -> list[tuple[str, object, object]]:
    """(key, checkpoint value, run value) of the ``train.*`` / ``data.*`` settings that differ
    between two ``experiment_to_dict`` dicts (lists and tuples compare equal)."""
    out = []
    for section in ("train", "data"):
        a, b = _flat(theirs.get(section), f"{section}."), _flat(ours.get(section), f"{section}.")
        for k in sorted(set(a) | set(b)):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
                va, vb = list(va), list(vb)
            if k not in _RESUME_QUIET and va != vb:
                out.append((k, va, vb))
    return out


class MappedDataset(torch.utils.data.Dataset):
    """``dataset`` with ``fn(item)`` applied to every item (in the data loader's workers; see
    :meth:`TrainableModel.data_transform`); other attributes (``set_epoch``, ...) are those of
    ``dataset``."""

    def __init__(self, dataset, fn):
        self.dataset, self.fn = dataset, fn

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.fn(self.dataset[index])

    def __getattr__(self, name):
        if name in ("dataset", "fn"):       # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


class Trainer:
    """Trains a :class:`~pyface.train.model.TrainableModel` on a dataset.

    Args:
        cfg: the experiment config (``pyface.train.config.build_experiment``).
        model: the model; default: built from the registry by ``cfg.model`` right after
            ``torch.manual_seed(train.seed)`` (a model passed in keeps the caller's
            initialisation). Not a ``torch.compile(model)`` wrapper (its ``state_dict`` keys
            carry the ``_orig_mod.`` prefix): ``train.compile`` compiles in place.
        dataset: a map-style dataset whose items are dicts of tensors and depend on the index only;
            default: built from the registry by ``cfg.data.name``.
    """

    def __init__(self, cfg: ExperimentConfig, model: TrainableModel | None = None,
                 dataset=None):
        try:
            self._build(cfg, model, dataset)
        except BaseException:
            # a config error found after the process group was joined (or a failed dataset):
            # leave what this init joined and hooked, as close() would; a group the caller
            # joined (initialized_here False) is left as it was
            self._hooks = getattr(self, "_hooks", [])
            self._patient = getattr(self, "_patient", None)
            dist_info = getattr(self, "dist", None)
            for h in self._hooks:
                h.remove()
            self._hooks = []
            if dist_info is not None:
                try:
                    D.leave_group(self._patient)
                finally:
                    self._patient = None
                    D.shutdown(dist_info)
            raise

    def _build(self, cfg: ExperimentConfig, model, dataset) -> None:
        """``__init__``'s work (which cleans up after it when it raises)."""
        from pyface.train import registry

        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):        # torch.compile(model): OptimizedModule
            raise ValueError(
                f"model: expected the {type(inner).__name__} itself, got torch.compile's wrapper "
                f"of it ({type(model).__name__}), whose state_dict keys start with '_orig_mod.', "
                f"so its checkpoints would not load into a {type(inner).__name__} (pyface.models."
                "load, --resume, train.init_from); pass the model and set train.compile (e.g. "
                "--set train.compile=default), which compiles its compile_modules in place and "
                "keeps the keys")
        t = cfg.train
        if t.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision: expected 'fp32' or 'bf16', got {t.precision!r}")
        if t.steps < 0 or t.batch_size <= 0:
            raise ValueError(f"train.steps / train.batch_size must be >= 0 / > 0, got {t.steps} / "
                             f"{t.batch_size}")
        self.dist, self.device = D.init_distributed(t.device)
        if t.batch_size % self.dist.world_size:
            raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the "
                             f"{self.dist.world_size} ranks (the global batch is split into "
                             "equal shares); use a multiple of the number of ranks")
        #: this rank's share of the global batch (``train.batch_size / world size``)
        self.local_batch = t.batch_size // self.dist.world_size
        self.cfg = cfg = self._resolve_local_batch(cfg, model)
        self.run_dir = t.run_dir.format(model=cfg.model)
        torch.manual_seed(t.seed)  # identical initialisation on every rank
        random.seed(t.seed)
        from pyface._backend import BACKENDS

        if t.backend is not None and t.backend not in BACKENDS:
            raise ValueError(f"train.backend: expected one of {BACKENDS} or null, got "
                             f"{t.backend!r}")
        self.model = model if model is not None else registry.build_model(cfg.model,
                                                                          cfg.model_config)
        if cfg.model_config is None:
            cfg.model_config = getattr(self.model, "cfg", None)
        self.model.to(self.device)
        #: what ``train.init_from`` loaded (checkpoint, loaded / missing / unexpected /
        #: mismatched keys, EMA copies), or None
        self.init_report: dict | None = None
        if t.init_from:
            self.init_report = self.init_weights(t.init_from)
        if self.dist.enabled:
            D.broadcast_module(self.model)
        self.optimizers = self.model.build_optimizers()
        self._check_optimizers()
        self._opt_params = {k: [p for g in o.param_groups for p in g["params"]]
                            for k, o in self.optimizers.items()}
        self._base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in self.optimizers.items()}
        unknown = sorted(set(t.grad_clip_per) - set(self.optimizers))
        if unknown:
            raise ValueError(f"train.grad_clip_per: unknown optimizer {unknown[0]!r}; the model "
                             f"built {sorted(self.optimizers)}")
        self.phases: list[Phase] = list(self.model.phases())
        if not self.phases:
            raise ModelDefinitionError(f"{type(self.model).__name__}.phases() returned no phase; "
                                       "a step runs at least one (default: [Phase('main', "
                                       "'main')])")
        seen_phases = set()
        for ph in self.phases:
            if not isinstance(ph, Phase):
                raise ModelDefinitionError(
                    f"{type(self.model).__name__}.phases() must return a list of "
                    f"pyface.train.Phase(name, optimizer, ...), got an item {ph!r}")
            if ph.name in seen_phases:
                raise ModelDefinitionError(
                    f"{type(self.model).__name__}.phases(): two phases are named {ph.name!r} "
                    "(the name prefixes the logged values)")
            seen_phases.add(ph.name)
            names = (ph.optimizer,) if isinstance(ph.optimizer, str) else ph.optimizer or ()
            for name in names:
                if name not in self.optimizers:
                    raise ValueError(f"phase {ph.name!r} uses optimizer {name!r}; the model "
                                     f"built {sorted(self.optimizers)}")
            for name in ph.frozen:
                try:
                    self.model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"phase {ph.name!r} freezes {name!r}, which is not a "
                                     f"sub-module of {type(self.model).__name__}") from None
        self.ema = EMA(self.model, t.ema)
        if self.init_report is not None:
            self._init_ema(self.init_report.pop("_tensors"))
        # gradient all-reduce overlapped with the backward: one hook per parameter, active only
        # while the engine's own backward runs (self._reducer is set)
        self._reducer: D.BucketedAllReduce | None = None
        self._reducers: dict[tuple, D.BucketedAllReduce] = {}
        self._hooks = []
        if self.dist.enabled and t.overlap_grad_reduce:
            seen = set()
            for ps in self._opt_params.values():
                for p in ps:
                    if id(p) not in seen:
                        seen.add(id(p))
                        self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_ready))
        self._t_back = self._t_opt = self._t_update = 0.0
        #: buckets whose all-reduce started inside a backward (overlap at work), and the
        #: number of updates whose gradients were averaged each way
        self.buckets_overlapped = 0
        self.reductions = {"bucketed": 0, "flat": 0}
        # rank-local parameters (param groups with "local": True): per optimizer, their ids
        self._local_ids = {k: {id(p) for g in o.param_groups if g.get("local")
                               for p in g["params"]} for k, o in self.optimizers.items()}
        #: under torchrun: the gloo group whose waits for rank 0's own work (dataset preparation,
        #: checkpoints, previews) last as long as that work (``D.patient_group``)
        self._patient = D.patient_group() if self.dist.enabled else None
        self.dataset = dataset if dataset is not None else self._build_dataset(cfg)
        check_data_keys(self.model, self.dataset, cfg)      # before any step, not in the first
        transform = self.model.data_transform() if hasattr(self.model, "data_transform") \
            else None
        if transform is not None and not callable(transform):
            raise ModelDefinitionError(f"{type(self.model).__name__}.data_transform() must return "
                                       f"a function fn(item) -> item or None, got "
                                       f"{type(transform).__name__}")
        if transform is not None:       # the model's per-item preparation, in the workers
            self.dataset = MappedDataset(self.dataset, transform)
        self._set_label_pools(cfg)
        self.step = 0
        self.last_losses: dict[str, float] = {}
        self._stop_signal: int | None = None
        #: an exit code (``pyface train``: 143): once a stop signal on any rank has ended
        #: :meth:`fit`, a further stop signal ends the process at once with this code instead of
        #: meeting the handlers that were there before ``fit`` (the default action: exit code
        #: -15); None (default): they are restored
        self.exit_after_stop: int | None = None
        self._loaded: tuple[str | None, int | None] = (None, None)   # (checkpoint, its step)
        self._board: Board | None = None
        #: set to a dict to collect per-step seconds in "model" (forward + losses), "backward",
        #: "optimizer" and "total" (bench: the rest is engine overhead)
        self.timings: dict[str, list[float]] | None = None
        from pyface.nn.compiling import parse_compile

        #: how ``train.compile`` compiles (None: off)
        self.compile_options = parse_compile(t.compile, what="train.compile")
        #: the sub-modules compiled (:meth:`compile_model`; ``ema.<name>.<path>`` for EMA
        #: copies), None before the first step
        self.compiled: list[str] | None = None

    def _set_label_pools(self, cfg: ExperimentConfig) -> None:
        """Hands the model every item's value of the keys its ``label_pools()`` names
        (:func:`label_pool_of`), on the model's device."""
        keys = self.model.label_pools() if hasattr(self.model, "label_pools") else ()
        if isinstance(keys, str) or not all(isinstance(k, str) for k in keys or ()):
            raise ModelDefinitionError(f"{type(self.model).__name__}.label_pools() must return a "
                                       f"tuple of item keys (strings), got {keys!r}")
        where = (f"data.name={cfg.data.name}, data.path="
                 f"{cfg.data.path or 'unset: the built-in set'}")
        for key in keys or ():
            shape = self.model.label_pool_shape(key) \
                if hasattr(self.model, "label_pool_shape") else None
            pool = label_pool_of(self.dataset, key, where=where, progress=self.dist.is_main
                                 and cfg.train.progress, shape=shape)
            self.model.set_label_pool(key, pool.to(self.device))
            log.info("label pool %r: %d items of shape %s", key, len(pool),
                     tuple(pool.shape[1:]))

    def _build_dataset(self, cfg: ExperimentConfig):
        """The registry's dataset of ``cfg.data``; under torchrun rank 0 builds it first and the
        other ranks after it, so that what a dataset prepares once on disk (the synthetic set
        generated into an empty ``data.path``, a cache) is written by one rank and read by the
        others instead of every rank writing it at once; on several nodes the first rank of each
        other node builds it next (before the other ranks of its node), for a ``data.path`` on
        each node's own disk. The others wait as long as the preparation takes
        (:func:`pyface.train.distributed.in_turns`), not ``PYFACE_DIST_TIMEOUT``."""
        from pyface.train import registry

        if not self.dist.enabled:
            return registry.build_dataset(cfg.data)
        # rank 0 first; then the first rank of each other node (a data.path on the node's own
        # disk is prepared there once; on a shared one it is found ready); then the rest. The
        # waits last as long as the preparation takes (not PYFACE_DIST_TIMEOUT)
        turn = 0 if self.dist.is_main else 1 if self.dist.local_rank == 0 else 2
        return D.in_turns(lambda: registry.build_dataset(cfg.data), turn, 3, self._patient)

    def _resolve_local_batch(self, cfg: ExperimentConfig, model) -> ExperimentConfig:
        """``cfg`` with the model's ``local_batch_field`` (if it has one) set to this rank's
        share of the batch when it is None; an explicit value below the share raises."""
        import dataclasses

        from pyface.train import registry

        cls = type(model) if model is not None else registry.model_class(cfg.model)
        key = getattr(cls, "local_batch_field", None)
        mc = cfg.model_config if cfg.model_config is not None else getattr(model, "cfg", None)
        if not key or mc is None or not dataclasses.is_dataclass(mc):
            return cfg
        value = getattr(mc, key)
        share = (f"train.batch_size / ranks = {cfg.train.batch_size} / "
                 f"{self.dist.world_size} = {self.local_batch}")
        if value is None:
            if model is not None:
                raise ValueError(f"model.{key}: None in the config of the model passed in; "
                                 f"build it with {key}={self.local_batch} ({share})")
            return dataclasses.replace(cfg, model_config=dataclasses.replace(
                mc, **{key: self.local_batch}))
        if value < self.local_batch:
            raise ValueError(f"model.{key}={value}: smaller than this rank's share of the batch "
                             f"({share}); leave it unset (null: derived from the batch) or "
                             f"set it to {self.local_batch}")
        return cfg

    # ----------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.model.state_dict().items():
            tensors[f"model.{k}"] = v
        for name, m in self.ema.modules.items():
            for k, v in m.state_dict().items():
                tensors[f"ema.{name}.{k}"] = v
        optim = {}
        for name, opt in self.optimizers.items():
            tt, info = ckpt.optimizer_to_flat(opt, f"optim.{name}")
            tensors.update(tt)
            optim[name] = info
        meta = {"kind": "train", "step": self.step, "experiment": experiment_to_dict(self.cfg),
                "optimizers": optim, "world_size": self.dist.world_size,
                "ema_modules": list(self.ema.modules), "torch": torch.__version__}
        return tensors, meta

    def save_checkpoint(self, path: str | None = None) -> str | None:
        """Write a checkpoint (main rank only) and mark it latest; returns its path."""
        if not self.dist.is_main:
            return None
        tensors, meta = self.state()
        path = path or ckpt.checkpoint_path(self.run_dir, self.step)
        ckpt.save_folder(path, tensors, meta)
        ckpt.mark_latest(path)
        ckpt.prune_checkpoints(self.run_dir, self.cfg.train.keep_ckpts)
        log.info("saved checkpoint %s", path)
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore model, EMA, optimizers and step; a mismatch raises CheckpointError."""
        tensors, meta = ckpt.load_folder(path)
        where = f"checkpoint {path!r}"
        if meta.get("kind") != "train":
            raise ckpt.CheckpointError(f"{where}: holds {meta.get('kind')!r} weights, not a "
                                       "training state; use it as pretrained weights instead")
        exp = meta.get("experiment", {})
        mine = experiment_to_dict(self.cfg)
        if exp.get("model") != mine["model"]:
            raise ckpt.CheckpointError(f"{where}: trained model {exp.get('model')!r}, this run "
                                       f"trains {mine['model']!r}")
        theirs, ours = exp.get("model_config") or {}, mine["model_config"] or {}
        try:        # a key the checkpoint lacks (a field added since) counts as its default,
            # or as the earlier behaviour the config class lists for it (saved_before)
            theirs = {**to_dict(type(self.cfg.model_config)()),
                      **saved_config(type(self.cfg.model_config), theirs)}
        except TypeError:                 # a config without defaults for every field
            pass
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        share = getattr(type(self.model), "local_batch_field", None)
        reshaped = share in diff        # another share of the batch per rank (ranks, batch)
        if reshaped:
            diff.remove(share)
        if diff:
            details = ", ".join(f"model.{k}: checkpoint {theirs.get(k)!r} vs run "
                                f"{ours.get(k)!r}" for k in diff[:5])
            more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
            raise ckpt.CheckpointError(
                f"{where}: model config differs ({details}{more}); a resumed run keeps its "
                "model config: repeat the run's --preset and model.* settings, or resume with "
                "its config (--config RUN/config.yaml --resume)")
        if exp.get("train", {}).get("batch_size") != self.cfg.train.batch_size:
            log.warning("resuming with train.batch_size=%d, the checkpoint used %s: the data "
                        "order will differ from an uninterrupted run", self.cfg.train.batch_size,
                        exp.get("train", {}).get("batch_size"))
        ranks = meta.get("world_size")
        if isinstance(ranks, int) and ranks != self.dist.world_size and self.dist.is_main:
            log.warning("resuming a run trained on %d rank%s with %d: the global batch (train."
                        "batch_size) and the data order are kept, but randomness drawn inside "
                        "step (seeded per rank), batch statistics (taken per rank) and the "
                        "gradient summation order change, so the run does not continue exactly "
                        "as it would have on %d; resume with the same number of ranks for "
                        "that", ranks, "" if ranks == 1 else "s", self.dist.world_size, ranks)
        changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in _changed_settings(exp, mine)]
        if changed:
            log.warning("resuming with train/data settings that differ from the checkpoint's "
                        "(this command's values apply from step %d on): %s", int(meta["step"]),
                        "; ".join(changed))
        state = ckpt.sub_state(tensors, "model")
        drop: dict[str, set[str]] = {k: set() for k in self.optimizers}
        if reshaped:
            # rank-local parameters of one row per item: the checkpoint holds rank 0's rows
            # only, which inner loops restart every batch, so they and their optimizer state
            # start afresh at the new share
            local = set().union(*self._local_ids.values())
            own = self.model.state_dict()
            for n, p in self.model.named_parameters():
                if id(p) in local and n in state and state[n].shape != own[n].shape:
                    state[n] = own[n]
            for k, params in self._opt_params.items():
                drop[k] = {str(i) for i, p in enumerate(params) if id(p) in local}
            log.warning("resuming with model.%s=%s, the checkpoint has %s (another share of the "
                        "batch per rank): the rank-local parameters and their optimizer state "
                        "start afresh", share, ours.get(share), theirs.get(share))
        ckpt.load_module_state(self.model, state, where + " (model)")
        for name, m in self.ema.modules.items():
            st = ckpt.sub_state(tensors, f"ema.{name}")
            if not st:
                log.warning("%s has no EMA of %r; starting it from the current weights", path,
                            name)
                m.load_state_dict(self.model.get_submodule(name).state_dict())
            else:
                ckpt.load_module_state(m, st, f"{where} (ema.{name})")
        for name, opt in self.optimizers.items():
            info = meta.get("optimizers", {}).get(name)
            if info is None:
                raise ckpt.CheckpointError(f"{where}: no state for optimizer {name!r}")
            if drop[name]:
                pre = f"optim.{name}."
                info = dict(info, scalars={i: v for i, v in info.get("scalars", {}).items()
                                           if i not in drop[name]})
                ts = {k: v for k, v in tensors.items() if not k.startswith(pre)
                      or k[len(pre):].split(".", 1)[0] not in drop[name]}
            else:
                ts = tensors
            ckpt.optimizer_from_flat(opt, ts, info, f"optim.{name}", where)
        self._base_lrs = {k: [g.get("initial_lr", g["lr"]) for g in o.param_groups]
                          for k, o in self.optimizers.items()}
        self.step = int(meta["step"])
        self._loaded = (path, self.step)
        if self.dist.enabled:
            D.broadcast_module(self.model)

    def resume(self, where: str = "auto") -> str | None:
        """``"auto"``: the latest checkpoint of the run folder, if any; else a checkpoint path
        or another run folder (its latest checkpoint)."""
        path = ckpt.latest_checkpoint(self.run_dir) if where == "auto" else where
        if where != "auto" and os.path.isdir(os.path.join(where, "checkpoints")) \
                and not os.path.isfile(os.path.join(where, ckpt.META_FILE)):
            path = ckpt.latest_checkpoint(where)
            if path is None:
                raise ckpt.CheckpointError(f"--resume {where}: a run folder without a complete "
                                           "checkpoint")
        if path is None:
            log.info("no checkpoint in %s; starting from scratch", self.run_dir)
            return None
        try:
            self.load_checkpoint(path)
        except ckpt.CheckpointError as exc:
            older = [p for _, p in ckpt.list_checkpoints(self.run_dir)
                     if os.path.abspath(p) != os.path.abspath(path)]
            if older:
                raise ckpt.CheckpointError(f"{exc}\nOther checkpoints of this run (resume one "
                                           f"with --resume PATH): {', '.join(older)}") from None
            raise
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def init_weights(self, where: str) -> dict:
        """Initialise the model's weights from a checkpoint (``train.init_from``).

        ``where``: a checkpoint folder, or a run folder (its latest checkpoint). Weights only: the
        model config, optimizer state and step of the checkpoint are ignored, so a stage can start
        from another stage's run. Tensors whose name and shape match are loaded; the others are
        reported (missing: kept at their initialisation; unexpected: ignored; shape mismatch:
        kept at their initialisation) in the log and in ``run_dir/init_from.json``; nothing
        matching raises ``CheckpointError``. The resolved checkpoint path replaces
        ``train.init_from`` in the run's config.yaml.
        """
        path = where
        if os.path.isdir(where) and not os.path.isfile(os.path.join(where, ckpt.META_FILE)):
            path = ckpt.latest_checkpoint(where)
            if path is None:
                raise ckpt.CheckpointError(f"train.init_from={where!r}: a folder without a "
                                           "checkpoint (expected a checkpoint folder or a run "
                                           "folder with checkpoints/)")
        tensors, meta = ckpt.load_folder(path)
        state = ckpt.sub_state(tensors, "model") if meta.get("kind") == "train" else tensors
        own = self.model.state_dict()
        loaded = {k: v for k, v in state.items()
                  if k in own and tuple(v.shape) == tuple(own[k].shape)}
        report = {
            "checkpoint": os.path.abspath(path),
            "checkpoint_model": (meta.get("experiment") or {}).get("model"),
            "checkpoint_step": meta.get("step"),
            "loaded": len(loaded),
            "missing": [k for k in own if k not in state],
            "unexpected": [k for k in state if k not in own],
            "mismatched": [f"{k}: checkpoint {tuple(state[k].shape)} vs model "
                           f"{tuple(own[k].shape)}" for k in own
                           if k in state and tuple(state[k].shape) != tuple(own[k].shape)],
        }
        if not loaded:
            raise ckpt.CheckpointError(
                f"train.init_from={where!r}: no tensor of {path} matches the model by name and "
                f"shape ({len(report['missing'])} model keys, e.g. {report['missing'][:3]}; "
                f"checkpoint keys e.g. {report['unexpected'][:3]})")
        self.model.load_state_dict(loaded, strict=False)
        partial = report["missing"] or report["unexpected"] or report["mismatched"]
        (log.warning if partial else log.info)(
            "initialised %d tensors from %s%s", len(loaded), path,
            "" if not partial else
            f"; missing (kept at init): {report['missing'][:6]}; unexpected (ignored): "
            f"{report['unexpected'][:6]}; shape mismatches (kept at init): "
            f"{report['mismatched'][:6]}")
        self.cfg.train.init_from = report["checkpoint"]
        report["_tensors"] = tensors if meta.get("kind") == "train" else {}
        return report

    def _init_ema(self, tensors: dict) -> None:
        """EMA copies after ``init_from``: the checkpoint's EMA of a module when it matches that
        module exactly, else the initialised weights."""
        used = []
        for name, m in self.ema.modules.items():
            st = ckpt.sub_state(tensors, f"ema.{name}")
            own = m.state_dict()
            if st and set(st) == set(own) and all(st[k].shape == own[k].shape for k in own):
                m.load_state_dict(st)
                used.append(name)
        self.init_report["ema_from_checkpoint"] = used

    def ema_module(self, name: str) -> torch.nn.Module:
        """The EMA copy of sub-module ``name``, or the live sub-module without an EMA."""
        if name in self.ema.modules:
            return self.ema.modules[name]
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"ctx.ema: {name!r} is not a sub-module of "
                             f"{type(self.model).__name__} (EMA copies: "
                             f"{sorted(self.ema.modules)})") from None

    # ----------------------------------------------------------------------------------------
    # torch.compile (train.compile)
    # ----------------------------------------------------------------------------------------
    def compile_model(self) -> list[str]:
        """Compiles the model's :attr:`~pyface.train.model.TrainableModel.compile_modules` in
        place with ``train.compile`` (:func:`pyface.nn.compile_modules`) once, before the first
        step (after the model, its EMA copies and optimizers are built and any checkpoint is
        loaded; compiling in place keeps parameter names, ``state_dict`` keys and checkpoints
        as they are, so a run resumes compiled or not). EMA copies are compiled only where the
        model names them (``ema.<module>.<path>``). Logs one line (which modules, which backend
        and mode), or one warning when the model names none. Returns the names compiled; called
        by :meth:`train_step`."""
        if self.compiled is not None:
            return self.compiled
        self.compiled = []
        opts = self.compile_options
        if opts is None:
            return self.compiled
        from pyface.nn.compiling import compile_modules

        cls = type(self.model)
        names = tuple(getattr(cls, "compile_modules", ()) or ())
        if not names:
            if self.dist.is_main:
                log.warning("train.compile=%s: %s names no modules to compile (its "
                            "compile_modules is empty); training uncompiled",
                            self.cfg.train.compile, cls.__name__)
            return self.compiled
        live = [n for n in names if n != "ema" and not n.startswith("ema.")]
        self.compiled += compile_modules(self.model, live, opts)
        for name in names:
            if name not in live:
                self.compiled += self._compile_ema(name, opts)
        if self.dist.is_main:
            log.info("train.compile=%s: compiling %s of %s with torch.compile, %s (the first "
                     "steps compile; new input shapes recompile)", self.cfg.train.compile,
                     ", ".join(n or "(the model)" for n in self.compiled) or "nothing",
                     cls.__name__, opts.describe())
        return self.compiled

    def _compile_ema(self, name: str, opts) -> list[str]:
        """Compiles ``ema.<module>.<path>`` of ``compile_modules``: ``<path>`` inside the EMA copy
        of ``<module>``; nothing when that module has no EMA copy."""
        from pyface.nn.compiling import compile_modules

        rest = name[len("ema."):]
        owners = [k for k in self.ema.modules if rest == k or rest.startswith(k + ".")]
        if not owners:
            return []
        owner = max(owners, key=len)
        sub = rest[len(owner) + 1:]
        return [f"ema.{owner}" + (f".{n}" if n else "")
                for n in compile_modules(self.ema.modules[owner], [sub], opts)]

    # ----------------------------------------------------------------------------------------
    # One step
    # ----------------------------------------------------------------------------------------
    def _backend(self):
        from pyface.ops import use_backend

        return use_backend(self.cfg.train.backend) if self.cfg.train.backend else \
            contextlib.nullcontext()

    @contextlib.contextmanager
    def _frozen(self, phase: Phase):
        saved = []
        for name in phase.frozen:
            for p in self.model.get_submodule(name).parameters():
                saved.append((p, p.requires_grad))
                p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in reversed(saved):
                p.requires_grad_(flag)

    def _norm(self, shared: list[torch.Tensor], local: list[torch.Tensor]) -> torch.Tensor:
        """L2 norm of the gradients of ``shared`` (equal on every rank after the all-reduce) and
        of the rank-local ``local`` parameters on all ranks together."""
        n = _total_norm(shared).to(self.device)
        if not local:
            return n
        sq = _total_norm(local).to(self.device).square().reshape(1)
        if self.dist.enabled:
            torch.distributed.all_reduce(sq)
        return (n.square() + sq[0]).sqrt()

    def reset_optimizer(self, name: str) -> None:
        """Forget optimizer ``name``'s state (moments, step counts): an inner loop that starts
        over every batch calls it (``ctx.reset_optimizer``) before its first update."""
        if name not in self.optimizers:
            raise KeyError(f"reset_optimizer: no optimizer {name!r}; the model built "
                           f"{sorted(self.optimizers)}")
        self.optimizers[name].state.clear()

    def _grad_ready(self, p: torch.Tensor) -> None:
        r = self._reducer
        if r is not None:
            r.mark_ready(p)

    def _apply_update(self, names: str | tuple[str, ...], loss: torch.Tensor, *, phase: str,
                      inner: bool, retain_graph: bool = False,
                      overlap: bool = True, lr_scale: float = 1.0) -> torch.Tensor:
        """One backward of ``loss`` into the trainable parameters of optimizer(s) ``names``, then
        gradient averaging over ranks, guard, clipping, step(s) (every group's lr times
        ``lr_scale`` for this step only) and cleared gradients. Returns the pre-clip grad norm
        over all of them."""
        t_enter = time.perf_counter()
        t = self.cfg.train
        names = (names,) if isinstance(names, str) else tuple(names)
        what = f"phase {phase!r}" + (f" (in-step update of {', '.join(map(repr, names))})"
                                     if inner else "")
        for name in names:
            if name not in self.optimizers:
                raise KeyError(f"{what}: no optimizer {name!r}; the model built "
                               f"{sorted(self.optimizers)}")
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) \
                or not math.isfinite(lr_scale) or lr_scale <= 0:
            raise ValueError(f"{what}: lr_scale: expected a finite number > 0 (the factor of "
                             f"the learning rates for this update), got {lr_scale!r}")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ModelDefinitionError(f"{what}: the loss must be a scalar tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else loss!r}")
        parts = []      # per optimizer: (optimizer, trainable, shared, local, local ids)
        for name in names:
            trainable = [p for p in self._opt_params[name] if p.requires_grad]
            ids = self._local_ids.get(name, set())
            parts.append((self.optimizers[name], trainable,
                          [p for p in trainable if id(p) not in ids],
                          [p for p in trainable if id(p) in ids], ids))
        params = [p for part in parts for p in part[1]]
        shared = [p for part in parts for p in part[2]]
        local = [p for part in parts for p in part[3]]
        if not params:
            raise ValueError(f"{what}: every parameter of optimizer "
                             f"{' and '.join(map(repr, names))} is frozen")
        if not loss.requires_grad:
            raise ModelDefinitionError(
                f"{what}: the loss does not require grad (computed under torch.no_grad, "
                f"detached, or from no trainable parameter), so it cannot update optimizer "
                f"{' and '.join(map(repr, names))}"
                + ("; a phase whose step applies its updates with ctx.update takes "
                   "optimizer=None" if not inner else ""))
        multi = self.dist.enabled
        clock = time.perf_counter
        for part in parts:
            part[0].zero_grad(set_to_none=True)
        t0 = clock()
        reducer = None
        if multi and overlap and t.overlap_grad_reduce and shared:
            key = (names, tuple(id(p) for p in shared))
            reducer = self._reducers.get(key)
            if reducer is None:
                reducer = self._reducers[key] = D.BucketedAllReduce(
                    shared, self.dist.world_size, t.bucket_mb)
        self._reducer = reducer
        try:
            torch.autograd.backward(loss, inputs=params, retain_graph=retain_graph)
        except BaseException:
            if reducer is not None:
                reducer.reset()
            raise
        finally:
            self._reducer = None
        self._t_back += clock() - t0
        if multi:
            if reducer is not None:
                self.buckets_overlapped += reducer.launched_in_backward
                reducer.finish()
                self.reductions["bucketed"] += 1
            elif shared:
                D.average_gradients(shared, self.dist.world_size)
                self.reductions["flat"] += 1
            # rank-local parameters: the gradient of the global (rank-mean) loss
            grads = [p.grad for p in local if p.grad is not None]
            if grads:
                torch._foreach_div_(grads, float(self.dist.world_size))
        gnorm = self._norm(shared, local)
        if t.nan_guard:
            loss_g = loss.detach().float().reshape(1).clone()
            if multi:       # every rank judges the same numbers, so all stop together
                torch.distributed.all_reduce(loss_g)
                loss_g = loss_g / self.dist.world_size
            self._guard(what, float(loss_g[0]), float(gnorm))
        for name, (opt, trainable, sh, lo, ids) in zip(names, parts):
            for group in opt.param_groups:
                if group.get("max_norm"):
                    gp = [p for p in group["params"] if p.grad is not None]
                    if gp:
                        torch.nn.utils.clip_grads_with_norm_(
                            gp, group["max_norm"],
                            self._norm([p for p in gp if id(p) not in ids],
                                       [p for p in gp if id(p) in ids]), foreach=True)
            clip = t.grad_clip_per.get(name, t.grad_clip)
            if clip is not None and clip > 0 and trainable:
                torch.nn.utils.clip_grads_with_norm_(trainable, clip, self._norm(sh, lo),
                                                     foreach=True)
        t1 = clock()
        # lr_scale: this step's rates only; the groups' own values are put back whatever happens
        scaled = [(g, g["lr"]) for part in parts for g in part[0].param_groups] \
            if lr_scale != 1 else []
        for g, lr in scaled:
            g["lr"] = lr * lr_scale
        try:
            for part in parts:
                part[0].step()
        finally:
            for g, lr in scaled:
                g["lr"] = lr
        self._t_opt += clock() - t1
        for part in parts:
            part[0].zero_grad(set_to_none=True)
        self._t_update += clock() - t_enter
        return gnorm.detach().float()

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_lrs(self) -> float:
        f = lr_factor(self.cfg.train.lr_schedule, self.step, self.cfg.train.steps)
        for name, opt in self.optimizers.items():
            for g, base in zip(opt.param_groups, self._base_lrs[name]):
                g.setdefault("initial_lr", base)
                g["lr"] = base * f
        return f

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Run every due phase on ``batch`` (this rank's share); returns detached losses."""
        if self.compiled is None:
            self.compile_model()
        with self._backend():
            return self._train_step(batch)

    def _train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        t = self.cfg.train
        timing = self.timings is not None
        clock = time.perf_counter
        t_start = clock()
        t_model = 0.0
        self._t_back = self._t_opt = self._t_update = 0.0
        torch.manual_seed(_step_seed(t.seed, self.dist.rank, self.step))
        random.seed(_step_seed(t.seed, self.dist.rank, self.step))
        self._set_lrs()
        ctx = StepContext(step=self.step, images_seen=self.step * t.batch_size,
                          batch_size=t.batch_size, rank=self.dist.rank,
                          world_size=self.dist.world_size, device=self.device, engine=self)
        out: dict[str, torch.Tensor] = {}
        for ph in self.phases:
            if self.step % ph.interval:
                continue
            ctx.phase = ph.name
            with self._frozen(ph):
                inner0 = self._t_update
                t0 = clock()
                with self._autocast():
                    losses = self.model.step(ph.name, batch, ctx)
                t_model += clock() - t0 - (self._t_update - inner0)   # less in-step updates
                losses = self._check_losses(ph, losses)
                if ph.optimizer is not None:
                    if "loss" not in losses:
                        raise ModelDefinitionError(f"{type(self.model).__name__}.step({ph.name!r}) must "
                                       f"return the total loss under 'loss'; got keys "
                                       f"{sorted(losses)}")
                    gnorm = self._apply_update(ph.optimizer, losses["loss"], phase=ph.name,
                                               inner=False, overlap=ph.overlap)
            for k, v in losses.items():
                out[f"{ph.name}/{k}"] = v.detach().float()
            if ph.optimizer is not None:
                out[f"{ph.name}/grad_norm"] = gnorm
        self.ema.update(self.step, t.batch_size, self.step * t.batch_size)
        self.step += 1
        if timing:
            for k, v in (("model", t_model), ("backward", self._t_back),
                         ("optimizer", self._t_opt), ("total", clock() - t_start)):
                self.timings.setdefault(k, []).append(v)
        return out

    def _check_optimizers(self) -> None:
        name = type(self.model).__name__
        opts = self.optimizers
        if not isinstance(opts, dict) or not opts:
            raise ModelDefinitionError(
                f"{name}.build_optimizers() must return a non-empty dict {{name: "
                f"torch.optim.Optimizer}} (the names phases and ctx.update use), got "
                + (repr(opts) if isinstance(opts, dict) else type(opts).__name__))
        own = {id(p) for p in self.model.parameters()}
        for k, o in opts.items():
            if not isinstance(k, str) or not isinstance(o, torch.optim.Optimizer):
                raise ModelDefinitionError(
                    f"{name}.build_optimizers(): entry {k!r} must map a name (str) to a "
                    f"torch.optim.Optimizer, got {type(k).__name__} -> {type(o).__name__}")
            foreign = [tuple(p.shape) for g in o.param_groups for p in g["params"]
                       if id(p) not in own]
            if foreign:
                raise ModelDefinitionError(
                    f"{name}.build_optimizers(): optimizer {k!r} holds "
                    + ("1 tensor that is not a parameter" if len(foreign) == 1 else
                       f"{len(foreign)} tensors that are not parameters")
                    + f" of the model (shapes {foreign[:3]}): they would "
                    "be neither moved to the device, averaged over ranks nor checkpointed; make "
                    "them nn.Parameter attributes of the model (or of a sub-module)")

    def _check_losses(self, ph: Phase, losses) -> dict:
        """``step``'s return value: a dict of name -> tensor (numbers are converted)."""
        name = f"{type(self.model).__name__}.step({ph.name!r})"
        if not isinstance(losses, dict):
            raise ModelDefinitionError(
                f"{name} must return a dict {{'loss': scalar tensor, other name: value to "
                f"log}}, got {type(losses).__name__}")
        out = {}
        for k, v in losses.items():
            if isinstance(v, torch.Tensor):
                out[k] = v
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and not (
                    k == "loss" and ph.optimizer is not None):
                out[k] = torch.tensor(float(v))
            else:
                raise ModelDefinitionError(
                    f"{name} returned {k!r} as {type(v).__name__}; expected "
                    + ("a scalar tensor (the loss its phase's optimizer updates)"
                       if k == "loss" and ph.optimizer is not None else "a tensor or a number"))
        return out

    def _guard(self, what: str, loss: float, gnorm: float) -> None:
        t = self.cfg.train
        bad = None
        if not math.isfinite(loss):
            bad = f"loss is {loss}"
        elif not math.isfinite(gnorm):
            bad = f"gradient norm is {gnorm}"
        elif gnorm > t.max_grad_norm:
            bad = f"gradient norm {gnorm:.3g} exceeds train.max_grad_norm={t.max_grad_norm:g}"
        if bad is None:
            return
        last = ckpt.latest_checkpoint(self.run_dir)
        raise NonFiniteError(
            f"step {self.step}, {what}: {bad}; stopped before applying the update. "
            + (f"Last good checkpoint: {last} (resume with --resume, lower the learning rate or "
               "set train.grad_clip)" if last else "No checkpoint was written yet.")
            + " Parameters in memory are those of the last good step.")

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------
    def _loader(self):
        sampler = D.StepBatchSampler(len(self.dataset), self.cfg.train.batch_size,
                                     rank=self.dist.rank, world_size=self.dist.world_size,
                                     seed=self.cfg.data.seed + self.cfg.train.seed,
                                     start_step=self.step, steps=self.cfg.train.steps)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.cfg.train.num_workers,
            worker_init_fn=_ignore_stop_signals if self.cfg.train.num_workers > 0 else None,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.cfg.train.num_workers > 0)

    def _to_device(self, batch):
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        return batch

    def preview_batch(self, n: int = 8) -> dict:
        items = [self.dataset[i] for i in range(min(n, len(self.dataset)))]
        return self._to_device(torch.utils.data.default_collate(items))

    def write_previews(self, video: bool) -> list[str]:
        if not self.dist.is_main:
            return []
        with self._backend():
            return self._write_previews(video)

    def _write_previews(self, video: bool) -> list[str]:
        paths = []
        was = self.model.training
        self.model.eval()
        try:
            batch = self.preview_batch()
            rows = self.model.preview(batch)
            name = type(self.model).__name__
            if rows is not None and not (isinstance(rows, dict) and all(
                    isinstance(v, torch.Tensor) and v.dim() == 4 for v in rows.values())):
                got = type(rows).__name__ if not isinstance(rows, dict) else ", ".join(
                    f"{k}: {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                    for k, v in rows.items())
                raise ModelDefinitionError(f"{name}.preview(batch) must return a dict {{name: "
                                           f"(N, 3, H, W) tensor in [-1, 1]}}, got {got}")
            if rows:
                grid = image_grid(rows)
                p = save_png(grid, os.path.join(self.run_dir, "previews",
                                                f"step-{self.step:06d}.png"))
                paths.append(p)
                if self._board is not None:
                    self._board.image("preview", grid, self.step)
            if video and self.cfg.train.video_frames > 0:      # 0: no preview clips
                frames = self.model.preview_video(batch, self.cfg.train.video_frames)
                if frames is not None and not (isinstance(frames, torch.Tensor)
                                               and frames.dim() == 4 and frames.shape[1] == 3):
                    got = tuple(frames.shape) if isinstance(frames, torch.Tensor) \
                        else type(frames).__name__
                    raise ModelDefinitionError(f"{name}.preview_video(batch, frames) must return "
                                               f"a (T, 3, H, W) tensor in [-1, 1] or None, got "
                                               f"{got}")
                if frames is not None:
                    clip = save_video(frames, os.path.join(
                        self.run_dir, "previews", f"step-{self.step:06d}.mp4"))
                    paths += [clip] if clip else []
        finally:
            self.model.train(was)
        return paths

    def _drop_later_previews(self) -> list[str]:
        """Deletes the previews (``previews/step-<step>.*``) of steps after the one training
        starts from: they are from a run that went on past it (steps after its last
        checkpoint, an earlier checkpoint resumed, a run that was longer than this
        ``train.steps``, or a run trained over from scratch), so the folder's previews
        describe one run, as TensorBoard's events after that step are purged. Logged with their
        number; returns their paths."""
        import re

        folder = os.path.join(self.run_dir, "previews")
        if not os.path.isdir(folder):
            return []
        later = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                       if (m := re.fullmatch(r"step-(\d+)\.[A-Za-z0-9]+", n))
                       and int(m.group(1)) > self.step
                       and os.path.isfile(os.path.join(folder, n)))
        for p in later:
            os.remove(p)
        if later:
            line = (f"deleted {len(later)} preview{'' if len(later) == 1 else 's'} of steps "
                    f"after step {self.step} ("
                    + ", ".join(os.path.basename(p) for p in later[:4])
                    + (", ..." if len(later) > 4 else "") + "): from a run that went past it, "
                    "not this one")
            if log.isEnabledFor(logging.INFO):
                log.info(line)              # the console and log.txt
            else:
                self._log_to_file(line)
        return later

    def _set_aside_later_checkpoints(self) -> list[str]:
        """Moves the checkpoints of steps after the one training starts from into
        ``checkpoints/abandoned/`` (``ckpt-<step>``, ``ckpt-<step>.1``, ... when the name is
        taken): they are from a run that went on past it (an earlier checkpoint resumed, a
        longer ``train.steps``, a run trained over from scratch), and left among this run's
        they would be its "latest" (``--resume RUN`` would continue the abandoned run, not this
        one) and the pruning by step would delete this run's checkpoints before them. Not
        deleted: they are the user's weights. ``checkpoints/latest`` is pointed at the newest
        checkpoint left (removed when none is left) if it named one of them. Logged with their
        names; returns their new paths."""
        root = os.path.join(self.run_dir, "checkpoints")
        later = [p for s, p in ckpt.list_checkpoints(self.run_dir) if s > self.step]
        if not later:
            return []
        named = ckpt.latest_checkpoint(self.run_dir)
        dest = os.path.join(root, ABANDONED_DIR)
        os.makedirs(dest, exist_ok=True)
        moved = []
        for p in later:
            name = target = os.path.basename(p)
            n = 0
            while os.path.exists(os.path.join(dest, target)):
                n += 1
                target = f"{name}.{n}"
            os.rename(p, os.path.join(dest, target))
            moved.append(os.path.join(dest, target))
        if named in later:
            left = ckpt.list_checkpoints(self.run_dir)
            if left:
                ckpt.mark_latest(left[-1][1])
            else:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(root, ckpt.LATEST_FILE))
        log.warning("moved %d checkpoint%s of steps after step %d to %s (%s): from a run that "
                    "went past it, not this one; --resume never picks them (resume one with "
                    "--resume PATH, or delete them)", len(moved), "" if len(moved) == 1 else "s",
                    self.step, os.path.join("checkpoints", ABANDONED_DIR),
                    ", ".join(os.path.relpath(m, dest) for m in moved))
        return moved

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt(
                f"a second signal ({signal.Signals(signum).name}) stopped training at once "
                f"during step {self.step}; the latest checkpoint: "
                f"{ckpt.latest_checkpoint(self.run_dir) or 'none'}")
        self._stop_signal = signum
        if self.dist.is_main:
            log.warning("received %s: saving a checkpoint after this step and stopping",
                        signal.Signals(signum).name)
        else:       # only rank 0 writes checkpoints
            log.warning("received %s: stopping after this step with the other ranks (rank 0 "
                        "saves the checkpoint)", signal.Signals(signum).name)

    def _setup_run_dir(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            f.write(experiment_yaml(self.cfg))
        if self.init_report is not None:
            import json

            with open(os.path.join(self.run_dir, "init_from.json"), "w") as f:
                json.dump(self.init_report, f, indent=1)
        handler = logging.FileHandler(os.path.join(self.run_dir, "log.txt"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("pyface").addHandler(handler)
        self._log_handler = handler

    def _log_losses(self, totals: dict, steps_per_s: float, to_console: bool) -> None:
        """One line per ``log_every`` steps: into log.txt always, and on the console when there
        is no progress bar (``train.progress=false``), so a batch job still shows its progress."""
        line = (f"step {self.step}/{self.cfg.train.steps}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in totals.items())
                + f" ({steps_per_s * self.cfg.train.batch_size:.3g} images/s, "
                  f"{steps_per_s:.2f} steps/s)")
        if to_console and log.isEnabledFor(logging.INFO):
            log.info(line)              # the console and log.txt (the handler on "pyface")
        else:       # the file only; also when INFO is off (a script that set up no logging)
            self._log_to_file(line)

    def _log_to_file(self, line: str) -> None:
        if self._log_handler is not None:
            self._log_handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, line,
                                                    None, None))

    def _learning_rates(self) -> dict[str, float]:
        """``lr/<optimizer>`` (``lr/<optimizer>/<group index>`` with several parameter groups):
        the rates the last step used (set from the schedule before the step)."""
        out = {}
        for name, opt in self.optimizers.items():
            groups = opt.param_groups
            for i, g in enumerate(groups):
                out[f"lr/{name}" if len(groups) == 1 else f"lr/{name}/{i}"] = float(g["lr"])
        return out

    def fit(self) -> FitResult:
        """Train until ``train.steps``, or until a signal of :data:`STOP_SIGNALS` (SIGTERM,
        SIGINT, SIGUSR1) on any rank: the current step finishes, every rank stops after the same
        step, a checkpoint is written and the result is ``interrupted`` (a second signal raises
        KeyboardInterrupt at once)."""
        from tqdm import tqdm

        t = self.cfg.train
        main = self.dist.is_main
        self._log_handler = None
        if main:
            prev = ckpt.latest_checkpoint(self.run_dir)
            if self.step == 0 and prev is not None:
                log.warning("%s already holds checkpoints (latest: %s); training from scratch "
                            "(they are moved to checkpoints/abandoned/) - use --resume to "
                            "continue instead",
                            self.run_dir, os.path.basename(prev))
            self._setup_run_dir()
            loaded = self._loaded[0] if self._loaded[1] == self.step else None
            self._log_to_file(
                f"training {self.cfg.model} from step {self.step} to {t.steps}"
                + (f", resumed from {loaded}" if loaded and self.step else "")
                + (" (step lines above for later steps, if any, are from the interrupted run; "
                   "those steps run again below)" if loaded and self.step < t.steps else "")
                + (" (finished: no step runs; the previews are written again)"
                   if self.step >= t.steps else ""))
            # the first step logged is self.step + 1 (a step is logged once it has run): what
            # an interrupted run logged after its last checkpoint is dropped, not drawn twice
            self._board = Board(os.path.join(self.run_dir, "tb") if t.tensorboard else None,
                                purge_step=self.step + 1)
            self._drop_later_previews()
            self._set_aside_later_checkpoints()
        self._stop_signal = None
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                old_handlers[s] = signal.signal(s, self._on_signal)
        self.model.train()
        start, t0 = self.step, time.perf_counter()
        # the rates logged are those of the steps since the previous log line (the first
        # interval starts here, so a resumed run's does not span the downtime)
        t_log, step_log, t_wait = t0, self.step, 0.0
        cuda = self.device.type == "cuda"
        previews: list[str] = []
        # this run's checkpoint of the current step (the one resumed from) is not written
        # again when no step runs (a finished run resumed)
        loaded, at = self._loaded
        mine = loaded is not None and os.path.dirname(os.path.abspath(loaded)) == \
            os.path.abspath(os.path.join(self.run_dir, "checkpoints"))
        last_ckpt, saved_at = (loaded, at) if mine and at == self.step else (None, None)
        interrupted = False
        bar = tqdm(total=t.steps, initial=self.step, disable=not (main and t.progress),
                   dynamic_ncols=True, unit="step")
        redirect = contextlib.ExitStack()
        if not bar.disable:     # console log lines (checkpoints, warnings) above the bar
            from tqdm.contrib.logging import logging_redirect_tqdm

            redirect.enter_context(logging_redirect_tqdm())
        acc: dict[str, torch.Tensor] = {}
        n_acc: dict[str, int] = {}   # per key: lazy phases do not run every step
        try:
            t_ask = time.perf_counter()
            for batch in self._loader():
                t_wait += time.perf_counter() - t_ask      # waiting for the data loader
                losses = self.train_step(self._to_device(batch))
                for k, v in losses.items():
                    acc[k] = acc[k] + v if k in acc else v
                    n_acc[k] = n_acc.get(k, 0) + 1
                bar.update(1)
                if (t.log_every and self.step % t.log_every == 0) or self.step == t.steps:
                    self.last_losses = self._reduce_log(acc, n_acc)
                    acc, n_acc = {}, {}
                    if main:
                        totals = {k[:-len("/loss")]: v for k, v in self.last_losses.items()
                                  if k.endswith("/loss")}   # phase -> total loss
                        if len(totals) == 1:
                            totals = {"loss": next(iter(totals.values()))}
                        bar.set_postfix({k: f"{v:.4g}" for k, v in totals.items()},
                                        refresh=False)
                        now = time.perf_counter()
                        dt = max(now - t_log, 1e-9)
                        rate = (self.step - step_log) / dt
                        self._log_losses(totals, rate, bar.disable)
                        if self._board:
                            self._board.scalars({f"loss/{k}" if not k.endswith("grad_norm")
                                                 else f"grad/{k}": v
                                                 for k, v in self.last_losses.items()},
                                                self.step)
                            # the schedule's factor and the rates of the step just run (its
                            # index is self.step - 1: self.step counts the steps done)
                            speed = {"lr_factor": lr_factor(t.lr_schedule, self.step - 1,
                                                            t.steps),
                                     **self._learning_rates(),
                                     "speed/steps_per_s": rate,
                                     "speed/images_per_s": rate * t.batch_size,
                                     "speed/data_wait_fraction": t_wait / dt}
                            if cuda:        # the process's peak (the stats are not reset)
                                speed["memory/peak_gib"] = \
                                    torch.cuda.max_memory_allocated(self.device) / 2**30
                            self._board.scalars(speed, self.step)
                    t_log, step_log, t_wait = time.perf_counter(), self.step, 0.0
                alone = False           # rank 0 wrote a checkpoint or previews, the others not
                if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.steps:
                    last_ckpt = self.save_checkpoint() or last_ckpt
                    saved_at, alone = self.step, True
                    if self._board:     # on disk up to the checkpoint, should the process die
                        self._board.flush()
                if t.image_every and self.step % t.image_every == 0 and self.step < t.steps:
                    previews += self.write_previews(
                        video=bool(t.video_every) and self.step % t.video_every == 0)
                    alone = True
                if alone and self._patient is not None:
                    # the others wait as long as rank 0 writes, not PYFACE_DIST_TIMEOUT
                    D.wait_for_main(self._patient)
                if D.any_flag(self._stop_signal is not None, self.dist, self.device):
                    interrupted = True
                    break
                t_ask = time.perf_counter()
            if saved_at != self.step:      # not twice at one step (a signal after ckpt_every)
                last_ckpt = self.save_checkpoint() or last_ckpt
            if not interrupted:
                previews += self.write_previews(video=True)
        finally:
            redirect.close()
            bar.close()
            stopped = interrupted or self._stop_signal is not None   # or a second signal
            for s, h in old_handlers.items():
                signal.signal(s, h if not stopped or self.exit_after_stop is None else
                              functools.partial(_exit_at_once, self.exit_after_stop))
            if self._board:
                self._board.flush()
                self._board.close()
                self._board = None
            if self._log_handler is not None:
                logging.getLogger("pyface").removeHandler(self._log_handler)
                self._log_handler.close()
        if interrupted and main:
            log.warning("stopped at step %d; resume with --resume", self.step)
        return FitResult(step=self.step, run_dir=self.run_dir, checkpoint=last_ckpt,
                         losses=dict(self.last_losses), interrupted=interrupted,
                         previews=previews, seconds=time.perf_counter() - t0)

    def _reduce_log(self, acc: dict[str, torch.Tensor], n: dict[str, int]) -> dict[str, float]:
        """Means over the steps each key was produced in, averaged over the ranks that produced
        it (every rank runs the same phases, but a model may log a measure on rank 0 only, e.g.
        EG3D's depth measures, so the ranks' key sets are exchanged first)."""
        keys = sorted(acc)
        if self.dist.enabled:
            gathered: list = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, keys)
            keys = sorted(set().union(*gathered))
        if not keys:
            return {}
        vals = torch.stack([acc[k].float().reshape(()) / n[k] if k in acc
                            else torch.zeros((), device=self.device) for k in keys])
        if self.dist.enabled:
            have = torch.tensor([float(k in acc) for k in keys], device=self.device)
            both = torch.stack([vals.to(self.device), have])
            torch.distributed.all_reduce(both)
            vals = both[0] / both[1]
        return dict(zip(keys, vals.tolist()))

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        D.leave_group(self._patient)
        self._patient = None
        D.shutdown(self.dist)
