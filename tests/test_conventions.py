"""Conventions shared by every op family: plane axes (required, chained across ops), the default
backend table, `pyface info`, public loading, double backward and deterministic mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import pyface.info
import pyface.ops as ops
from pyface import _backend, _opspecs
from pyface.nn import RenderConfig, density_l1_regularizer, density_monotonic_regularizer
from pyface.nn.render import query_density

HAS_CPP = _backend.extension() is not None
needs_cpp = pytest.mark.cpp  # fails, never skips, when pyface._C is missing (conftest.py)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# plane axes
# ---------------------------------------------------------------------------------------------

CENTRE = (0.3, -0.2, 0.1)  # (z, x) and (z, y) of the blob land on different texels of plane 2


def _blob(n=64, seed=0):
    """A small blob of points at CENTRE with features (density 1, colour)."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.tensor(CENTRE) + 0.02 * torch.randn(1, n, 3, generator=gen)
    feats = torch.cat([torch.ones(1, n, 1), torch.rand(1, n, 3, generator=gen)], -1)
    return points, feats.requires_grad_()


def _decoder(f):
    """Per-plane features (B, 3, N, 4) -> density only where all three planes see the blob."""
    sigma = 60.0 * f[..., 0].prod(1) - 10.0
    return {"rgb": torch.sigmoid(f[..., 1:].mean(1)), "sigma": sigma.unsqueeze(-1)}


def _ray_through_blob():
    o = torch.tensor([[[CENTRE[0], CENTRE[1], -2.0]]])
    d = torch.tensor([[[0.0, 0.0, 1.0]]])
    return o, d


@needs_cpp
@pytest.mark.parametrize("axes,other", [("eg3d", "xy_xz_zy"), ("xy_xz_zy", "eg3d")])
def test_points_to_triplane_render_and_regularisers_chain(axes, other):
    """Lift a blob with one plane convention, render it and regularise its density with the same
    one: the ray through the blob is opaque and the blob is dense. Rendering with the other
    convention (the swap a default mismatch used to cause) reads an empty third plane."""
    points, feats = _blob()
    planes, _ = ops.points_to_triplane(points, feats, 32, plane_axes=axes, max_distance=0.15)
    o, d = _ray_through_blob()
    kw = dict(near=1.5, far=2.5, n_coarse=32, n_fine=16)
    torch.manual_seed(0)
    rgb, depth, wsum = ops.render_triplane(planes, o, d, _decoder, plane_axes=axes, **kw)
    assert wsum.item() > 0.99
    assert 2.0 + CENTRE[2] - 0.15 < depth.item() < 2.0 + CENTRE[2]  # the blob's front surface
    torch.manual_seed(0)
    _, _, wsum_swapped = ops.render_triplane(planes, o, d, _decoder, plane_axes=other, **kw)
    assert wsum_swapped.item() < 0.01
    sigma = query_density(planes, _decoder, points, plane_axes=axes)
    assert sigma.min().item() > 40.0
    assert query_density(planes, _decoder, points, plane_axes=other).max().item() < 0.0
    gen = torch.Generator().manual_seed(1)
    reg = (density_l1_regularizer(planes, _decoder, n_points=64, plane_axes=axes, generator=gen)
           + density_monotonic_regularizer(planes, _decoder, n_points=64, plane_axes=axes,
                                           generator=gen))
    (g,) = torch.autograd.grad(rgb.sum() + wsum.sum() + reg, feats)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_plane_axes_is_required():
    planes, points = torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 5, 3)
    o, d = _ray_through_blob()
    weights = [torch.zeros(4, 2), torch.zeros(4), torch.zeros(2, 4), torch.zeros(2)]
    calls = [lambda: ops.triplane_sample(planes, points),
             lambda: ops.points_to_triplane(points, torch.zeros(1, 5, 2), 4),
             lambda: ops.render_triplane(planes, o, d, weights, near=1.0, far=2.0, n_coarse=4,
                                         n_fine=0),
             lambda: RenderConfig(),
             lambda: query_density(planes, weights, points),
             lambda: density_l1_regularizer(planes, weights)]
    for call in calls:
        with pytest.raises(TypeError, match="plane_axes"):
            call()
    assert RenderConfig.ffhq().plane_axes == "eg3d"
    assert RenderConfig(plane_axes="xy_xz_zy").depth_resolution == 48


