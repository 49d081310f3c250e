"""Shared test configuration.

* Without a GPU, Triton kernels run in the Triton interpreter: TRITON_INTERPRET=1 is set here,
  before anything imports triton (tests marked ``triton_interpret`` use it, with tiny shapes).
* One rule for skipping: ``gpu`` tests are skipped without CUDA, ``triton_interpret`` tests
  without triton. Nothing is skipped because of the build: a test marked ``cpp`` (it needs the
  compiled extension ``pyface._C``) fails with the loader's reason when the extension is missing
  or does not load, so a broken build cannot leave the suite green.
"""
import importlib.util
import os
import sys
import types

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def pytest_configure(config):
    for marker in (
            "gpu: needs a CUDA device; skipped cleanly without one",
            "triton_interpret: runs Triton kernels on CPU under TRITON_INTERPRET=1 (tiny shapes)",
            "cpp: needs the compiled extension pyface._C; fails (never skips) without it"):
        config.addinivalue_line("markers", marker)


def extension_error() -> str | None:
    """Why pyface._C cannot be used, or None when it loaded."""
    from pyface import _backend

    if _backend.extension() is None:
        return _backend.extension_reason()
    return None


def pytest_report_header(config):
    error = extension_error()
    return f"pyface._C: {'loaded' if error is None else 'NOT LOADED: ' + error}"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="triton is not installed")
    skip_interp = pytest.mark.skip(reason="TRITON_INTERPRET is not 1 (a GPU is present)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton_interpret" in item.keywords:
            if not HAS_TRITON:
                item.add_marker(skip_triton)
            elif os.environ.get("TRITON_INTERPRET") != "1":
                item.add_marker(skip_interp)


@pytest.hookimpl(trylast=True)  # after the skip markers: a skipped gpu test stays skipped
def pytest_runtest_setup(item):
    if "cpp" in item.keywords:
        error = extension_error()
        if error is not None:
            pytest.fail(f"{item.name} needs the compiled extension: {error}", pytrace=False)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture
def eg3d_modules(monkeypatch):
    """(tests/test_convert.py, tests/test_model_eg3d.py) Stand-ins for EG3D's torch_utils.persistence and dnnlib.util, so that the test pickle
    references exactly the globals an official one does."""
    tu, pers = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dn, dnu = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):  # what EG3D would run (exec of module_src)
        raise AssertionError("must never be called by pyface")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    pers._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    dnu.EasyDict = EasyDict
    tu.persistence, dn.util = pers, dnu
    for name, mod in [("torch_utils", tu), ("torch_utils.persistence", pers), ("dnnlib", dn),
                      ("dnnlib.util", dnu)]:
        monkeypatch.setitem(sys.modules, name, mod)
    return pers, EasyDict
