"""``pyface train``."""
from __future__ import annotations

import logging
import os
import shutil
import sys


def add_parser(subparsers) -> None:
    from pyface.train.registry import MODELS

    p = subparsers.add_parser(
        "train", help="train a registered model (single process, or under torchrun)",
        description="Train a model. Config: the model's recipe < --preset < --config YAML < --set "
                    "overrides. A model built on earlier stages trains those first (in "
                    "RUN_DIR/stages/NAME, same preset; a finished stage run is reused) unless "
                    "their checkpoint is given (--set model.<stage>_checkpoint=RUN); --set "
                    "stages.<stage>.<key>=<value> configures one stage (e.g. "
                    "stages.s1.model.neutral_weight=5); the run-wide keys (train.device, "
                    "train.precision, train.seed, logging, data.path, data.skip_bad) of --set "
                    "or --config reach every stage too, other keys configure the final model "
                    "only: train.steps=N is the final model's steps, a stage's are "
                    "stages.<stage>.train.steps=N (a quick check of a staged model: pyface "
                    "train otavatar --preset tiny --set train.steps=2 --set "
                    "stages.eg3d.train.steps=2); the steps of every run are printed before "
                    "training starts. "
                    "Outputs go to train.run_dir (default runs/MODEL; a folder holding "
                    "checkpoints is refused unless --resume continues them or --overwrite "
                    "starts over): "
                    "config.yaml, log.txt, tb/ (TensorBoard), checkpoints/ and previews/ (PNG "
                    "grids and mp4 clips). Distributed: "
                    "torchrun --nproc_per_node=N -m pyface train MODEL ...",
        epilog="example: pyface train example --preset tiny --set train.run_dir=runs/ae")
    p.add_argument("model", help=f"registered model: {', '.join(sorted(MODELS))}, or a plugin's "
                                 "(entry-point group pyface.models, --import, PYFACE_PLUGINS)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="a preset of the model (tiny, gpu-short, full for the portrait models; "
                        "default: none, the model's recipe)")
    add_import_argument(p)
    p.add_argument("--config", default=None, metavar="YAML",
                   help="YAML with sections model/data/train (and stages: {NAME: {model/data/"
                        "train: ...}} for the stages) or a run's config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. train.steps=100 (repeatable; --print-config "
                        "shows the keys and their values)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (a checkpoint folder, or a run folder: its latest "
                        "checkpoint; a run folder's run, also moved or copied, continues in it "
                        "unless --set train.run_dir=DIR), or (no value) from train.run_dir's "
                        "latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a train.run_dir that holds checkpoints, deleting "
                        "its checkpoints/ and previews/ (without it such a folder is refused; a "
                        "staged model's finished stage runs are kept and reused)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip missing or corrupt videos of an on-disk dataset with a warning "
                        "instead of stopping with an error naming the file (data.skip_bad=true)")
    p.set_defaults(func=run_train, check=check_train)



def add_import_argument(p) -> None:
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers models or datasets with "
                        "pyface.train.register_model; repeatable; also PYFACE_PLUGINS=M1,M2)")


def resolve_device(spec: str | None, option: str = "--device") -> str:
    """A command's ``--device``: None -> CUDA when available, else CPU. A string torch does not
    parse, or a CUDA device on a machine without one, raises ValueError naming the option, what
    it expects and the value given."""
    import torch

    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(spec, option)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = " (a CPU-only build)" if torch.version.cuda is None else ""
            raise ValueError(f"{option}: got {spec!r}, but CUDA is not available to torch "
                             f"{torch.__version__}{build}; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{option}: got {spec!r}, but there "
                             + ("is 1 CUDA device (cuda:0)" if n == 1 else
                                f"are {n} CUDA devices (cuda:0..cuda:{n - 1})"))
    return spec


def check_device(spec: str | None, option: str = "--device"):
    """A command's ``--device`` as a ``torch.device`` (None: None), whether or not this machine
    has it (the check of a command line meant for another machine, ``PYFACE_PARSE_ONLY=1``); a
    string torch does not parse raises ValueError naming the option, what it expects and the
    value given."""
    import torch

    if spec is None:
        return None
    try:
        return torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option}: expected cpu, cuda or cuda:N, got {spec!r}") from None


def check_train(args) -> int:
    """``pyface train`` under ``PYFACE_PARSE_ONLY=1``: the config of the run and of every stage
    it would train first, built and checked as ``--print-config`` does (preset, ``--config``,
    ``--set`` keys and values, stage names), printed; nothing trained, no run folder written."""
    args.print_config = True
    return run_train(args)


