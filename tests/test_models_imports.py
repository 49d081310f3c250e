"""The import rule of model packages: every module under ``pyface/models/<name>/`` imports only
``pyface.{nn, ops, face, data, checkpoint, train.model}`` and its own package (never ``_ops``,
``_backend``, ``ops.reference``, the training engine or another model). Checked on the source
with ``ast``, so ``from pyface import _backend``, relative imports and
``importlib.import_module("...")`` with a literal name are caught too."""
from __future__ import annotations

import ast
import os

import pytest

import pyface

ALLOWED = ("pyface.nn", "pyface.ops", "pyface.face", "pyface.data", "pyface.checkpoint",
           "pyface.train.model")
FORBIDDEN = ("pyface.ops.reference",)
MODELS_DIR = os.path.join(os.path.dirname(pyface.__file__), "models")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def allowed(name: str, own_package: str) -> bool:
    """Whether module/attribute path ``name`` may be imported by a module of ``own_package``."""
    if not _under(name, "pyface"):
        return True                       # torch, numpy, the standard library, ...
    if any(_under(name, f) for f in FORBIDDEN):
        return False
    return _under(name, own_package) or any(_under(name, a) for a in ALLOWED)


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in ``source``, the module being ``module``:
    ``from A import b`` gives ``A.b`` (b may be a module), relative imports are resolved."""
    out = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    out.append((node.lineno, "." * node.level + (node.module or "")))
                    continue
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            out += [(node.lineno, base if a.name == "*" else f"{base}.{a.name}")
                    for a in node.names]
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if fname in ("import_module", "__import__") and node.args \
                    and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def violations(root: str, base_module: str = "pyface.models") -> list[str]:
    """``path:line: imports NAME`` for every forbidden import under the model packages of
    ``root`` (``pyface/models``; its own ``__init__.py`` is the platform layer, not a model)."""
    bad = []
    for entry in sorted(os.listdir(root)):
        pkg_dir = os.path.join(root, entry)
        if entry.startswith((".", "_")):        # __init__.py (the platform layer), __pycache__
            continue
        if os.path.isfile(pkg_dir) and entry.endswith(".py"):
            files = [(pkg_dir, f"{base_module}.{entry[:-3]}", False)]
            own = f"{base_module}.{entry[:-3]}"
        elif os.path.isdir(pkg_dir):
            own = f"{base_module}.{entry}"
            files = []
            for d, _, names in os.walk(pkg_dir):
                rel = os.path.relpath(d, pkg_dir)
                mod = own if rel == "." else own + "." + rel.replace(os.sep, ".")
                for n in sorted(names):
                    if n.endswith(".py"):
                        is_pkg = n == "__init__.py"
                        files.append((os.path.join(d, n), mod if is_pkg else f"{mod}.{n[:-3]}",
                                      is_pkg))
        else:
            continue
        for path, mod, is_pkg in files:
            with open(path, encoding="utf-8") as f:
                src = f.read()
            for line, name in imported_names(src, mod, is_pkg):
                if name.startswith(".") or not allowed(name, own):
                    bad.append(f"{path}:{line}: imports {name}")
    return bad


def test_model_packages_follow_the_import_rule():
    assert os.path.isfile(os.path.join(MODELS_DIR, "__init__.py"))
    bad = violations(MODELS_DIR)
    assert not bad, ("model packages may import only pyface." + ", pyface.".join(
        a[len("pyface."):] for a in ALLOWED) + " and their own package:\n" + "\n".join(bad))


@pytest.mark.parametrize("line, ok", [
    ("import torch", True),
    ("from pyface.ops import triplane_sample", True),
    ("from pyface import nn, face", True),
    ("import pyface.nn.layers", True),
    ("from pyface.train.model import Pipeline, TrainableModel", True),
    ("from pyface.train import model", True),
    ("from pyface.data.driving import read_source", True),
    ("from pyface.checkpoint import load_weights_file", True),
    ("from . import networks", True),
    ("from .networks import Generator", True),
    ("from pyface.models.mymodel.networks import G", True),
    ("from pyface import _backend", False),
    ("import pyface._backend", False),
    ("from pyface._ops import warp", False),
    ("from pyface.ops import reference", False),
    ("from pyface.ops.reference import triplane_sample_reference", False),
    ("from pyface.train import Trainer", False),
    ("from pyface.train.engine import Trainer", False),
    ("import pyface", False),
    ("from pyface.models.other import Net", False),
    ("from .. import other", False),
    ("from ..other.networks import G", False),
    ("from ... import _backend", False),
    ("importlib.import_module('pyface._ops.warp')", False),
    ("x = __import__('pyface.train.engine')", False),
])
def test_the_checker_catches_every_form(tmp_path, line, ok):
    pkg = tmp_path / "models" / "mymodel"
    pkg.mkdir(parents=True)
    (tmp_path / "models" / "__init__.py").write_text("from pyface.train import registry\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text(f"import importlib\n\n{line}\n")
    bad = violations(str(tmp_path / "models"))
    if ok:
        assert bad == []
    else:
        assert len(bad) == 1 and bad[0].endswith(f"model.py:3: imports {bad[0].split()[-1]}"), bad


def test_the_checker_reads_subpackages_and_module_models(tmp_path):
    root = tmp_path / "models"
    (root / "a" / "sub").mkdir(parents=True)
    (root / "a" / "__init__.py").write_text("")
    (root / "a" / "sub" / "__init__.py").write_text("from ... import b\n")       # pyface.models.b
    (root / "a" / "sub" / "x.py").write_text("from ..y import z\nfrom .. import y\n")
    (root / "single.py").write_text("from pyface.train.config import from_dict\n")
    bad = violations(str(root))
    assert any("sub/__init__.py:1: imports pyface.models.b" in b for b in bad), bad
    assert any("single.py:1: imports pyface.train.config.from_dict" in b for b in bad), bad
    assert not any("x.py" in b for b in bad), bad                # its own package: allowed
