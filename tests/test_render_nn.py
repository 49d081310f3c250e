"""pyface.nn render modules: OSGDecoder, TriplaneRenderer, density regularisers."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pyface import _backend
from pyface.nn import (
    OSGDecoder,
    RenderConfig,
    TriplaneRenderer,
    density_l1_regularizer,
    density_monotonic_regularizer,
)
from pyface.ops.reference import render_triplane_reference, triplane_sample_reference
from pyface.testing import assert_close
from pyface.train import Phase, Trainer, TrainableModel, build_experiment

needs_cpp = pytest.mark.cpp  # fails, never skips, when pyface._C is missing (conftest.py)


def _cameras(B):
    m = torch.eye(4, dtype=torch.float64)
    m[1, 1], m[2, 2], m[2, 3] = -1.0, -1.0, 2.7  # at z = 2.7 looking down -z, y down
    k = torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1], dtype=torch.float64)
    return torch.cat([m.flatten(), k]).expand(B, 25).clone()


def test_osg_decoder_is_eg3d():
    torch.manual_seed(0)
    dec = OSGDecoder(8, 16, 5, lr_multiplier=0.5).double()
    feats = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    out = dec(feats)
    # EG3D: FullyConnectedLayer weight gain lr_mul / sqrt(in), bias gain lr_mul
    l0, l2 = dec.net[0], dec.net[2]
    x = feats.mean(1).reshape(14, 8)
    h = F.softplus(x @ (l0.weight * 0.5 / math.sqrt(8)).t() + l0.bias * 0.5)
    y = (h @ (l2.weight * 0.5 / math.sqrt(16)).t() + l2.bias * 0.5).reshape(2, 7, 6)
    assert_close(out["sigma"], y[..., :1])
    assert_close(out["rgb"], torch.sigmoid(y[..., 1:]) * 1.002 - 0.001)
    assert set(dict(dec.named_parameters())) == {"net.0.weight", "net.0.bias", "net.2.weight",
                                                 "net.2.bias"}
    assert tuple(dec.net[0].weight.shape) == (16, 8)


def test_render_config_defaults_are_eg3d_ffhq():
    cfg = RenderConfig.ffhq()
    assert (cfg.depth_resolution, cfg.depth_resolution_importance) == (48, 48)
    assert (cfg.ray_start, cfg.ray_end, cfg.box_warp, cfg.plane_axes) == (2.25, 3.3, 1.0, "eg3d")
    assert RenderConfig.ffhq_corrected_axes().plane_axes == "xy_xz_zy"
    assert dataclasses.replace(cfg, white_back=True).white_back


@needs_cpp
@pytest.mark.parametrize("plane_axes", ["eg3d", "xy_xz_zy"])
def test_triplane_renderer_matches_eg3d_renderer(plane_axes):
    from pyface.ops import ray_bundle

    torch.manual_seed(0)
    B, res, C = 2, 4, 8
    planes = torch.randn(B, 3, C, 16, 16, dtype=torch.float64, requires_grad=True)
    dec = OSGDecoder(C, 16, 4).double()
    o, d = ray_bundle(_cameras(B), res)
    cfg = RenderConfig(depth_resolution=8, depth_resolution_importance=6, plane_axes=plane_axes,
                       chunk_points=40)
    noise = torch.rand(B, res * res, 8, dtype=torch.float64)
    u = torch.rand(B, res * res, 6, dtype=torch.float64)
    out = TriplaneRenderer(cfg)(planes, dec, o, d, stratified_noise=noise, importance_u=u)
    ref = render_triplane_reference(planes, o, d, dec, near=2.25, far=3.3, n_coarse=8, n_fine=6,
                                    plane_axes=plane_axes, stratified_noise=noise,
                                    importance_u=u)
    assert_close(out.features, ref[0] * 2 - 1)
    assert_close(out.depth, ref[1])
    assert_close(out.weights_sum, ref[2])
    imgs = out.images(res)
    assert imgs["feature_image"].shape == (B, 4, res, res)
    assert imgs["image_raw"].shape == (B, 3, res, res)
    assert_close(imgs["image_depth"][:, 0, 1, 2], out.depth[:, 1 * res + 2, 0])
    # gradients reach the decoder's parameters through the fused path
    loss = out.features.square().mean() + out.depth.mean()
    g = torch.autograd.grad(loss, [planes, *dec.parameters()])
    ref_loss = (ref[0] * 2 - 1).square().mean() + ref[1].mean()
    g_ref = torch.autograd.grad(ref_loss, [planes, *dec.parameters()])
    for a, b in zip(g, g_ref):
        assert_close(a, b)


@needs_cpp
def test_density_regularizers_match_eg3d_loss():
    torch.manual_seed(0)
    planes = torch.randn(2, 3, 8, 16, 16, dtype=torch.float64, requires_grad=True)
    dec = OSGDecoder(8, 16, 4).double()

    def sigma(points):
        return dec(triplane_sample_reference(planes, points, plane_axes="eg3d",
                                             reduce="none"))["sigma"][..., 0]

    gen = torch.Generator().manual_seed(7)
    loss = density_l1_regularizer(planes, dec, n_points=50, p_dist=0.004, generator=gen,
                                  plane_axes="eg3d")
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(2, 50, 3, dtype=torch.float64, generator=gen) * 2 - 1
    y = x + torch.randn(x.shape, dtype=torch.float64, generator=gen) * 0.004
    s = sigma(torch.cat([x, y], 1))
    assert_close(loss, F.l1_loss(s[:, :50], s[:, 50:]))
    assert loss > 0
    (g,) = torch.autograd.grad(loss, planes)
    assert g.abs().sum() > 0

    for detach in (True, False):
        gen = torch.Generator().manual_seed(3)
        loss = density_monotonic_regularizer(planes, dec, n_points=60, detach=detach,
                                             generator=gen, plane_axes="eg3d")
        gen = torch.Generator().manual_seed(3)
        x = torch.rand(2, 60, 3, dtype=torch.float64, generator=gen) * 2 - 1
        y = x + torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64) / 256
        s = sigma(torch.cat([x, y], 1))
        front = s[:, :60].detach() if detach else s[:, :60]
        assert_close(loss, torch.relu(front - s[:, 60:]).mean() * 10)
    # works with a plain callable decoder and with the raw weights too
    w = dec.effective_weights()
    gen = torch.Generator().manual_seed(7)
    assert_close(density_l1_regularizer(planes, w, n_points=50, generator=gen, plane_axes="eg3d"),
                 density_l1_regularizer(planes, dec, n_points=50, plane_axes="eg3d",
                                        generator=torch.Generator().manual_seed(7)))


class _TinyRenderModel(TrainableModel):
    """image (B, 3, 8, 8) -> conv -> tri-plane -> TriplaneRenderer at 4^2 -> L1 to the image."""

    @dataclasses.dataclass
    class Config:
        lr: float = 1e-3

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = torch.nn.Conv2d(3, 3 * 8, 3, padding=1)
        self.decoder = OSGDecoder(8, 16, 3)
        self.renderer = TriplaneRenderer(RenderConfig.ffhq(depth_resolution=6,
                                                           depth_resolution_importance=4))
        self.plane_dtypes = []

    def build_optimizers(self):
        return {"main": torch.optim.Adam(self.parameters(), self.cfg.lr)}

    def phases(self):
        return [Phase("main", "main")]

    def step(self, phase, batch, ctx):
        from pyface.ops import ray_bundle

        image = batch["image"]
        B = image.shape[0]
        planes = self.encoder(image).view(B, 3, 8, 8, 8)
        self.plane_dtypes.append(planes.dtype)
        o, d = ray_bundle(_cameras(B).float(), 4)
        raw = self.renderer(planes, self.decoder, o, d).images(4)["image_raw"]
        target = F.interpolate(image, size=4, mode="area")
        return {"loss": (raw.float() - target.float()).abs().mean()}


@needs_cpp
def test_bf16_training_step_of_a_model_that_renders(tmp_path, monkeypatch):
    """The engine's precision=bf16 (CPU autocast) reaches render_triplane with bfloat16 planes:
    no dtype error, the compiled backends run (no reference fallback), the weights train."""
    from pyface.train.data import ProceduralFaces

    chosen = []
    select = _backend.select_backend

    def spy(op, device, backend, dtype=None):
        chosen.append((op, select(op, device, backend, dtype)))
        return chosen[-1][1]

    monkeypatch.setattr(_backend, "select_backend", spy)
    exp = build_experiment("render", _TinyRenderModel.Config, overrides=[
        f"train.run_dir={tmp_path / 'run'}", "train.batch_size=2", "train.steps=2",
        "train.precision=bf16", "train.progress=false", "train.tensorboard=false",
        "train.image_every=0", "train.ckpt_every=0", "train.log_every=1"])
    torch.manual_seed(0)
    model = _TinyRenderModel(exp.model_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = Trainer(exp, model=model, dataset=ProceduralFaces(size=8, resolution=8)).fit()
    assert math.isfinite(res.losses["main/loss"])
    assert model.plane_dtypes and all(dt == torch.bfloat16 for dt in model.plane_dtypes)
    ops_run = {op for op, _ in chosen}
    assert {"render_triplane", "mip_composite", "sample_importance"} <= ops_run
    assert all(b == "cpu" for _, b in chosen), chosen
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_density_regularizers_in_half_precision_compute_in_float32(dtype):
    # the L1 term compares densities 0.004 apart: half-precision points or MLP would round the
    # difference away, so the points and the decoder run in float32 as in the renderer
    torch.manual_seed(0)
    dec = OSGDecoder(8, 16, 3)
    planes = torch.randn(2, 3, 8, 16, 16).to(dtype)
    for reg in (density_l1_regularizer, density_monotonic_regularizer):
        half = reg(planes, dec, n_points=64, plane_axes="eg3d",
                   generator=torch.Generator().manual_seed(3))
        ref = reg(planes.float(), dec, n_points=64, plane_axes="eg3d",
                  generator=torch.Generator().manual_seed(3))
        assert half.dtype == torch.float32
        assert torch.equal(half, ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = reg(planes.float(), dec, n_points=64, plane_axes="eg3d",
                       generator=torch.Generator().manual_seed(3))
        assert torch.equal(auto, ref)


def test_ray_uniforms_draw_each_item_from_its_own_generator():
    """Item b's uniforms are those one render draws from generators[b] (noise, then importance):
    they do not depend on the batch they are drawn in, and they feed the renderer's shapes."""
    from pyface.nn.render import ray_uniforms
    from pyface.ops.reference.render import render_uniforms

    cfg = RenderConfig(plane_axes="eg3d", depth_resolution=5, depth_resolution_importance=3)
    planes = torch.zeros(3, 3, 4, 6, 6)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = ray_uniforms(cfg, gens([7, 8, 9]), 11, planes)
    assert batch["stratified_noise"].shape == (3, 11, 5)
    assert batch["importance_u"].shape == (3, 11, 3)
    alone = ray_uniforms(cfg, gens([8]), 11, planes[:1])
    assert torch.equal(alone["stratified_noise"][0], batch["stratified_noise"][1])
    assert torch.equal(alone["importance_u"][0], batch["importance_u"][1])
    noise, imp = render_uniforms(1, 11, 5, 3, planes, generator=torch.Generator().manual_seed(9))
    assert torch.equal(noise[0], batch["stratified_noise"][2])
    assert torch.equal(imp[0], batch["importance_u"][2])
    coarse = ray_uniforms(RenderConfig(plane_axes="eg3d", depth_resolution=5,
                                       depth_resolution_importance=0),
                          gens([1, 2]), 4, planes.double())
    assert coarse["importance_u"] is None and coarse["stratified_noise"].dtype == torch.float64


