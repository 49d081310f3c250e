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


@pytest.mark.skipif(_backend.extension() is None, reason="needs the compiled CPU kernels")
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


@pytest.mark.skipif(_backend.extension() is None, reason="needs the compiled CPU kernels")
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
