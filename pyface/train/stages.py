"""Multi-stage training: ``pyface train M --preset P`` trains M's earlier stages first.

A model declares ``stages = (Stage(name, model, checkpoint_key), ...)`` (see
:class:`pyface.train.model.Stage`). For every stage whose ``model.<checkpoint_key>`` is empty,
:func:`prepare_stages` trains the registered model ``stage.model`` with the same preset in
``<run_dir>/stages/<name>`` (recursively, for a stage that has stages itself) and sets the key to
that run folder. A finished stage run (its latest checkpoint at ``train.steps``) is reused; an
unfinished one is resumed, so re-running the command after an interruption continues where it
stopped.

A stage gets its own recipe and the preset (with the final model's additions for that preset,
``Stage.presets``), plus the run-wide settings of :data:`SHARED_KEYS` (device, precision,
compilation, logging, data location, seed) given by ``--set`` or the ``--config`` file
(``ExperimentConfig.run_wide``) and the overrides addressed
to it by name, ``stages.<name>.<key>=<value>`` (e.g. ``stages.s1.model.neutral_weight=5``; a
stage's own stages are addressed by their names too; a YAML config's ``stages:`` section,
``ExperimentConfig.stages``, likewise, below the ``--set`` items); the other overrides apply
to the final model only.

A finished stage run is reused only if its model config equals the one this command asks for
(the stage checkpoints of its own stages aside); otherwise :func:`prepare_stages` stops with a
ConfigError naming the differing keys, so a changed stage setting never silently reuses a stale
run.
"""
from __future__ import annotations

import dataclasses
import logging
import os

log = logging.getLogger("pyface.train")

#: the run-wide keys: set by ``--set`` or a ``--config`` file, they reach every stage too
#: (everything else configures the final model only)
SHARED_KEYS = ("train.device", "train.precision", "train.compile", "train.progress",
               "train.tensorboard", "train.num_workers", "train.seed", "train.log_every",
               "data.path", "data.skip_bad")


#: prefix of the ``--set`` keys addressed to one stage: ``stages.<name>.<key>=<value>``
STAGE_PREFIX = "stages."


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def shared_overrides(overrides: list[str] | None) -> list[str]:
    """The ``key=value`` items of ``overrides`` whose key is in :data:`SHARED_KEYS`."""
    return [o for o in overrides or [] if _key(o) in SHARED_KEYS]


def own_overrides(overrides: list[str] | None) -> list[str]:
    """``overrides`` without the items addressed to a stage (``stages.<name>.<key>=...``)."""
    return [o for o in overrides or [] if not _key(o).startswith(STAGE_PREFIX)]


def stage_overrides(overrides: list[str] | None, name: str) -> list[str]:
    """The items ``stages.<name>.<key>=<value>`` of ``overrides``, as ``<key>=<value>``."""
    prefix = f"{STAGE_PREFIX}{name}."
    return [o.strip()[len(prefix):] for o in overrides or [] if _key(o).startswith(prefix)]


def stage_names(model_cls) -> list[str]:
    """The names of ``model_cls``'s stages and, recursively, of their own stages."""
    from pyface.train.registry import model_class

    names: list[str] = []
    for stage in getattr(model_cls, "stages", ()) or ():
        names.append(stage.name)
        names.extend(stage_names(model_class(stage.model)))
    return names


def _stages_by_name(model_cls, parent: str | None = None) -> dict:
    """``{name: (Stage, the name of the stage it belongs to or None)}`` of ``model_cls``'s
    stages and, recursively, their own stages."""
    from pyface.train.registry import model_class

    out = {}
    for stage in getattr(model_cls, "stages", ()) or ():
        out[stage.name] = (stage, parent)
        out.update(_stages_by_name(model_class(stage.model), stage.name))
    return out