def check_run_dir(cfg) -> None:
    """ConfigError if ``train.run_dir`` cannot be this model's run folder: a file, or a folder
    whose latest checkpoint is another model's (training there would replace that run's
    config.yaml and prune its checkpoints; resuming it fails)."""
    from pyface import checkpoint as ckpt
    from pyface.train.config import ConfigError

    run_dir = cfg.train.run_dir.format(model=cfg.model)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"train.run_dir={run_dir}: a file, not a folder; choose another "
                          f"train.run_dir")
    from pyface.cli import file_in_the_way

    blocking = None if os.path.exists(run_dir) else file_in_the_way(run_dir)
    if blocking is not None:
        raise ConfigError(f"train.run_dir={run_dir}: cannot create its folder: {blocking} is a "
                          "file")
    latest = ckpt.latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if latest is None:
        return
    try:
        other = (ckpt.read_meta(latest).get("experiment") or {}).get("model")
    except ckpt.CheckpointError:          # --resume names what is wrong with it
        return
    if other and other != cfg.model:
        raise ConfigError(f"train.run_dir={run_dir}: holds a run of model {other!r} (latest "
                          f"checkpoint {os.path.basename(latest)}); training {cfg.model!r} there "
                          f"would overwrite it: choose another folder (--set train.run_dir="
                          f"runs/{cfg.model}) or remove that one")


def check_new_run(cfg, resume, overwrite: bool) -> None:
    """ConfigError if ``train.run_dir`` holds checkpoints and the command neither continues
    them (``--resume``) nor starts over (``--overwrite``): training there from step 0 would
    replace a finished or interrupted run's checkpoints."""
    from pyface import checkpoint as ckpt
    from pyface.train.config import ConfigError

    if overwrite and resume is not None:
        raise ConfigError("--overwrite starts a run over and --resume continues one: give one "
                          "of them")
    run_dir = cfg.train.run_dir.format(model=cfg.model)
    latest = ckpt.latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if latest is None or resume is not None or overwrite:
        return
    raise ConfigError(f"train.run_dir={run_dir}: holds a run (latest checkpoint "
                      f"{os.path.basename(latest)}): --resume continues it, --set "
                      f"train.run_dir=DIR starts a new run elsewhere, --overwrite starts over "
                      f"here (deleting its checkpoints)")


def _message(exc: BaseException) -> str:
    """An exception's message (a KeyError's without the quotes its ``str`` adds)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def _prefix() -> str:
    """``"[rank N] "`` on the ranks other than 0 under torchrun (their messages interleave with
    rank 0's on the console), else ``""``."""
    rank = int(os.environ.get("RANK", "0"))
    return f"[rank {rank}] " if rank and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _setup_logging() -> None:
    # under torchrun the other ranks print warnings and errors only (rank 0 reports progress),
    # each line prefixed with the rank (a warning every rank gives is told apart from rank 0's)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=_prefix().replace("%", "%%") + "%(levelname)s %(name)s: "
                        "%(message)s", stream=sys.stderr)


def _resumed_run_dir(path: str) -> str | None:
    """The run folder of ``--resume PATH``: PATH when it holds checkpoints/, the folder above
    checkpoints/ for a checkpoint in one (or in its checkpoints/abandoned/), else None (a
    checkpoint outside a run)."""
    from pyface.train.engine import ABANDONED_DIR

    path = os.path.normpath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path
    up = os.path.dirname(path)
    if os.path.basename(up) == ABANDONED_DIR:
        up = os.path.dirname(up)
    if os.path.basename(up) == "checkpoints" and os.path.isfile(
            os.path.join(os.path.dirname(up), "config.yaml")):
        return os.path.dirname(up)
    return None


def check_stage_resume(cls, model: str, path: str) -> None:
    """ConfigError for ``--resume PATH`` of a staged model ``cls`` when PATH is a stage's run
    folder or one of its checkpoints (``RUN/stages/<name>/...``): the final model's run folder
    would become the stage's, and its trainer would resume another model's checkpoint. A staged
    run is resumed as a whole (``--resume RUN``: each stage from its latest checkpoint, a finished
    one reused); a stage from an earlier checkpoint is resumed by training its model on its own
    (its ``config.yaml``), as the message says."""
    from pyface.train.config import ConfigError
    from pyface.train.stages import stage_names

    stage_run = _resumed_run_dir(path)
    if stage_run is None or not getattr(cls, "stages", ()):
        return
    names, run = [], stage_run
    while os.path.basename(os.path.dirname(run)) == "stages":
        names.append(os.path.basename(run))
        run = os.path.dirname(os.path.dirname(run))
    if not names or names[-1] not in stage_names(cls):
        return
    try:
        with open(os.path.join(stage_run, "config.yaml")) as f:
            import yaml

            stage_model = (yaml.safe_load(f) or {}).get("model")
    except (OSError, ValueError, AttributeError):
        stage_model = None
    stage_model = stage_model if isinstance(stage_model, str) else "STAGE_MODEL"
    folder = stage_run == os.path.normpath(path)
    raise ConfigError(
        f"--resume {path}: {'the run' if folder else 'a checkpoint'} of stage {names[0]!r} "
        f"({stage_model}) in the staged run {run}, not a run of {model!r}: a staged run is "
        f"resumed as a whole with --resume {run} (each stage from its latest checkpoint, a "
        f"finished stage reused); to resume the stage from {'it' if folder else 'this checkpoint'}"
        f", train it on its own: pyface train {stage_model} --config "
        f"{os.path.join(stage_run, 'config.yaml')} --resume {path}")


