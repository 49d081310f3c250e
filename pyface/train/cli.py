"""``pyface train``."""
from __future__ import annotations

import logging
import sys


def add_parser(subparsers) -> None:
    from pyface.train.registry import MODELS

    p = subparsers.add_parser(
        "train", help="train a registered model (single process, or under torchrun)",
        description="Train a model. Config: the model's recipe < --config YAML < --set overrides. "
                    "Outputs go to train.run_dir: config.yaml, log.txt, tb/ (TensorBoard), "
                    "checkpoints/ and previews/ (PNG grids and mp4 clips). Distributed: "
                    "torchrun --nproc_per_node=N -m pyface train MODEL ...",
        epilog="example: pyface train example --set train.steps=500 --set train.run_dir=runs/ae")
    p.add_argument("model", help=f"registered model: {', '.join(sorted(MODELS))}")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="YAML with sections model/data/train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. train.steps=100 (repeatable)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT, or (no value) from the run folder's latest checkpoint")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip missing or corrupt videos of an on-disk dataset with a warning "
                        "instead of stopping with an error naming the file (data.skip_bad=true)")
    p.set_defaults(func=run_train)



def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def run_train(args) -> int:
    import yaml

    from pyface.checkpoint import CheckpointError
    from pyface.train.config import ConfigError, build_experiment, experiment_to_dict
    from pyface.train.engine import NonFiniteError, Trainer
    from pyface.train.registry import model_class

    _setup_logging()
    try:
        cls = model_class(args.model)
        overrides = list(args.overrides) + (["data.skip_bad=true"] if args.skip_bad else [])
        cfg = build_experiment(args.model, cls.Config, yaml_path=args.config,
                               overrides=overrides, defaults=getattr(cls, "recipe", {}))
    except (KeyError, ConfigError, OSError) as exc:
        print(f"pyface train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(experiment_to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        trainer = Trainer(cfg)
    except (ValueError, KeyError, RuntimeError) as exc:
        print(f"pyface train: {exc}", file=sys.stderr)
        return 2
    try:
        if args.resume:
            trainer.resume(args.resume)
        result = trainer.fit()
    except (CheckpointError, NonFiniteError) as exc:
        print(f"pyface train: {exc}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    if trainer.dist.is_main:
        print(f"run folder: {result.run_dir}\n  step {result.step} in {result.seconds:.1f} s"
              f"\n  checkpoint: {result.checkpoint}\n  previews: "
              + (", ".join(result.previews[-2:]) or "none")
              + f"\n  tensorboard --logdir {result.run_dir}/tb")
    return 143 if result.interrupted else 0