def check_stage_overrides(model: str, model_cls, overrides: list[str] | None) -> None:
    """ConfigError if an item ``stages.<name>.<key>=...`` of ``overrides`` names no stage of
    ``model`` or no key, or sets the stage's ``train.run_dir`` (a stage trains in
    ``<run_dir>/stages/<name>``)."""
    from pyface.train.config import ConfigError

    names = stage_names(model_cls)
    for o in overrides or []:
        key = _key(o)
        if not key.startswith(STAGE_PREFIX):
            continue
        rest = key[len(STAGE_PREFIX):]
        name = next((n for n in sorted(names, key=len, reverse=True)
                     if rest.startswith(n + ".") and len(rest) > len(n) + 1), None)
        if name is None:
            raise ConfigError(f"--set {o}: expected stages.<stage>.<key>=<value> with <stage> "
                              f"a stage of {model!r} ({', '.join(names) or 'it has none'})"
                              f", got {key!r}")
        if rest[len(name) + 1:] == "train.run_dir":
            stage, parent = _stages_by_name(model_cls)[name]
            where = f"stages.{parent}." if parent else ""
            raise ConfigError(f"--set {o}: stage {name!r} trains in the run folder's "
                              f"stages/{name}; to use a run of {stage.model!r} from elsewhere, "
                              f"pass it as --set {where}model.{stage.checkpoint_key}=RUN")


def check_stage_section(model: str, model_cls, stages: dict | None) -> None:
    """ConfigError if ``stages`` (``ExperimentConfig.stages``: a YAML file's ``stages:``
    section and the ``--set stages.*`` items) names no stage of ``model`` or sets a stage's
    ``train.run_dir``."""
    from pyface.train.config import ConfigError, did_you_mean

    by_name = _stages_by_name(model_cls)
    for name, section in (stages or {}).items():
        if name not in by_name:
            raise ConfigError(f"stages.{name}: not a stage of {model!r} "
                              f"({', '.join(by_name) or 'it has none'})"
                              f"{did_you_mean(name, by_name, 'stages.')}")
        train = section.get("train") if isinstance(section, dict) else None
        if isinstance(train, dict) and "run_dir" in train:
            stage, parent = by_name[name]
            where = f"stages.{parent}." if parent else ""
            raise ConfigError(f"stages.{name}.train.run_dir: stage {name!r} trains in the run "
                              f"folder's stages/{name}; to use a run of {stage.model!r} from "
                              f"elsewhere, pass it as --set {where}model."
                              f"{stage.checkpoint_key}=RUN")


def stage_run_finished(run_dir: str, steps: int) -> str | None:
    """The latest checkpoint of ``run_dir`` if it reached ``steps``, else None."""
    from pyface import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        return None
    try:
        meta = ckpt.read_meta(latest)
    except ckpt.CheckpointError:
        return None
    return latest if int(meta.get("step") or 0) >= steps else None


