"""Forcing every op onto one backend: ``pyface.ops.use_backend`` and ``PYFACE_BACKEND``."""
from __future__ import annotations

import pytest
import torch

import pyface.ops as ops
import pyface.ops.triplane as triplane_mod
from pyface import _backend

CPU = torch.device("cpu")


def _calls(monkeypatch):
    """Count the reference tri-plane sampler's calls made through pyface.ops.triplane_sample."""
    calls = []
    real = triplane_mod.triplane_sample_reference

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(triplane_mod, "triplane_sample_reference", spy)
    return calls


def _sample():
    torch.manual_seed(0)
    planes = torch.randn(1, 3, 4, 5, 5, requires_grad=True)
    points = torch.rand(1, 7, 3) - 0.5
    out = ops.triplane_sample(planes, points, plane_axes="xy_xz_zy")
    out.sum().backward()
    return out


@pytest.mark.cpp
def test_use_backend_forces_the_reference_and_restores(monkeypatch):
    monkeypatch.delenv("PYFACE_BACKEND", raising=False)
    calls = _calls(monkeypatch)
    assert _backend.select_backend("triplane_sample", CPU, None) == "cpu"
    fused = _sample()
    assert calls == []
    with ops.use_backend("reference"):
        assert _backend.select_backend("triplane_sample", CPU, None) == "reference"
        with ops.use_backend("cpu"):                         # nests
            assert _backend.select_backend("triplane_sample", CPU, None) == "cpu"
        ref = _sample()
        assert calls == [1]
        # an explicit backend= still wins
        assert _backend.select_backend("triplane_sample", CPU, "cpu") == "cpu"
    assert _backend.select_backend("triplane_sample", CPU, None) == "cpu"
    torch.testing.assert_close(fused, ref)


@pytest.mark.cpp
def test_environment_variable_forces_a_backend(monkeypatch):
    calls = _calls(monkeypatch)
    monkeypatch.setenv("PYFACE_BACKEND", "reference")
    _sample()
    assert calls == [1]
    with ops.use_backend("cpu"):                             # the context manager wins
        assert _backend.select_backend("triplane_sample", CPU, None) == "cpu"
    monkeypatch.setenv("PYFACE_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"PYFACE_BACKEND: expected one of .*got 'fast'"):
        _sample()


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("PYFACE_BACKEND", raising=False)
    with ops.use_backend("cuda"):
        with pytest.raises(_backend.BackendUnavailableError,
                           match=r"triplane_sample: backend 'cuda' cannot run on cpu tensors"):
            _sample()
    with pytest.raises(ValueError, match=r"use_backend: expected one of .*got 'gpu'"):
        with ops.use_backend("gpu"):
            pass
    assert _backend._forced is None


def test_info_reports_the_forced_backend(monkeypatch):
    import pyface.info

    monkeypatch.setenv("PYFACE_BACKEND", "reference")
    info = pyface.info.collect()
    assert info["forced_backend"] == "reference"
    assert "PYFACE_BACKEND=reference: every op" in pyface.info.format_report(info)
    monkeypatch.delenv("PYFACE_BACKEND")
    assert pyface.info.collect()["forced_backend"] is None


def test_use_backend_blocks_overlapping_in_threads_restore_nothing_stale(monkeypatch):
    # the forcing is process-wide: a block entered in thread A, then one in thread B, with A
    # leaving first, left A's backend forced for good (B restored the value it had replaced)
    import threading

    monkeypatch.delenv("PYFACE_BACKEND", raising=False)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with ops.use_backend("reference"):
            a_in.set()
            b_in.wait()
        seen["after A left"] = _backend._forced
        a_out.set()

    def b():
        a_in.wait()
        with ops.use_backend("cpu"):
            b_in.set()
            a_out.wait()
            seen["B still inside"] = _backend._forced

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"after A left": "cpu", "B still inside": "cpu"}
    assert _backend._forced is None


def test_use_backend_restores_on_exception_and_nests():
    with ops.use_backend("reference"):
        with pytest.raises(KeyError):
            with ops.use_backend("cpu"):
                assert _backend._forced == "cpu"
                raise KeyError("inside")
        assert _backend._forced == "reference"
        with ops.use_backend(None):                       # no forcing inside this block
            assert _backend._forced is None
        assert _backend._forced == "reference"
    assert _backend._forced is None


@pytest.mark.cpp
def test_use_backend_reaches_a_function_compiled_before(monkeypatch):
    # the choice is a constant of the compiled graph: without a guard on the forced backend a
    # function compiled outside a use_backend block kept running the backend it was traced with
    monkeypatch.delenv("PYFACE_BACKEND", raising=False)
    calls = _calls(monkeypatch)
    torch._dynamo.reset()
    planes, points = torch.randn(1, 3, 4, 5, 5), torch.rand(1, 7, 3) - 0.5
    fn = torch.compile(lambda p, x: ops.triplane_sample(p, x, plane_axes="xy_xz_zy"),
                       fullgraph=True, backend="eager")
    fused = fn(planes, points)
    assert calls == []
    with ops.use_backend("reference"):
        ref = fn(planes, points)
    assert calls == [1]
    fn(planes, points)                                        # back to the compiled backend
    assert calls == [1]
    torch.testing.assert_close(fused, ref)
