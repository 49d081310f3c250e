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