def prepare_stages(model_cls, cfg, *, overrides: list[str] | None = None,
                   train_fn=None, dry_run: bool = False,
                   notes: list[str] | None = None,
                   plan: list[dict] | None = None) -> dict[str, str]:
    """Trains the missing stages of ``cfg`` (an ExperimentConfig of ``model_cls``) and sets
    their checkpoint keys in ``cfg.model_config``. Returns ``{checkpoint_key: run folder}`` of
    the stages it filled in.

    ``train_fn(stage_cfg) -> None`` trains one stage config (default: :func:`train_stage`, a
    :class:`~pyface.train.engine.Trainer` that resumes an unfinished run). ``dry_run``: build
    and check every stage config (and the reuse of finished stage runs) without training
    (``pyface train M --print-config``); ``cfg`` is left as it is. ``notes``: a list that gets
    the comment lines of the ``data.options`` each stage config left out for another dataset
    (the lines its run's ``config.yaml`` starts with), named by stage. ``plan``: a list that
    gets, in training order, one dict per stage to train or reuse: ``name``, ``model``,
    ``steps`` (its ``train.steps``), ``run_dir``, ``state`` ("train", "resume" or "reuse") and
    ``step`` (the latest checkpoint's step of a run to resume or reuse), for
    :func:`plan_lines`; with ``dry_run`` the reuse of a finished run is not logged (the real
    call logs it)."""
    if dry_run:
        import copy

        cfg = copy.deepcopy(cfg)
    from pyface.train.config import (ConfigError, build_experiment, dropped_notes, merge,
                                     parse_set)
    from pyface.train.registry import model_class

    train_fn = train_fn or train_stage
    filled: dict[str, str] = {}
    run_dir = cfg.train.run_dir.format(model=cfg.model)
    fields = {f.name for f in dataclasses.fields(cfg.model_config)}
    for stage in getattr(model_cls, "stages", ()) or ():
        if stage.checkpoint_key not in fields:
            raise ConfigError(f"stage {stage.name!r} of {cfg.model!r}: model.{stage.checkpoint_key} "
                              f"is not a field of {type(cfg.model_config).__name__}")
        if getattr(cfg.model_config, stage.checkpoint_key):
            continue
        stage_dir = os.path.join(run_dir, "stages", stage.name)
        stage_cls = model_class(stage.model)
        presets = getattr(stage_cls, "presets", None) or {}
        preset = cfg.preset if cfg.preset in presets else None
        if cfg.preset is not None and preset is None:
            log.warning("stage %r (%s) has no preset %r; training it with its recipe",
                        stage.name, stage.model, cfg.preset)
        extra = (getattr(stage, "presets", None) or {}).get(preset) if preset else None
        if extra:
            # the final model's preset configures its stage above the stage model's preset
            presets = {**presets, preset: merge(presets[preset], extra)}
        # the stage's own settings: the config's stages.<name> (a YAML file's, and the --set
        # items of cfg's command), then this call's --set stages.<name>.* items
        addressed = parse_set(overrides, texts=True).get("stages") or {}
        own = merge((cfg.stages or {}).get(stage.name) or {}, addressed.get(stage.name) or {})
        try:
            check_stage_section(cfg.model, model_cls, {stage.name: own})
            # the run-wide settings of cfg's --config file and --set items (cfg.run_wide), and
            # of this call's --set items (a caller's list that cfg was not built with)
            run_wide = merge(getattr(cfg, "run_wide", None) or {},
                             parse_set(shared_overrides(overrides), texts=True))
            stage_cfg = build_experiment(
                stage.model, stage_cls.Config, defaults=getattr(stage_cls, "recipe", {}),
                preset=preset, presets=presets, stage=(stage.name, own), run_wide=run_wide,
                overrides=[f"train.run_dir={stage_dir}"])
        except ConfigError as exc:
            raise ConfigError(f"stage {stage.name!r} ({stage.model}): {exc}") from None
        if notes is not None:
            notes.append(dropped_notes(stage_cfg, f"stage {stage.name!r} ({stage.model}): "))
        below = set(stage_names(stage_cls))      # its own stages' settings, for the recursion
        stage_cfg.stages = {k: v for k, v in (cfg.stages or {}).items() if k in below}
        prepare_stages(stage_cls, stage_cfg, overrides=overrides, train_fn=train_fn,
                       dry_run=dry_run, notes=notes, plan=plan)
        done = stage_run_finished(stage_dir, stage_cfg.train.steps)
        started = None
        if done:
            _check_reuse(stage, stage_cls, stage_cfg, done)
            if not (dry_run and plan is not None):
                log.info("stage %r: reusing the finished run %s", stage.name, done)
        else:
            from pyface import checkpoint as ckpt

            started = ckpt.latest_checkpoint(stage_dir) if os.path.isdir(stage_dir) else None
            if started:         # resumed below: only with the config it was started with
                _check_reuse(stage, stage_cls, stage_cfg, started, finished=False)
        if plan is not None:
            plan.append({"name": stage.name, "model": stage.model,
                         "steps": stage_cfg.train.steps, "run_dir": stage_dir,
                         "state": "reuse" if done else "resume" if started else "train",
                         "step": _checkpoint_step(done or started)})
        if done or dry_run:
            pass
        else:
            log.info("stage %r: training %s in %s", stage.name, stage.model, stage_dir)
            train_fn(stage_cfg)
            # under torchrun only rank 0 writes checkpoints (the others may not see it yet)
            if int(os.environ.get("RANK", "0")) == 0 and not stage_run_finished(stage_dir, stage_cfg.train.steps):
                raise RuntimeError(f"stage {stage.name!r} ({stage.model}) stopped before "
                                   f"train.steps={stage_cfg.train.steps}; run the command again "
                                   f"to continue it ({stage_dir})")
        setattr(cfg.model_config, stage.checkpoint_key, stage_dir)
        filled[stage.checkpoint_key] = stage_dir
    return filled


def _checkpoint_step(path: str | None) -> int | None:
    """The step of checkpoint ``path`` (None: no path, or no step it records)."""
    if not path:
        return None
    from pyface import checkpoint as ckpt

    try:
        return int(ckpt.read_meta(path).get("step") or 0)
    except (ckpt.CheckpointError, TypeError, ValueError):
        return None


