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
import sys
import warnings
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


class RegistryError(ValueError):
    """A registration that would shadow pyface's own name or another plugin's."""


#: pyface's own names: a plugin cannot take them
BUILTIN_MODELS = frozenset(MODELS)
BUILTIN_DATASETS = frozenset(DATASETS)


def _register(table: dict[str, str], builtin: frozenset, kind: str, name: str, target: str,
              replace: bool) -> None:
    if not isinstance(name, str) or not name:
        raise RegistryError(f"register_{kind}: name must be a non-empty string, got {name!r}")
    if isinstance(target, type) or callable(target) and hasattr(target, "__qualname__"):
        target = f"{target.__module__}:{target.__qualname__}"     # a class: its import path
    if not isinstance(target, str) or ":" not in target:
        raise RegistryError(f"register_{kind}({name!r}, {target!r}): target must be a "
                         f"'package.module:Class' string")
    old = table.get(name)
    if old is not None and old != target:
        if name in builtin:
            raise RegistryError(f"register_{kind}({name!r}, {target!r}): {name!r} is pyface's own "
                             f"{kind} ({old}); register the plugin under another name")
        if not replace:
            raise RegistryError(f"register_{kind}({name!r}, {target!r}): {name!r} is already "
                             f"registered as {old!r}; use another name, or replace=True")
    table[name] = target


def register_model(name: str, target, *, replace: bool = False) -> None:
    """``target``: ``"package.module:Class"``, a TrainableModel subclass with a ``Config``
    (checked when the model is first used, :func:`pyface.train.model.check_model_class`), or
    the class itself (recorded as its ``module:qualname``).

    A name of pyface's own models is a ValueError; so is a name already registered with
    another target, unless ``replace``. Registering the same target again is a no-op."""
    _register(MODELS, BUILTIN_MODELS, "model", name, target, replace)


def register_dataset(name: str, target, *, replace: bool = False) -> None:
    """``target``: ``"package.module:Class"`` with ``from_config(data_config)`` (and an
    ``Options`` dataclass: ``data.options`` is converted to it), a factory called as
    ``factory(data_config)``, or a Dataset class taking ``(size=, resolution=, seed=)``.
    Names as for :func:`register_model`."""
    _register(DATASETS, BUILTIN_DATASETS, "dataset", name, target, replace)


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
            try:
                importlib.import_module(m)
            except ModuleNotFoundError as exc:
                # like ``python -m``: a module in the current directory is found (the
                # ``pyface`` console script does not put the directory on sys.path)
                cwd = os.getcwd()
                top = m.split(".")[0]
                if exc.name != top or cwd in sys.path or "" in sys.path:
                    raise
                sys.path.append(cwd)
                importlib.import_module(m)
        except ImportError as exc:
            raise ImportError(f"plugin module {m!r} (from --import or {PLUGINS_ENV}) cannot be "
                              f"imported: {exc} (a module is imported by its dotted name from "
                              f"sys.path: the current directory, PYTHONPATH or an installed "
                              f"package)") from exc
        _plugins_imported.add(m)


def load_entry_points(*, force: bool = False) -> None:
    """Adds the entry points of the groups ``pyface.models`` / ``pyface.datasets`` of every
    installed distribution (their ``module:attr`` values, not imported) and the
    ``PYFACE_PLUGINS`` modules. Names registered in pyface win over plugins'."""
    global _entry_points_loaded
    from importlib.metadata import entry_points

    if not _entry_points_loaded or force:
        for group, table in GROUPS.items():
            builtin = BUILTIN_MODELS if table is MODELS else BUILTIN_DATASETS
            for ep in entry_points(group=group):
                old = table.setdefault(ep.name, ep.value)
                if old != ep.value and ep.name in builtin:
                    dist = getattr(getattr(ep, "dist", None), "name", None) or "a package"
                    warnings.warn(f"entry point {ep.name} = {ep.value!r} of {dist} (group "
                                  f"{group}) is ignored: {ep.name!r} is pyface's own "
                                  f"{'model' if table is MODELS else 'dataset'} ({old}); "
                                  f"the plugin must use another name", stacklevel=2)
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
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{kind} {name!r} is registered as {target!r}, but module {module!r} "
                          f"cannot be imported: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise KeyError(f"{kind} {name!r} is registered as {target!r}, but module {module!r} "
                           f"has no attribute {attr!r}") from None
    return obj


def model_class(name: str):
    """The registered model class of ``name`` (imports its module), checked with
    :func:`pyface.train.model.check_model_class` (a ``ModelDefinitionError`` names what is
    wrong with it)."""
    from pyface.train.model import check_model_class

    cls = _resolve(MODELS, "model", name)
    check_model_class(cls, name)
    return cls


def build_model(name: str, config=None):
    from pyface.train.model import ModelDefinitionError

    cls = model_class(name)
    fix = (f"model {name!r} ({cls.__qualname__}): __init__ must call super().__init__() "
           "before it sets attributes")
    try:
        model = cls(config if config is not None else cls.Config())
    except AttributeError as exc:
        # nn.Module's attributes are missing until nn.Module.__init__ has run
        if any(f"'{a}'" in str(exc) for a in ("_modules", "_parameters", "_buffers")) or \
                "before Module.__init__() call" in str(exc):
            raise ModelDefinitionError(f"{fix} ({exc})") from exc
        raise
    if "_modules" not in vars(model):
        raise ModelDefinitionError(fix)
    return model


def build_dataset(cfg):
    target = _resolve(DATASETS, "dataset", cfg.name)
    if hasattr(target, "from_config"):
        return target.from_config(cfg)
    if isinstance(target, type):
        if cfg.path:            # e.g. --set data.path=DIR with the example model's procedural set
            import logging

            logging.getLogger("pyface.train").warning(
                "data.path=%s is ignored: dataset %r reads no files (it generates its items); "
                "a dataset folder is read by data.name=synthetic (or pairs, clips, a plugin's)",
                cfg.path, cfg.name)
        return target(size=cfg.size, resolution=cfg.resolution, seed=cfg.seed)
    return target(cfg)
