"""Registries of trainable models and datasets, by name (``pyface train MODEL``).

Entries are ``"module:attribute"`` strings, imported only when used, so registering is free and
``pyface --help`` imports no model. A new model adds one line to :data:`MODELS`.

Third-party packages register without touching pyface, through entry points (read lazily: only
when a name is not found here, or when every name is listed)::

    # pyproject.toml of the plugin package
    [project.entry-points."pyface.models"]
    mine = "mypackage.mymodel:MyModel"
    [project.entry-points."pyface.datasets"]
    mydata = "mypackage.data:MyDataset"

or by importing a module that calls :func:`register_model` (``pyface train --import MODULE``,
or the comma-separated module list in the ``PYFACE_PLUGINS`` environment variable).
"""
from __future__ import annotations

import importlib
import os
from typing import Any

MODELS: dict[str, str] = {
    "example": "pyface.train.example:TriplaneAutoencoder",
    "mmfa": "pyface.models.mmfa:MMFA",
    "mmfa_vae": "pyface.models.mmfa.vae:MMFAVAE",
    # portrait models (pyface/models/<name>/) register here as they land, one line each
    "eg3d": "pyface.models.eg3d.model:EG3D",
    "goha_s1": "pyface.models.goha:GOHA",
    "goha_s1_gan": "pyface.models.goha.stages:GOHAGAN",
    "goha": "pyface.models.goha.stages:GOHASR",
    "export3d_clebs": "pyface.models.export3d:CLeBS",
    "export3d": "pyface.models.export3d:Export3D",
    "otavatar": "pyface.models.otavatar.model:OTAvatar",
}

DATASETS: dict[str, str] = {
    "procedural": "pyface.train.data:ProceduralFaces",
    "synthetic": "pyface.train.data:SyntheticFrames",
    "pairs": "pyface.data.datasets:PairDataset",
    "cross_identity": "pyface.data.datasets:CrossIdentityDataset",
    "motion_windows": "pyface.data.datasets:MotionWindowDataset",
    "clips": "pyface.data.datasets:ClipDataset",
    "multiview": "pyface.data.datasets:MultiViewDataset",
    "mixture": "pyface.data.datasets:MixtureDataset",
    "eg3d": "pyface.models.eg3d.data:EG3DImages",
}

#: entry-point group -> the table it extends
GROUPS = {"pyface.models": MODELS, "pyface.datasets": DATASETS}
PLUGINS_ENV = "PYFACE_PLUGINS"

_entry_points_loaded = False
_plugins_imported: set[str] = set()


def register_model(name: str, target: str) -> None:
    """``target``: ``"package.module:Class"``, a TrainableModel subclass with a ``Config``."""
    MODELS[name] = target


def register_dataset(name: str, target: str) -> None:
    """``target``: ``"package.module:Class"`` with ``from_config(data_config)`` (and an
    ``Options`` dataclass: ``data.options`` is converted to it), a factory called as
    ``factory(data_config)``, or a Dataset class taking ``(size=, resolution=, seed=)``."""
    DATASETS[name] = target


def import_plugins(modules: list[str] | tuple[str, ...] | str | None = None) -> None:
    """Imports plugin modules (which call :func:`register_model` / :func:`register_dataset`):
    ``modules`` (a list or a comma-separated string), else those named by ``PYFACE_PLUGINS``.
    Each module is imported once; a missing one raises ImportError naming it."""
    if modules is None:
        modules = os.environ.get(PLUGINS_ENV, "")
    if isinstance(modules, str):
        modules = modules.split(",")
    for m in (m.strip() for m in modules):
        if not m or m in _plugins_imported:
            continue
        try:
            importlib.import_module(m)
        except ImportError as exc:
            raise ImportError(f"plugin module {m!r} (from --import or {PLUGINS_ENV}) cannot be "
                              f"imported: {exc}") from exc
        _plugins_imported.add(m)


def load_entry_points(*, force: bool = False) -> None:
    """Adds the entry points of the groups ``pyface.models`` / ``pyface.datasets`` of every
    installed distribution (their ``module:attr`` values, not imported) and the
    ``PYFACE_PLUGINS`` modules. Names registered in pyface win over plugins'."""
    global _entry_points_loaded
    from importlib.metadata import entry_points

    if not _entry_points_loaded or force:
        for group, table in GROUPS.items():
            for ep in entry_points(group=group):
                table.setdefault(ep.name, ep.value)
        _entry_points_loaded = True
    import_plugins()            # PYFACE_PLUGINS may name new modules since the last call


def model_names() -> list[str]:
    """Every registered model, plugins included."""
    load_entry_points()
    return sorted(MODELS)


def dataset_names() -> list[str]:
    load_entry_points()
    return sorted(DATASETS)


def dataset_class(name: str):
    """The registered dataset class or factory of ``name`` (imports its module)."""
    return _resolve(DATASETS, "dataset", name)


def _resolve(table: dict[str, str], kind: str, name: str) -> Any:
    if name not in table:
        load_entry_points()
    if name not in table:
        from pyface.train.config import did_you_mean

        raise KeyError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table))} (a "
                       f"plugin registers through the entry-point group pyface.{kind}s, "
                       f"--import MODULE or {PLUGINS_ENV}){did_you_mean(name, table)}")
    target = table[name]
    if ":" not in target:
        raise KeyError(f"{kind} {name!r}: registry entry {target!r} is not 'module:attribute'")
    module, attr = target.split(":", 1)
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


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