def plan_lines(model: str, plan: list[dict], cfg) -> str:
    """What ``pyface train MODEL`` of a staged model trains, printed before any work: each stage
    of ``plan`` (:func:`prepare_stages`) with its steps and the ``--set`` that changes them,
    then the final model (``cfg``), whose ``train.steps`` is the plain ``--set train.steps``::

        pyface train otavatar: its stages train first, each for its own train.steps:
          stage 'eg3d' (eg3d): 1200 steps (--set stages.eg3d.train.steps=N) in runs/x/stages/eg3d
          otavatar: 2 steps (--set train.steps=N) in runs/x
    """
    lines = [f"pyface train {model}: its stages train first, each for its own train.steps:"]
    for p in plan:
        head = f"  stage {p['name']!r} ({p['model']}): "
        if p["state"] == "reuse":
            lines.append(f"{head}finished ({p['steps']} steps), reused from {p['run_dir']}")
            continue
        resumed = f", resumed from step {p['step']}" if p["state"] == "resume" else ""
        lines.append(f"{head}{p['steps']} steps{resumed} (--set stages.{p['name']}.train.steps"
                     f"=N) in {p['run_dir']}")
    lines.append(f"  {model}: {cfg.train.steps} steps (--set train.steps=N) in "
                 f"{cfg.train.run_dir.format(model=cfg.model)}")
    return "\n".join(lines)


def _check_reuse(stage, stage_cls, stage_cfg, latest: str, *, finished: bool = True) -> None:
    """ConfigError if the checkpoint ``latest`` of a stage run (finished, or to be resumed) was
    trained with another model config than ``stage_cfg`` (the checkpoint keys of the stage's own
    stages aside: they are run folders, which move with the run). A key the run's config lacks
    (a field added since) counts as the field's default, which keeps the earlier behaviour, or,
    where the default changed it, as the earlier value the config class lists in
    ``saved_before`` (:func:`pyface.train.config.saved_config`)."""
    from pyface import checkpoint as ckpt
    from pyface.train.config import (ConfigError, experiment_to_dict, merge, saved_config,
                                     to_dict)

    cls = type(stage_cfg.model_config)
    theirs = (ckpt.read_meta(latest).get("experiment") or {}).get("model_config") or {}
    try:
        theirs = merge(to_dict(cls()), saved_config(cls, theirs))
    except TypeError:                     # a config without defaults for every field
        pass
    ours = experiment_to_dict(stage_cfg)["model_config"] or {}
    paths = {s.checkpoint_key for s in getattr(stage_cls, "stages", ()) or ()}
    diff = sorted(k for k in set(theirs) | set(ours)
                  if k not in paths and theirs.get(k) != ours.get(k))
    if diff:
        kind = "finished" if finished else "unfinished"
        details = ", ".join(f"model.{k}: {kind} run {theirs.get(k)!r} vs this command "
                            f"{ours.get(k)!r}" for k in diff[:5])
        run_dir = stage_cfg.train.run_dir
        if finished:
            raise ConfigError(f"stage {stage.name!r}: the finished run {run_dir} was trained "
                              f"with another config ({details}); remove that folder to train the "
                              f"stage again, or pass --set model.{stage.checkpoint_key}={run_dir}"
                              " to use it as it is")
        import json

        def arg(v):         # a --set value YAML reads back
            return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))

        again = " ".join(f"--set stages.{stage.name}.model.{k}={arg(theirs.get(k))}"
                         for k in diff[:5])
        raise ConfigError(f"stage {stage.name!r}: the unfinished run {run_dir} (latest "
                          f"{os.path.basename(latest)}, short of train.steps="
                          f"{stage_cfg.train.steps}) was started with another config "
                          f"({details}); remove that folder to train the stage again with this "
                          f"config, or continue it with the settings it was started with "
                          f"({again})")


def train_stage(cfg) -> None:
    """Trains one stage config, resuming its run folder's latest checkpoint if any."""
    from pyface.train.engine import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.resume("auto")
        result = trainer.fit()
    finally:
        trainer.close()
    from pyface.train.distributed import wait_for_main

    # rank 0 has written the stage's checkpoint (and its last previews) before the next reads it
    wait_for_main()
    if result.interrupted:
        raise KeyboardInterrupt(f"stage run {result.run_dir} interrupted at step {result.step}")
