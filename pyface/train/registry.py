"""Registries of trainable models and datasets, by name (``pyface train MODEL``).

Entries are ``"module:attribute"`` strings, imported only when used, so registering is free.
Models add themselves with :func:`register_model`; the four portrait models register here as
they land.
"""
from __future__ import annotations

import importlib
from typing import Any

MODELS: dict[str, str] = {
    "example": "pyface.train.example:TriplaneAutoencoder",
    "eg3d": "pyface.models.eg3d.model:EG3D",
}

DATASETS: dict[str, str] = {
    "procedural": "pyface.train.data:ProceduralFaces",
    "synthetic": "pyface.train.data:SyntheticFrames",
    "eg3d": "pyface.models.eg3d.data:EG3DImages",
}


def register_model(name: str, target: str) -> None:
    """``target``: ``"package.module:Class"``, a TrainableModel subclass with a ``Config``."""
    MODELS[name] = target


def register_dataset(name: str, target: str) -> None:
    """``target``: ``"package.module:factory"`` called as ``factory(data_config)`` or a Dataset
    class taking ``(size=, resolution=, seed=)``."""
    DATASETS[name] = target


def _resolve(table: dict[str, str], kind: str, name: str) -> Any:
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table))}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


def model_class(name: str):
    return _resolve(MODELS, "model", name)


def build_model(name: str, config=None):
    cls = model_class(name)
    return cls(config if config is not None else cls.Config())


def build_dataset(cfg):
    target = _resolve(DATASETS, "dataset", cfg.name)
    if hasattr(target, "from_config"):
        return target.from_config(cfg)
    if isinstance(target, type):
        return target(size=cfg.size, resolution=cfg.resolution, seed=cfg.seed)
    return target(cfg)
