"""The training engine: one :class:`Trainer` for every model.

Randomness is a pure function of ``(seed, rank, step)``: every step reseeds torch's and Python's
generators from it, and batches are a pure function of ``(seed, step)`` (``StepBatchSampler``).
Together with the saved modules, EMA copies and optimizer states this makes ``--resume`` continue
bit-exactly on CPU (a deterministic GPU run needs ``torch.use_deterministic_algorithms`` too).
"""
from __future__ import annotations

import contextlib
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
from pyface.train.config import ExperimentConfig, experiment_to_dict
from pyface.train.ema import EMA
from pyface.train.model import Phase, StepContext, TrainableModel
from pyface.train.monitor import Board, image_grid, save_png, save_video
from pyface.train.schedules import lr_factor

log = logging.getLogger("pyface.train")


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


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


def _total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class Trainer:
    """Trains a :class:`~pyface.train.model.TrainableModel` on a dataset.

    Args:
        cfg: the experiment config (``pyface.train.config.build_experiment``).
        model: the model; default: built from the registry by ``cfg.model`` right after
            ``torch.manual_seed(train.seed)`` (a model passed in keeps the caller's
            initialisation).
        dataset: a map-style dataset whose items are dicts of tensors and depend on the index only;
            default: built from the registry by ``cfg.data.name``.
    """

    def __init__(self, cfg: ExperimentConfig, model: TrainableModel | None = None,
                 dataset=None):
        from pyface.train import registry

        self.cfg = cfg
        t = cfg.train
        if t.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision: expected 'fp32' or 'bf16', got {t.precision!r}")
        if t.steps < 0 or t.batch_size <= 0:
            raise ValueError(f"train.steps / train.batch_size must be >= 0 / > 0, got {t.steps} / "
                             f"{t.batch_size}")
        self.dist, self.device = D.init_distributed(t.device)
        if t.batch_size % self.dist.world_size:
            raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the "
                             f"{self.dist.world_size} ranks")
        self.local_batch = t.batch_size // self.dist.world_size
        self.run_dir = t.run_dir.format(model=cfg.model)
        torch.manual_seed(t.seed)  # identical initialisation on every rank
        random.seed(t.seed)
        self.model = model if model is not None else registry.build_model(cfg.model,
                                                                          cfg.model_config)
        if cfg.model_config is None:
            cfg.model_config = getattr(self.model, "cfg", None)
        self.model.to(self.device)
        if self.dist.enabled:
            D.broadcast_module(self.model)
        self.optimizers = self.model.build_optimizers()
        self._opt_params = {k: [p for g in o.param_groups for p in g["params"]]
                            for k, o in self.optimizers.items()}
        self._base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in self.optimizers.items()}
        self.phases: list[Phase] = list(self.model.phases())
        for ph in self.phases:
            if ph.optimizer not in self.optimizers:
                raise ValueError(f"phase {ph.name!r} uses optimizer {ph.optimizer!r}; the model "
                                 f"built {sorted(self.optimizers)}")
        self.ema = EMA(self.model, t.ema)
        self.dataset = dataset if dataset is not None else registry.build_dataset(cfg.data)
        self.step = 0
        self.last_losses: dict[str, float] = {}
        self._stop_signal: int | None = None
        self._board: Board | None = None
        #: set to a dict to collect per-step seconds in "model" (forward + losses), "backward",
        #: "optimizer" and "total" (bench: the rest is engine overhead)
        self.timings: dict[str, list[float]] | None = None

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
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if diff:
            details = ", ".join(f"model.{k}: checkpoint {theirs.get(k)!r} vs run "
                                f"{ours.get(k)!r}" for k in diff[:5])
            raise ckpt.CheckpointError(f"{where}: model config differs ({details})")
        if exp.get("train", {}).get("batch_size") != self.cfg.train.batch_size:
            log.warning("resuming with train.batch_size=%d, the checkpoint used %s: the data "
                        "order will differ from an uninterrupted run", self.cfg.train.batch_size,
                        exp.get("train", {}).get("batch_size"))
        ckpt.load_module_state(self.model, ckpt.sub_state(tensors, "model"), where + " (model)")
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
            ckpt.optimizer_from_flat(opt, tensors, info, f"optim.{name}", where)
        self._base_lrs = {k: [g.get("initial_lr", g["lr"]) for g in o.param_groups]
                          for k, o in self.optimizers.items()}
        self.step = int(meta["step"])
        if self.dist.enabled:
            D.broadcast_module(self.model)

    def resume(self, where: str = "auto") -> str | None:
        """``"auto"``: the latest checkpoint of the run folder, if any; else a checkpoint path."""
        path = ckpt.latest_checkpoint(self.run_dir) if where == "auto" else where
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

    # ----------------------------------------------------------------------------------------
    # One step
    # ----------------------------------------------------------------------------------------
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
        t = self.cfg.train
        timing = self.timings is not None
        clock = time.perf_counter
        t_start = clock()
        t_model = t_back = t_opt = 0.0
        torch.manual_seed(_step_seed(t.seed, self.dist.rank, self.step))
        random.seed(_step_seed(t.seed, self.dist.rank, self.step))
        self._set_lrs()
        ctx = StepContext(step=self.step, images_seen=self.step * t.batch_size,
                          batch_size=t.batch_size, rank=self.dist.rank,
                          world_size=self.dist.world_size, device=self.device)
        out: dict[str, torch.Tensor] = {}
        for ph in self.phases:
            if self.step % ph.interval:
                continue
            opt = self.optimizers[ph.optimizer]
            params = self._opt_params[ph.optimizer]
            opt.zero_grad(set_to_none=True)
            t0 = clock()
            with self._autocast():
                losses = self.model.step(ph.name, batch, ctx)
            t1 = clock()
            if "loss" not in losses:
                raise KeyError(f"{type(self.model).__name__}.step({ph.name!r}) must return the "
                               f"total loss under 'loss'; got keys {sorted(losses)}")
            loss = losses["loss"]
            loss.backward()
            t2 = clock()
            if self.dist.enabled:
                D.average_gradients(params, self.dist.world_size)
                lt = loss.detach().float().reshape(1).clone()
                torch.distributed.all_reduce(lt)
                loss_g = lt[0] / self.dist.world_size
            else:
                loss_g = loss.detach().float()
            gnorm = _total_norm(params)
            if t.nan_guard:
                self._guard(ph.name, float(loss_g), float(gnorm))
            if t.grad_clip is not None and t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip, foreach=True)
            t3 = clock()
            opt.step()
            t4 = clock()
            t_model, t_back, t_opt = t_model + t1 - t0, t_back + t2 - t1, t_opt + t4 - t3
            for k, v in losses.items():
                out[f"{ph.name}/{k}"] = v.detach().float()
            out[f"{ph.name}/grad_norm"] = gnorm.detach().float()
        self.ema.update(self.step, t.batch_size, self.step * t.batch_size)
        self.step += 1
        if timing:
            for k, v in (("model", t_model), ("backward", t_back), ("optimizer", t_opt),
                         ("total", clock() - t_start)):
                self.timings.setdefault(k, []).append(v)
        return out

    def _guard(self, phase: str, loss: float, gnorm: float) -> None:
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
            f"step {self.step}, phase {phase!r}: {bad}; stopped before applying the update. "
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
        paths = []
        was = self.model.training
        self.model.eval()
        try:
            batch = self.preview_batch()
            rows = self.model.preview(batch)
            if rows:
                grid = image_grid(rows)
                p = save_png(grid, os.path.join(self.run_dir, "previews",
                                                f"step-{self.step:06d}.png"))
                paths.append(p)
                if self._board is not None:
                    self._board.image("preview", grid, self.step)
            if video:
                frames = self.model.preview_video(batch, self.cfg.train.video_frames)
                if frames is not None:
                    paths.append(save_video(frames, os.path.join(
                        self.run_dir, "previews", f"step-{self.step:06d}.mp4")))
        finally:
            self.model.train(was)
        return paths

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        log.warning("received %s: saving a checkpoint after this step and stopping",
                    signal.Signals(signum).name)

    def _setup_run_dir(self) -> None:
        import yaml

        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(experiment_to_dict(self.cfg), f, sort_keys=False)
        handler = logging.FileHandler(os.path.join(self.run_dir, "log.txt"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("pyface").addHandler(handler)
        self._log_handler = handler

    def fit(self) -> FitResult:
        """Train until ``train.steps`` (or a SIGTERM/SIGINT, which checkpoints and stops)."""
        from tqdm import tqdm

        t = self.cfg.train
        main = self.dist.is_main
        self._log_handler = None
        if main:
            prev = ckpt.latest_checkpoint(self.run_dir)
            if self.step == 0 and prev is not None:
                log.warning("%s already holds checkpoints (latest: %s); training from scratch "
                            "and overwriting them - use --resume to continue instead",
                            self.run_dir, os.path.basename(prev))
            self._setup_run_dir()
            self._board = Board(os.path.join(self.run_dir, "tb") if t.tensorboard else None)
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                old_handlers[s] = signal.signal(s, self._on_signal)
        self.model.train()
        start, t0 = self.step, time.perf_counter()
        previews: list[str] = []
        last_ckpt = None
        interrupted = False
        bar = tqdm(total=t.steps, initial=self.step, disable=not (main and t.progress),
                   dynamic_ncols=True, unit="step")
        acc: dict[str, torch.Tensor] = {}
        n_acc: dict[str, int] = {}   # per key: lazy phases do not run every step
        try:
            for batch in self._loader():
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
                        if self._board:
                            self._board.scalars({f"loss/{k}" if not k.endswith("grad_norm")
                                                 else f"grad/{k}": v
                                                 for k, v in self.last_losses.items()},
                                                self.step)
                            self._board.scalars({"lr_factor": lr_factor(
                                t.lr_schedule, self.step, t.steps),
                                "speed/steps_per_s": (self.step - start) /
                                max(time.perf_counter() - t0, 1e-9)}, self.step)
                if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.steps:
                    last_ckpt = self.save_checkpoint() or last_ckpt
                if t.image_every and self.step % t.image_every == 0 and self.step < t.steps:
                    previews += self.write_previews(
                        video=bool(t.video_every) and self.step % t.video_every == 0)
                if D.any_flag(self._stop_signal is not None, self.dist, self.device):
                    interrupted = True
                    break
            last_ckpt = self.save_checkpoint() or last_ckpt
            if not interrupted:
                previews += self.write_previews(video=True)
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
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
        """Means over the steps each key was produced in, averaged over ranks (every rank runs
        the same phases, so the keys agree)."""
        if not acc:
            return {}
        keys = sorted(acc)
        vals = torch.stack([acc[k].float().reshape(()) / n[k] for k in keys])
        if self.dist.enabled:
            vals = vals.to(self.device)
            torch.distributed.all_reduce(vals)
            vals = vals / self.dist.world_size
        return dict(zip(keys, vals.tolist()))

    def close(self) -> None:
        D.shutdown(self.dist)