# ---------------------------------------------------------------------------------------------
# the op table, defaults and `pyface info`
# ---------------------------------------------------------------------------------------------

def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_op_table_is_a_leaf_and_independent_of_imports():
    # one subprocess (a fresh interpreter) for the import checks and the public loader
    out = _python("import sys, pyface._opspecs, pyface._backend as b; "
                  "print(sorted(m for m in sys.modules if m.startswith('pyface'))); "
                  "print(len(b.registered_ops())); import torch, pyface.ops as ops; "
                  "m = ops.load_library(); "
                  "print(m.__name__, torch.ops.pyface.mip_composite.default.name())")
    if not HAS_CPP:
        assert "BackendUnavailableError" in out.stderr
        return
    assert out.returncode == 0, out.stderr
    modules, n, loaded = out.stdout.splitlines()
    assert "pyface.ops" not in modules and "pyface._C" not in modules
    assert int(n) == len(_opspecs.OPS)
    assert loaded.split() == ["pyface._C", "pyface::mip_composite"]
    public = {name for name in ops.__all__ if name in _opspecs.OPS}
    assert public == set(_opspecs.OPS)
    assert set(_opspecs.DEFAULTS) == set(_opspecs.OPS)


def test_cuda_defaults_are_the_reference_until_verified_on_a_gpu():
    for name, spec in _opspecs.OPS.items():
        cpu, cuda = _opspecs.DEFAULTS[name]["cpu"], _opspecs.DEFAULTS[name]["cuda"]
        assert cpu.order == ("cpu", "reference") and "tests/test_" in cpu.why
        if name in _opspecs.GPU_VERIFIED:
            continue
        assert cuda.order == ("reference",), name
        assert "have not run on a GPU" in cuda.why and "backend='cuda'" in cuda.why
        if "triton" in spec.backends:
            assert "backend='triton'" in cuda.why


def test_info_shows_the_table_and_why():
    info = pyface.info.collect()
    op = info["ops"]["triplane_sample"]
    assert op["default"]["cuda"] == "reference"
    assert op["why"]["cuda"]["order"] == ["reference"]
    report = pyface.info.format_report(info)
    assert _opspecs.DEFAULTS["rasterize_mesh"]["cuda"].why in report
    assert "cuda  -> reference" in report


def test_info_exits_nonzero_without_a_loadable_build(monkeypatch, capsys):
    info = pyface.info.collect()
    assert pyface.info.build_problem(info) is None or not HAS_CPP
    missing = {**info, "extension": {"loaded": False, "reason": "x", "build": None}}
    assert "_build_config.json is missing" in pyface.info.build_problem(missing)
    broken = {**info, "extension": {"loaded": False, "reason": "undefined symbol",
                                    "build": {"torch": "0"}}}
    assert "undefined symbol" in pyface.info.build_problem(broken)
    monkeypatch.setattr(pyface.info, "collect", lambda: missing)
    assert pyface.info.main([]) == 1
    assert "ERROR: pyface/_build_config.json is missing" in capsys.readouterr().out
    monkeypatch.setattr(pyface.info, "collect", lambda: info)
    assert pyface.info.main(["--json"]) == (0 if HAS_CPP else 1)
    assert json.loads(capsys.readouterr().out)["ops"]