def _continue_in_resumed_run(cfg, path: str) -> None:
    """``--resume PATH`` of a run folder (or of a checkpoint in one) without ``--set
    train.run_dir``: the run continues in that folder (logs, TensorBoard, previews, checkpoints),
    also when it was moved or copied and its config.yaml names the folder it was trained in."""
    run = _resumed_run_dir(path)
    if run is None:
        return
    mine = cfg.train.run_dir.format(model=cfg.model)
    if os.path.abspath(mine) != os.path.abspath(run):
        logging.getLogger("pyface.train").info(
            "continuing in %s, the run folder of --resume (train.run_dir was %s; --set "
            "train.run_dir=DIR writes elsewhere)", run, mine)
        cfg.train.run_dir = run


def run_train(args) -> int:
    from pyface.train.config import ConfigError, ConfigFileError, build_experiment
    from pyface.train.model import ModelDefinitionError
    from pyface.train.registry import import_plugins, model_class

    _setup_logging()
    from pyface.train.registry import RegistryError

    try:
        import_plugins(args.imports)
        cls = model_class(args.model)
        overrides = list(args.overrides) + (["data.skip_bad=true"] if args.skip_bad else [])
        from pyface.train.stages import check_stage_overrides, check_stage_section

        check_stage_overrides(args.model, cls, overrides)
        cfg = build_experiment(args.model, cls.Config, yaml_path=args.config,
                               overrides=overrides, defaults=getattr(cls, "recipe", {}),
                               preset=args.preset)
        check_stage_section(args.model, cls, cfg.stages)
        if args.resume not in (None, "auto"):
            check_stage_resume(cls, args.model, args.resume)
        if args.resume not in (None, "auto") and not any(
                o.split("=", 1)[0].strip() == "train.run_dir" for o in args.overrides):
            _continue_in_resumed_run(cfg, args.resume)   # checked below: the folder written to
        check_run_dir(cfg)
        if not args.print_config:
            check_new_run(cfg, args.resume, args.overwrite)
    except ConfigFileError as exc:            # an input that is not there: exit code 1
        print(f"{_prefix()}pyface train: {_message(exc)}", file=sys.stderr)
        return 1
    except (KeyError, ConfigError, OSError, ImportError, ModelDefinitionError,
            RegistryError) as exc:
        print(f"{_prefix()}pyface train: {_message(exc)}", file=sys.stderr)
        return 2
    staged = bool(getattr(cls, "stages", ())) and not args.print_config
    group = None
    if staged and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # under torchrun one process group serves every stage and the final model (each
        # Trainer leaving and re-joining its own group raced the ranks' re-rendezvous)
        from pyface.train import distributed as D

        try:
            group, _ = D.init_distributed(cfg.train.device)
        except (RuntimeError, ValueError) as exc:
            print(f"{_prefix()}pyface train: {_message(exc)}", file=sys.stderr)
            return 2
    try:
        code = _train(args, cls, cfg, overrides, staged, group)
    finally:
        if group is not None:
            D.shutdown(group)
    if code == 143 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_stopped_rank(code)
    return code


