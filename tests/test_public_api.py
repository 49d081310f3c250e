"""The public modules' namespaces: each has an ``__all__`` naming its API (every name resolves,
every public function or class it defines or re-exports from its own package is listed), and
neither ``from pyface.X import *`` nor ``dir()`` of a package shows the modules it imports for
itself (``contextlib``, ``importlib``, ``torch``, ...)."""
import importlib
import inspect
import types

import pytest

PUBLIC = ("pyface", "pyface.ops", "pyface.nn", "pyface.face", "pyface.data", "pyface.eval",
          "pyface.train", "pyface.models", "pyface.checkpoint")
#: Packages whose dir() is what they offer (plain modules list their imports, as Python does).
PACKAGES = ("pyface", "pyface.ops", "pyface.face", "pyface.data", "pyface.eval", "pyface.train")


def _foreign_modules(names, namespace):
    """The names that are modules from outside pyface, or __future__ features."""
    out = []
    for n in names:
        v = namespace[n]
        if isinstance(v, types.ModuleType) and not v.__name__.startswith("pyface"):
            out.append(n)
        elif type(v).__name__ == "_Feature":          # from __future__ import annotations
            out.append(n)
    return out


@pytest.mark.parametrize("name", PUBLIC)
def test_all_names_the_api(name):
    m = importlib.import_module(name)
    assert isinstance(m.__all__, list) and len(set(m.__all__)) == len(m.__all__)
    for n in m.__all__:
        assert getattr(m, n) is not None, n
    own = [n for n, v in vars(m).items() if not n.startswith("_")
           and (inspect.isfunction(v) or inspect.isclass(v))
           and (v.__module__ == name or v.__module__.startswith(name + "."))]
    assert sorted(set(own) - set(m.__all__)) == []


@pytest.mark.parametrize("name", PUBLIC)
def test_star_import_exports_no_imported_modules(name):
    namespace: dict = {}
    exec(f"from {name} import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == sorted(importlib.import_module(name).__all__)
    assert _foreign_modules(namespace, namespace) == []


@pytest.mark.parametrize("name", PACKAGES)
def test_package_dir_shows_no_imported_modules(name):
    m = importlib.import_module(name)
    public = [n for n in dir(m) if not n.startswith("_")]
    values = {n: getattr(m, n) for n in public}
    assert _foreign_modules(public, values) == []
    assert set(m.__all__) <= set(dir(m))
