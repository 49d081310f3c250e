"""The ``gpu-short`` and ``full`` presets at their real shapes, on CPU, without a GPU.

The tiny presets that the rest of the suite trains never reach the resolutions, channel widths,
sample counts and SR factors of the GPU presets, so a shape or dtype error there would first
show on a GPU user's first step. Here every registered model with those presets (each stage of
a staged model is a registered model of its own) runs training steps of every phase at the
preset's shapes under ``torch._subclasses.FakeTensorMode``: tensors carry shapes and dtypes, no
data, so a step of the 512^2 models costs seconds and no memory. The batch is the preset's
dataset (its item layout, at the preset's ``data.resolution``) read from a small synthetic root,
with 1 item per rank instead of the preset's batch. The inference pipeline's ``generate``
(``pyface animate``) runs the same way at the preset's output resolution.

What this does not check: speed, memory, and numerics (NaN, overflow under bf16) on a GPU;
and the parts that need values: the engine's NaN guard and logged measures (``float()`` of a
loss; EG3D's ``measure_every`` is set to 0 here), which run unchanged at any shape.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import types

import pytest
import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, FakeTensorMode,
                                          is_fake)

from pyface.train import registry
from pyface.train.config import DataConfig, build_experiment, from_dict, merge, to_dict
from pyface.train.model import StepContext

PRESETS = ("gpu-short", "full")


def _preset_models() -> list[str]:
    return [n for n in sorted(registry.BUILTIN_MODELS)
            if all(p in registry.model_class(n).presets for p in PRESETS)]


MODELS = _preset_models()


def test_every_portrait_model_and_stage_has_the_gpu_presets():
    """The list below runs every registered model but the example (tiny only)."""
    assert set(MODELS) == set(registry.BUILTIN_MODELS) - {"example"}
    for name in MODELS:
        for stage in registry.model_class(name).stages:
            assert stage.model in MODELS


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A synthetic root every dataset reads (48 frames: the full clips need 46), rendered at
    32^2 and resized by the datasets to each preset's resolution."""
    from pyface.data.synthetic import SynthConfig, generate

    out = str(tmp_path_factory.mktemp("presets") / "root")
    generate(out, SynthConfig(identities=2, videos_per_identity=1, frames=48, resolution=32,
                              workers=1, multiview=True), progress=False)
    return out


def experiment(name: str, preset: str):
    cls = registry.model_class(name)
    return cls, build_experiment(name, cls.Config, defaults=cls.recipe, preset=preset)


def stage_experiment(cls, cfg, stage):
    """The config ``pyface train`` gives ``stage`` of ``cls`` under ``cfg.preset`` (the stage
    model's preset with the parent's ``Stage.presets`` above it, as
    :func:`pyface.train.stages.prepare_stages` builds it)."""
    stage_cls = registry.model_class(stage.model)
    presets = dict(stage_cls.presets)
    extra = (stage.presets or {}).get(cfg.preset)
    if extra:
        presets[cfg.preset] = merge(presets[cfg.preset], extra)
    return stage_cls, build_experiment(stage.model, stage_cls.Config, defaults=stage_cls.recipe,
                                       preset=cfg.preset, presets=presets)


def batch_of(cfg, root: str, B: int) -> dict:
    """``B`` items of the preset's dataset (its options, at its resolution) from ``root``,
    collated. EG3D's ``full`` reads an FFHQ folder (``eg3d`` dataset): the ``synthetic`` frames
    have its item layout (image, camera)."""
    d = to_dict(cfg.data)
    if d["name"] == "eg3d":
        d.update(name="synthetic", options={"mirror": False, "load_masks": True})
    opts = dict(d.get("options") or {})
    opts.pop("synth", None)
    d.update(path=root, size=B, options=opts)
    ds = registry.build_dataset(from_dict(DataConfig, d, prefix="data."))
    return torch.utils.data.default_collate([ds[i] for i in range(B)])


