"""Shared test configuration.

* Without a GPU, Triton kernels run in the Triton interpreter: TRITON_INTERPRET=1 is set here,
  before anything imports triton (tests marked ``triton_interpret`` use it, with tiny shapes).
* ``gpu`` tests are skipped cleanly without CUDA; ``triton_interpret`` tests without triton.
"""
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
HAS_TRITON = importlib.util.find_spec("triton") is not None


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


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