def test_renderer_uniforms_are_the_numbers_the_renderer_draws_itself():
    """renderer_uniforms draws from torch's generator what TriplaneRenderer draws when given no
    uniforms (noise, then importance), so a render with them equals the renderer's own, bit for
    bit; bad sizes are refused by name."""
    from pyface.face.cameras import orbit_labels
    from pyface.nn.render import renderer_uniforms
    from pyface.ops import ray_bundle

    torch.manual_seed(0)
    r = TriplaneRenderer(RenderConfig.ffhq(depth_resolution=5, depth_resolution_importance=3))
    dec, planes = OSGDecoder(4, 8, 4), torch.randn(2, 3, 4, 8, 8)
    o, d = ray_bundle(orbit_labels(2, kind="yaw").float(), 3)
    torch.manual_seed(7)
    own = r(planes, dec, o, d).features
    torch.manual_seed(7)
    kw = renderer_uniforms(r.config, 2, 9, planes)
    assert kw["stratified_noise"].shape == (2, 9, 5) and kw["importance_u"].shape == (2, 9, 3)
    assert torch.equal(r(planes, dec, o, d, **kw).features, own)
    assert not torch.equal(r(planes, dec, o, d, **renderer_uniforms(r.config, 2, 9, planes))
                           .features, own)
    assert renderer_uniforms(r.config, 1, 4, planes.double())["stratified_noise"].dtype == \
        torch.float64
    with pytest.raises(ValueError, match=r"^batch: expected an int >= 1, got 0$"):
        renderer_uniforms(r.config, 0, 9, planes)
    with pytest.raises(ValueError, match=r"^n_rays: expected an int >= 1, got 9.0$"):
        renderer_uniforms(r.config, 2, 9.0, planes)