def _exit_stopped_rank(code: int) -> None:
    """A rank of torchrun stopped by a signal, its part done (checkpoint written, process group
    left): the process ends here, streams flushed, without the interpreter's shutdown. torchrun
    sends SIGTERM to the ranks still running once one has exited, and during that shutdown
    Python has put the signals' default actions back: a rank ended by it exited with -15, not
    143 (the stop handler, and after the stop :func:`pyface.train.engine._exit_at_once`, cover
    everything before)."""
    for h in logging.getLogger().handlers + logging.getLogger("pyface").handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001 - a handler that cannot flush: exit all the same
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def _train(args, cls, cfg, overrides, staged: bool, group=None) -> int:
    from pyface.checkpoint import CheckpointError
    from pyface.data.format import DataError
    from pyface.train import distributed as D
    from pyface.train.config import ConfigError, experiment_yaml
    from pyface.train.engine import NonFiniteError, Trainer
    from pyface.train.model import ModelDefinitionError

    if staged:
        from pyface.train.stages import plan_lines, prepare_stages

        try:
            plan: list[dict] = []       # what each run trains, said before any of them starts
            prepare_stages(cls, cfg, overrides=overrides, dry_run=True, plan=plan)
            if plan and int(os.environ.get("RANK", "0")) == 0:
                print(plan_lines(args.model, plan, cfg), file=sys.stderr, flush=True)
            filled = prepare_stages(cls, cfg, overrides=overrides)
        except DataError as exc:           # a dataset missing or corrupt: an input's failure
            print(f"{_prefix()}pyface train: {_message(exc)}", file=sys.stderr)
            return 1
        except (KeyError, ConfigError, OSError, ValueError, ModelDefinitionError) as exc:
            print(f"{_prefix()}pyface train: {_message(exc)}", file=sys.stderr)
            return 2
        except (CheckpointError, NonFiniteError, RuntimeError) as exc:
            if group is not None and D.collective_failure(exc):
                print(f"{_prefix()}pyface train: "
                      + D.peer_failure_message(exc, group, stage=True), file=sys.stderr)
                return 1
            print(f"{_prefix()}pyface train: {_message(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as exc:
            print(f"{_prefix()}pyface train: {exc}; run the same command again to continue",
                  file=sys.stderr)
            return 143
        for key, path in filled.items():
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"stage run: model.{key}={path}", file=sys.stderr)
    if args.print_config:
        notes: list[str] = []                # the stages' left-out data.options, as comments
        if getattr(cls, "stages", ()):       # the stages' --set keys are checked, not trained
            from pyface.train.stages import prepare_stages

            try:
                prepare_stages(cls, cfg, overrides=overrides, dry_run=True, notes=notes)
            except (KeyError, ConfigError, OSError, ValueError, ModelDefinitionError) as exc:
                print(f"{_prefix()}pyface train: {_message(exc)}", file=sys.stderr)
                return 2
        if not _prefix():            # under torchrun: rank 0's copy only
            print("".join(notes) + experiment_yaml(cfg), end="")
        return 0
    if args.overwrite and int(os.environ.get("RANK", "0")) == 0:
        for name in ("checkpoints", "previews"):      # the old run's, not mixed with the new
            old = os.path.join(cfg.train.run_dir.format(model=cfg.model), name)
            if os.path.isdir(old):
                logging.getLogger("pyface.train").warning("--overwrite: deleting %s", old)
                shutil.rmtree(old)
    try:
        trainer = Trainer(cfg)
    except (DataError, CheckpointError) as exc:   # a dataset or train.init_from missing or
        print(f"{_prefix()}pyface train: {_message(exc)}", file=sys.stderr)   # corrupt: inputs
        return 1
    except (ValueError, KeyError, RuntimeError, ModelDefinitionError) as exc:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and D.collective_failure(exc):
            info = D.DistInfo(rank=int(os.environ.get("RANK", "0")),
                              world_size=int(os.environ["WORLD_SIZE"]))
            print(f"{_prefix()}pyface train: " + D.peer_failure_message(exc, info),
                  file=sys.stderr)
            return 1
        print(f"{_prefix()}pyface train: {_message(exc)}", file=sys.stderr)
        return 2
    trainer.exit_after_stop = 143       # torchrun's SIGTERM to a rank stopping: 143, not -15
    try:
        if args.resume and trainer.resume(args.resume) is None \
                and trainer.dist.is_main:
            logging.getLogger("pyface.train").warning(
                "--resume: %s holds no checkpoint; training from scratch", trainer.run_dir)
        result = trainer.fit()
    except (CheckpointError, NonFiniteError) as exc:
        print(f"{_prefix()}pyface train: {_message(exc)}", file=sys.stderr)
        return 1
    except ModelDefinitionError as exc:
        print(f"{_prefix()}pyface train: {_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:          # a second stop signal
        print(f"{_prefix()}pyface train: {exc or 'interrupted'}; resume with --resume",
              file=sys.stderr)
        return 143
    except RuntimeError as exc:
        from pyface import checkpoint as ckpt

        if not (trainer.dist.enabled and D.collective_failure(exc)):
            raise
        # another rank failed or hung: one line instead of a traceback, exit code 1 (torchrun
        # then stops the rest); checkpoints are written whole or not at all
        print(f"{_prefix()}pyface train: " + D.peer_failure_message(
            exc, trainer.dist, trainer.step, ckpt.latest_checkpoint(trainer.run_dir)),
            file=sys.stderr)
        return 1
    finally:
        trainer.close()
    if trainer.dist.is_main:
        print(f"run folder: {result.run_dir}\n  step {result.step} in {result.seconds:.1f} s"
              f"\n  checkpoint: {result.checkpoint}\n  previews: "
              + (", ".join(result.previews[-2:]) or "none")
              + f"\n  tensorboard --logdir {result.run_dir}/tb")
    return 143 if result.interrupted else 0