class FakeEngine:
    """What ``StepContext`` asks of the Trainer inside a step (in-step updates: a backward into
    the optimizer's parameters; EMA copies: the live modules)."""

    def __init__(self, model, optimizers):
        self.model, self.optimizers = model, optimizers
        self.updates = 0

    def _apply_update(self, names, loss, *, phase, inner, retain_graph=False, overlap=True,
                      lr_scale=1.0):      # ignored: a learning rate changes no shape
        names = (names,) if isinstance(names, str) else tuple(names)
        params = [p for n in names for g in self.optimizers[n].param_groups for p in g["params"]
                  if p.requires_grad]
        assert loss.numel() == 1 and loss.requires_grad, (phase, names, tuple(loss.shape))
        torch.autograd.backward(loss, inputs=params, retain_graph=retain_graph)
        for n in names:
            for p in params:
                assert p.grad is None or p.grad.shape == p.shape
            self.optimizers[n].step()
            self.optimizers[n].zero_grad(set_to_none=True)
        self.updates += 1
        return loss.detach().float()

    def ema_module(self, name):
        return self.model.get_submodule(name)

    def reset_optimizer(self, name):
        self.optimizers[name].state.clear()


@contextlib.contextmanager
def stages_built_in_memory(cls, cfg, monkeypatch):
    """The staged models read their stage's run (``load_pretrained`` / ``load_registered``):
    here the stage model is built at its preset config instead (fake weights), so no stage is
    trained. Sets each stage's checkpoint key to a marker path."""
    built = {}
    for stage in cls.stages:
        stage_cls, stage_cfg = stage_experiment(cls, cfg, stage)
        key = f"<stage {stage.name}>"
        built[key] = (stage.model, stage_cfg.model_config)
        setattr(cfg.model_config, stage.checkpoint_key, key)

    def build(path):
        model, mc = built[path]
        if hasattr(mc, "measure_every"):
            mc.measure_every = 0
        return registry.build_model(model, dataclasses.replace(mc))

    def load_pretrained(path, *, ema=True):
        if path not in built:
            raise AssertionError(f"unexpected checkpoint {path!r}")
        m = build(path)
        return to_dict(m.cfg), m.state_dict()

    def load_registered(model, path, *, ema=True, device="cpu"):
        m = build(path)
        assert built[path][0] == model
        return types.SimpleNamespace(G=m.G)

    import pyface.models.export3d.model as export3d
    import pyface.models.goha.stages as goha_stages
    import pyface.models.mmfa.vae as mmfa_vae
    import pyface.models.otavatar.model as otavatar

    for mod in (export3d, goha_stages, mmfa_vae):
        monkeypatch.setattr(mod, "load_pretrained", load_pretrained)
    monkeypatch.setattr(otavatar, "load_registered", load_registered)
    yield


def steps_of(name: str, mc, batch_size: int) -> list[int]:
    """The steps whose branches differ: step 0 runs every phase (every interval divides 0);
    GOHA's modes go by ``step % 6`` (s1) and by the canonical / expression / appearance
    schedule; Export3D's GAN starts at ``gan_start``; EG3D's neural rendering resolution fades
    from ``neural_rendering_resolution_initial`` to ``_final`` (``full``: 64 -> 128), through
    odd sizes: a step at an odd size during the fade and one after it (multiples of 16, so that
    the lazy regularisers run too)."""
    if name.startswith("goha"):
        late = max(mc.canonical_until, mc.expression_from, mc.appearance_from)
        return [0, 1, 2, 4] + ([late + 0, late + 4] if name == "goha_s1" else [])
    if name == "export3d" and mc.w_gan > 0:
        return [0, mc.gan_start]
    if name == "eg3d" and mc.neural_rendering_resolution_final is not None:
        from pyface.models.eg3d.model import EG3D

        res = lambda step: EG3D.rendering_resolution(  # noqa: E731
            types.SimpleNamespace(cfg=mc), step * batch_size)
        start = int(mc.neural_rendering_resolution_fade_start_kimg * 1000 / batch_size)
        end = int((mc.neural_rendering_resolution_fade_start_kimg
                   + mc.neural_rendering_resolution_fade_kimg) * 1000 / batch_size)
        start, end = start // 16 * 16, end // 16 * 16 + 16
        odd = next(s for s in range(start, end, 16) if res(s) % 2)
        assert res(end) == mc.neural_rendering_resolution_final
        return [0, odd, end]
    return [0]


