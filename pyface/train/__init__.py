"""pyface.train: one training engine for every model (see docs/train.md).

>>> from pyface.train import Trainer, build_experiment
>>> from pyface.train.example import TriplaneAutoencoder
>>> cfg = build_experiment("example", TriplaneAutoencoder.Config,
...                        defaults=TriplaneAutoencoder.recipe, overrides=["train.steps=100"])
>>> Trainer(cfg).fit()

Names are imported lazily so that ``pyface --help`` stays fast.
"""
import importlib as _importlib

_EXPORTS = {
    "DataConfig": "config", "EMAConfig": "config", "ExperimentConfig": "config",
    "ScheduleConfig": "config", "TrainConfig": "config", "build_experiment": "config",
    "FitResult": "engine", "NonFiniteError": "engine", "Trainer": "engine",
    "ModelDefinitionError": "model", "Phase": "model", "Pipeline": "model", "Stage": "model",
    "StepContext": "model", "TrainableModel": "model",
    "register_dataset": "registry", "register_model": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(_importlib.import_module(f"pyface.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pyface.train' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