def test_info_reports_a_bad_pyface_backend_as_an_error(monkeypatch, capsys):
    # it used to say every op "is forced onto" the bad value, and exit 0
    monkeypatch.setenv("PYFACE_BACKEND", "fused")
    assert pyface.info.main([]) == 1
    out = capsys.readouterr().out
    assert ("ERROR: PYFACE_BACKEND: expected one of reference, cpu, cuda, triton (or unset), got "
            "'fused'; every op called without backend= raises ValueError") in out
    assert "PYFACE_BACKEND=fused: every op called without backend= is forced" not in out
    assert pyface.info.main(["--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["forced_backend"] == "fused" and "got 'fused'" in data["forced_backend_error"]
    monkeypatch.setenv("PYFACE_BACKEND", "reference")       # a valid one is no problem
    assert pyface.info.main([]) == (0 if HAS_CPP else 1)
    assert "PYFACE_BACKEND=reference: every op called without backend= is forced onto it" \
        in capsys.readouterr().out


def test_info_and_readme_quote_the_same_number_per_op():
    numbers = pyface.info.measured(os.path.join(ROOT, "bench", "results"))
    assert {"rasterize_mesh", "triplane_sample", "render_triplane"} <= set(numbers)
    with open(os.path.join(ROOT, "README.md")) as f:
        rows = [line for line in f if line.startswith("| `")]
    for name, m in numbers.items():
        row = [r for r in rows if r.startswith(f"| `{name}`")]
        assert row, f"README has no measured row for {name}"
        assert any(pyface.info.format_ms(m["ms"]) in r for r in row), (name, m)


def test_info_picks_the_newest_bench_file(tmp_path):
    def write(name, date, ms):
        row = {"op": "rasterize_mesh", "shape": "head512", "provider": "cpu", "mode": "fwd",
               "median_ms": ms, "error": None}
        (tmp_path / name).write_text(json.dumps({"environment": {"date": date},
                                                 "results": [row]}))
    write("b.json", "2026-01-02T00:00:00", 56.0)
    write("a.json", "2026-01-03T00:00:00", 10.9)
    (tmp_path / "broken.json").write_text("{")
    m = pyface.info.measured(str(tmp_path))
    assert m["rasterize_mesh"]["ms"] == 10.9 and m["rasterize_mesh"]["file"] == "a.json"
    assert pyface.info.format_ms(11854.02) == "11854" and pyface.info.format_ms(4.708) == "4.71"


# ---------------------------------------------------------------------------------------------
# public loading
# ---------------------------------------------------------------------------------------------

def test_load_library_names_the_reason(monkeypatch):
    monkeypatch.setattr(_backend, "extension", lambda: None)
    monkeypatch.setattr(_backend, "extension_reason", lambda: "pyface._C is not built (test)")
    with pytest.raises(_backend.BackendUnavailableError, match="not built \\(test\\)"):
        ops.load_library()


# ---------------------------------------------------------------------------------------------
# double backward
# ---------------------------------------------------------------------------------------------

def _second_order(fn, *inputs):
    out = fn(*inputs)
    g = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    return torch.autograd.grad(sum(x.square().sum() for x in g), inputs, allow_unused=True)


@needs_cpp
def test_double_backward_through_fused_ops_names_the_op():
    planes = torch.randn(1, 3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    points = (torch.rand(1, 7, 3, dtype=torch.float64) - 0.5).requires_grad_()
    with pytest.raises(RuntimeError, match="triplane_sample \\(cpu backend\\): double backward"):
        _second_order(lambda p, x: ops.triplane_sample(p, x, plane_axes="eg3d", backend="cpu"),
                      planes, points)
    f = torch.rand(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(2, 3, 5, dtype=torch.float64).expand(1, 2, 5)
    with pytest.raises(RuntimeError, match="mip_composite \\(cpu backend\\): double backward"):
        _second_order(lambda f, s: ops.mip_composite(f, s, t, backend="cpu")[0], f, s)
    feats = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    pts = torch.rand(1, 4, 3, dtype=torch.float64) - 0.5
    with pytest.raises(RuntimeError, match="points_to_triplane\\) \\(cpu backend\\): double"):
        _second_order(lambda f: ops.points_to_triplane(pts, f, 3, plane_axes="eg3d",
                                                       backend="cpu")[0], feats)
    # first-order gradients under create_graph are unchanged
    g = torch.autograd.grad(ops.triplane_sample(planes, points, plane_axes="eg3d",
                                                backend="cpu").sum(), planes, create_graph=True)
    g_ref = torch.autograd.grad(ops.triplane_sample(planes, points, plane_axes="eg3d",
                                                    backend="reference").sum(), planes)
    torch.testing.assert_close(g[0], g_ref[0])


def test_double_backward_through_the_reference_works():
    # the reference backend is plain PyTorch: gradients of gradients (e.g. R1 through a
    # discriminator that composites) flow
    f = torch.rand(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(2, 3, 5, dtype=torch.float64).expand(1, 2, 5)
    gf, gs = _second_order(lambda f, s: ops.mip_composite(f, s, t, backend="reference")[0], f, s)
    assert gs is not None and gs.abs().sum() > 0


@pytest.mark.triton_interpret
def test_double_backward_through_triton_names_the_op():
    planes = torch.randn(1, 3, 2, 5, 5, requires_grad=True)
    points = (torch.rand(1, 7, 3) - 0.5).requires_grad_()
    with pytest.raises(RuntimeError, match="triplane_sample \\(triton backend\\): double"):
        _second_order(lambda p, x: ops.triplane_sample(p, x, plane_axes="eg3d",
                                                       backend="triton"), planes, points)


# ---------------------------------------------------------------------------------------------
# deterministic mode
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def deterministic():
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    yield lambda warn_only=False: torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.triton_interpret
def test_deterministic_mode_skips_or_refuses_atomic_backwards(deterministic, monkeypatch):
    # a default order that puts the (atomic) Triton kernel first, as a GPU-verified entry would
    table = {**_opspecs.DEFAULTS, "triplane_sample": {
        "cpu": _opspecs.Default(("triton", "cpu", "reference"), "test")}}
    monkeypatch.setattr(_backend, "DEFAULTS", table)
    cpu = torch.device("cpu")
    assert _backend.select_backend("triplane_sample", cpu, None) == "triton"
    deterministic()
    assert _backend.select_backend("triplane_sample", cpu, None) == "cpu"
    planes = torch.randn(1, 3, 2, 5, 5, requires_grad=True)
    points = torch.rand(1, 7, 3) - 0.5
    out = ops.triplane_sample(planes, points, plane_axes="eg3d", backend="triton")
    with pytest.raises(RuntimeError, match="triplane_sample backward \\(triton backend\\) "
                                           "accumulates with atomics.*backend='reference'"):
        out.sum().backward()
    with torch.no_grad():  # the forward has no atomics
        ops.triplane_sample(planes, points, plane_axes="eg3d", backend="triton")
    deterministic(warn_only=True)
    out = ops.triplane_sample(planes, points, plane_axes="eg3d", backend="triton")
    with pytest.warns(UserWarning, match="accumulates with atomics"):
        out.sum().backward()


@needs_cpp
def test_deterministic_mode_keeps_the_cpu_kernels(deterministic):
    deterministic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in _opspecs.OPS:
            assert _backend.select_backend(name, torch.device("cpu"), None) == "cpu"
        planes = torch.randn(1, 3, 2, 5, 5, requires_grad=True)
        ops.triplane_sample(planes, torch.rand(1, 7, 3) - 0.5, plane_axes="eg3d").sum().backward()


# ---------------------------------------------------------------------------------------------
# number arguments
# ---------------------------------------------------------------------------------------------

@needs_cpp
def test_number_arguments_take_numpy_scalars_and_refuse_bools():
    # a NumPy scalar from a config (np.float32(1.0)) is a number: it used to be refused with
    # "box_size: expected a positive finite number, got np.float32(1.0)"
    np = pytest.importorskip("numpy")
    planes = torch.randn(1, 3, 2, 4, 4)
    points = torch.rand(1, 5, 3) - 0.5
    ref = ops.triplane_sample(planes, points, plane_axes="eg3d", box_size=1.5)
    out = ops.triplane_sample(planes, points, plane_axes="eg3d", box_size=np.float32(1.5))
    assert torch.equal(out, ref)
    feats = torch.randn(1, 5, 2)
    a = ops.splat_points(points, feats, np.int64(6), radius=np.float32(1.5),
                         background=np.float64(0.5))
    b = ops.splat_points(points, feats, 6, radius=1.5, background=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    a = ops.points_to_triplane(points, feats, (np.int32(3), 4), plane_axes="eg3d",
                               max_distance=np.float32(0.25))
    b = ops.points_to_triplane(points, feats, (3, 4), plane_axes="eg3d", max_distance=0.25)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    o, d = torch.zeros(1, 2, 3), torch.tensor([[[0.0, 0.0, 1.0]] * 2])
    depths = ops.sample_stratified(o, d, np.float32(0.5), np.float64(1.5), np.int64(4))
    assert depths.shape == (1, 2, 4) and depths[0, 0, 0] == 0.5
    cams = torch.cat([torch.eye(4).flatten(), torch.tensor([1.0, 0, 0.5, 0, 1.0, 0.5, 0, 0, 1])])
    rays = ops.ray_bundle(cams[None], np.int64(3))
    assert all(torch.equal(x, y) for x, y in zip(rays, ops.ray_bundle(cams[None], 3)))
    planes3 = torch.randn(1, 3, 2, 4, 4)
    dec = (torch.randn(4, 2), torch.randn(4), torch.randn(3, 4), torch.randn(3))
    kw = dict(near=0.5, far=1.5, n_coarse=4, n_fine=0, plane_axes="eg3d",
              stratified_noise=torch.full((1, 2, 4), 0.5))
    a = ops.render_triplane(planes3, o, d, dec, chunk_points=np.int64(4), **kw)
    b = ops.render_triplane(planes3, o, d, dec, chunk_points=4, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="box_size: expected a positive finite number, got True"):
        ops.triplane_sample(planes, points, plane_axes="eg3d", box_size=True)
    with pytest.raises(ValueError, match="box_size: expected a positive finite number, got .*nan"):
        ops.triplane_sample(planes, points, plane_axes="eg3d", box_size=np.float32("nan"))
    with pytest.raises(ValueError, match="n_samples: expected an integer >= 2, got 4.0"):
        ops.sample_stratified(o, d, 0.5, 1.5, 4.0)
    with pytest.raises(ValueError, match="image_size: expected an int or \\(H, W\\) ints"):
        ops.splat_points(points, feats, np.float32(6))


def test_float8_inputs_are_refused_naming_the_argument():
    # no kernel (reference or compiled) computes in float8: the ops answered with torch's
    # '"triplane_sample_cpu" not implemented for Float8_e4m3fn' (or silently ran the reference)
    f8 = torch.float8_e4m3fn
    planes, points = torch.randn(1, 3, 2, 4, 4), torch.rand(1, 5, 3) - 0.5
    with pytest.raises(TypeError, match="planes: expected dtype float16, bfloat16, float32 or "
                                        "float64, got float8_e4m3fn"):
        ops.triplane_sample(planes.to(f8), points, plane_axes="eg3d")
    with pytest.raises(TypeError, match="features: expected dtype .* got float8_e4m3fn"):
        ops.mip_composite(torch.rand(1, 2, 5, 3).to(f8), torch.rand(1, 2, 5), torch.rand(1, 2, 5))
    with pytest.raises(TypeError, match="volume: expected dtype .* got float8_e5m2"):
        ops.warp_volume(torch.rand(1, 2, 3, 4, 5).to(torch.float8_e5m2), torch.rand(1, 2, 2, 2, 3))
    with pytest.raises(TypeError, match="features: expected dtype .* got float8_e4m3fn"):
        ops.splat_points(torch.rand(1, 4, 3), torch.rand(1, 4, 2).to(f8), 4, backend="reference")