class ZeroScalarFakeMode(FakeTensorMode):
    """FakeTensorMode in which reading the value of a tensor that has none (``int()``,
    ``float()``, ``.item()`` of a computed fake tensor; the constants it tracks, e.g. EG3D's
    ``rendering_resolution``, keep theirs) gives 0: running statistics read to pick a branch (Export3D's ``code_batches``, the MMFA
    VAE's ``stat_count``: a fresh model's 0) and logged numbers (OTAvatar's inversion log).
    pyface's value checks (finite cameras, indices in range) skip fake tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except DataDependentOutputException:
            if func not in (torch.ops.aten._local_scalar_dense.default,
                            torch.ops.aten.item.default):
                raise
            (t,) = args
            return False if t.dtype == torch.bool else (0.0 if t.dtype.is_floating_point
                                                        else 0)


@contextlib.contextmanager
def fake_model(name: str, preset: str, monkeypatch, B: int = 1):
    """``name`` built at ``preset`` inside a fake mode (its stages built in memory): yields
    (model, experiment config, the mode)."""
    from pyface.face.morphable import MorphableModel

    cls, cfg = experiment(name, preset)
    mc = cfg.model_config
    if hasattr(mc, "measure_every"):
        mc.measure_every = 0            # float() of logged measures: values, not shapes
    if cls.local_batch_field:
        setattr(mc, cls.local_batch_field, B)
    if name == "otavatar":
        # the inversion's inner loop repeats one shape: 2 iterations, the last with the
        # controller (both kinds of update), instead of 30 / 100; the pipeline's source
        # inversion likewise
        mc.invert_iters, mc.invert_controller_iters = 2, 1
        mc.invert_steps, mc.wplus_steps = 2, min(mc.wplus_steps, 1)
    MorphableModel.builtin()            # its cache holds real tensors, built outside fake mode
    mode = ZeroScalarFakeMode(allow_non_fake_inputs=True)
    with stages_built_in_memory(cls, cfg, monkeypatch), mode:
        yield registry.build_model(name, mc), cfg, mode


def to_fake(mode, tree):
    return torch.utils._pytree.tree_map(
        lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, tree)


def fake_steps(name: str, preset: str, root: str, monkeypatch, B: int = 1):
    """Runs the steps of ``name`` at ``preset`` in fake mode on ``B`` items of its dataset;
    returns {step: {phase: losses}}."""
    results = {}
    with fake_model(name, preset, monkeypatch, B) as (model, cfg, mode):
        fb = to_fake(mode, batch_of(cfg, root, B))
        for key in model.label_pools():     # what the Trainer hands over: here the batch's
            model.set_label_pool(key, fb[key])
        mc = cfg.model_config
        model.train()
        opts = model.build_optimizers()
        engine = FakeEngine(model, opts)
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                    else contextlib.nullcontext())
        for step in steps_of(name, mc, cfg.train.batch_size):
            ctx = StepContext(step=step, images_seen=step * cfg.train.batch_size,
                              batch_size=cfg.train.batch_size, engine=engine)
            out = {}
            for ph in model.phases():
                if step % ph.interval:
                    continue
                ctx.phase = ph.name
                with autocast:
                    losses = model.step(ph.name, fb, ctx)
                if ph.optimizer is not None:
                    engine._apply_update(ph.optimizer, losses["loss"], phase=ph.name, inner=False)
                out[ph.name] = losses
            results[step] = out
    return results


#: the steps that take more than a few seconds of the module's 60 s budget (512^2 renders,
#: GOHA's six modes, Export3D's full preset at step 0 and at gan_start): marked slow
SLOW = {(n, p) for n in ("eg3d", "goha_s1", "goha_s1_gan", "goha") for p in PRESETS} | {
    ("export3d", "full")}


@pytest.mark.parametrize("name,preset", [
    pytest.param(n, p, marks=pytest.mark.slow, id=f"{n}-{p}") if (n, p) in SLOW
    else pytest.param(n, p, id=f"{n}-{p}") for n in MODELS for p in PRESETS])
def test_a_training_step_at_the_preset_shapes(name, preset, root, monkeypatch):
    results = fake_steps(name, preset, root, monkeypatch)
    for step, out in results.items():
        assert out, f"step {step}: no phase ran"
        for phase, losses in out.items():
            assert "loss" in losses, (step, phase)
            for k, v in losses.items():
                assert is_fake(v) and v.numel() == 1, (step, phase, k, tuple(v.shape))
                assert v.dtype.is_floating_point, (step, phase, k, v.dtype)


def output_resolution(name: str, cfg) -> int:
    """The image size the preset trains its model to produce."""
    mc = cfg.model_config
    if name == "eg3d":
        return mc.generator.img_resolution
    if name in ("otavatar", "mmfa_vae"):
        return cfg.data.resolution      # a stage's model at the size of this preset's data
    if name in ("goha_s1", "goha_s1_gan"):
        return mc.render_resolution     # no super-resolution before s2: the raw render
    return mc.resolution


PIPELINES = [n for n in MODELS if registry.model_class(n).Pipeline is not None]
#: marked slow: the GOHA pipelines (the morphable renders of source and driving) and the full
#: presets but MMFA's (a 256^2 2D model)
SLOW_PIPELINES = {(n, p) for n in PIPELINES for p in PRESETS
                  if n.startswith("goha") or (p == "full" and not n.startswith("mmfa"))}


@pytest.mark.parametrize("name,preset", [
    pytest.param(n, p, marks=pytest.mark.slow, id=f"{n}-{p}") if (n, p) in SLOW_PIPELINES
    else pytest.param(n, p, id=f"{n}-{p}") for n in PIPELINES for p in PRESETS])
def test_the_pipeline_generates_at_the_preset_resolution(name, preset, root, monkeypatch):
    """``pyface animate``'s path: encode_source, encode_driving and generate of 2 driving frames
    (source and driving frames: the synthetic set's layout at the preset's data resolution)."""
    with fake_model(name, preset, monkeypatch) as (model, cfg, mode):
        cls = registry.model_class(name)
        frames = batch_of(dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, name="synthetic", options=None)), root, 2)
        frames = {k: v for k, v in frames.items()
                  if k in ("image", "camera", "coeffs", "landmarks", "mask")}
        source = to_fake(mode, {k: v[0] for k, v in frames.items()})
        driving = to_fake(mode, frames)
        kw = {"invert_steps": 2} if name == "eg3d" else {}
        # Module.to swaps parameters, which fake parameters refuse; they are on the CPU already
        monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
        pipe = cls.Pipeline(model, device="cpu", **kw)
        assert pipe.resolution == output_resolution(name, cfg)
        out = pipe.animate(source, driving)
        assert is_fake(out)
        assert tuple(out.shape) == (2, 3, pipe.resolution, pipe.resolution), tuple(out.shape)
        assert out.dtype == torch.float32


def test_value_checks_skip_fake_tensors_and_still_run_on_real_ones():
    """The ops' value checks (finite cameras, face indices in range) need values: under
    FakeTensorMode they are skipped (the shape checks run), on real tensors they still refuse."""
    from pyface.face.cameras import check_label, orbit_labels
    from pyface.ops.render import ray_bundle

    cams = orbit_labels(2, kind="yaw").float()
    bad = cams.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        ray_bundle(bad, 4)
    with pytest.raises(ValueError, match="NaN"):
        check_label(bad)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(bad)
        o, d = ray_bundle(fake, 8)
        assert is_fake(o) and o.shape == d.shape == (2, 64, 3)
        check_label(fake)
        with pytest.raises(ValueError, match="25"):
            ray_bundle(fake[:, :24], 8)


def test_value_checks_still_run_under_torch_compile():
    """Compiled code checks values as eager code does (the check is a graph break): a NaN
    camera is refused, not rendered into NaN rays."""
    from pyface.face.cameras import orbit_labels
    from pyface.ops.render import ray_bundle

    bad = orbit_labels(1, kind="yaw").float()
    bad[0, 3] = float("nan")
    compiled = torch.compile(lambda c: ray_bundle(c, 4), backend="aot_eager")
    with pytest.raises(ValueError, match="finite"):
        compiled(bad)