def test_render_value_checks_name_the_models_key():
    """``check_render_values`` checks the inference-time RenderConfig fields present in a
    mapping (absent ones are not checked) and names ``KEY.FIELD``; ``check_sample_counts``
    refuses importance samples after fewer than 4 coarse ones, naming the field the caller
    set."""
    from pyface.nn import check_render_values, check_sample_counts

    check_render_values({}, "model.render")
    check_render_values({"depth_resolution": 2, "depth_resolution_importance": 0,
                         "recompute": "decoder", "chunk_points": None, "ray_start": -1.0},
                        "model.render")
    for values, msg in (({"depth_resolution": 1}, r"model.render.depth_resolution: expected an "
                                                  r"int >= 2, got 1"),
                        ({"depth_resolution": True}, r"model.render.depth_resolution: "),
                        ({"depth_resolution_importance": -1},
                         r"model.render.depth_resolution_importance: expected an int >= 0 "
                         r"\(0: the coarse pass only\), got -1"),
                        ({"recompute": "all"}, r"model.render.recompute: expected true, false "
                                               r"or 'decoder', got 'all'"),
                        ({"chunk_points": 0}, r"model.render.chunk_points: expected an int >= "
                                              r"1 or None \(the renderer's default\), got 0")):
        with pytest.raises(ValueError, match=msg):
            check_render_values(values, "model.render")
    check_sample_counts(RenderConfig.ffhq(depth_resolution=3, depth_resolution_importance=0),
                        "k")
    check_sample_counts(RenderConfig.ffhq(depth_resolution=4, depth_resolution_importance=9),
                        "k")
    bad = RenderConfig.ffhq(depth_resolution=3, depth_resolution_importance=2)
    with pytest.raises(ValueError, match=r"^k.depth_resolution: expected >= 4 with importance "
                                         r"samples \(depth_resolution_importance 2\), got 3$"):
        check_sample_counts(bad, "k")
    with pytest.raises(ValueError, match=r"^k.depth_resolution_importance: expected 0 with "
                                         r"fewer than 4 coarse samples \(depth_resolution 3\), "
                                         r"got 2$"):
        check_sample_counts(bad, "k", blame="depth_resolution_importance")
