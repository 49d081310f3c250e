"""The opt-in ``torch.compile`` of the inference pipelines (``Pipeline.compile``,
``pyface.models.load(compile=)``): every model's declared modules exist and are its own modules,
compiled frames equal the uncompiled ones, the cached source state is reused without compiling
again, and OTAvatar's pivotal tuning trains its compiled generator copy as it trains an
uncompiled one. Micro configs: each model a few seconds on CPU with the ``eager`` /
``aot_eager`` backends (graph capture, no code generation); one Inductor test."""
from __future__ import annotations

import copy
import glob
import os
import types

import pytest
import torch

from pyface.nn.compiling import COMPILE_CHOICES, is_compiled
from pyface.testing import assert_close
from pyface.train import registry
from pyface.train.config import build_experiment, to_dict
from pyface.train.model import Pipeline, compiled_graphs

#: a micro EG3D generator (as tests/test_model_otavatar.py): 16^2 images, 8^2 renders
EG3D_MICRO = ["model.generator.z_dim=8", "model.generator.w_dim=8",
              "model.generator.backbone_resolution=8", "model.generator.plane_channels=4",
              "model.generator.channel_base=64", "model.generator.channel_max=8",
              "model.generator.decoder_hidden=8", "model.generator.decoder_features=4",
              "model.generator.img_resolution=16", "model.generator.neural_rendering_resolution=8",
              "model.generator.sr_input_resolution=8", "model.generator.sr_block_channels=[8,8]",
              "model.generator.render.depth_resolution=4",
              "model.generator.render.depth_resolution_importance=4",
              "model.neural_rendering_resolution_initial=8", "data.resolution=16"]
#: micro configs of the other models (as their tests/test_model_*.py)
MICRO = {
    "eg3d": EG3D_MICRO,
    "otavatar": ["model.invert_steps=1", "model.wplus_steps=0", "model.pti_steps=0"],
    "goha_s1": ["model.resolution=32", "model.encoder_width=16", "model.plane_channels=8",
                "model.embed_width=16", "model.pseudo_render_size=32", "model.lift_resolution=8",
                "model.lift_samples=4", "model.render_resolution=16", "model.depth_samples=4",
                "model.depth_samples_importance=4", "model.decoder_hidden=8",
                "data.resolution=32"],
    "export3d": ["model.resolution=32", "model.stem_widths=[4,8]", "model.vit_dim=16",
                 "model.vit_depth=1", "model.vit_heads=2", "model.ups=1", "model.up_widths=[8]",
                 "model.plane_channels=4", "model.decoder_hidden=8", "model.decoder_features=7",
                 "model.depth_samples=4", "model.importance_samples=4",
                 "model.sr_widths=[4,4,4]", "data.resolution=32"],
    "mmfa": ["model.resolution=32", "model.num_kp=4", "model.app_block_expansion=8",
             "model.app_max_features=16", "model.app_channels=4", "model.app_depth=4",
             "model.app_resblocks=1", "model.kp_scale_factor=0.25", "model.kp_block_expansion=8",
             "model.kp_max_features=16", "model.kp_blocks=2", "model.kp_depth=4",
             "model.dm_block_expansion=8", "model.dm_blocks=2", "model.dm_max_features=16",
             "model.dec_channels=[16,8,8]", "model.enc_channels=[8,16]", "model.exp_dim=8",
             "model.exp_hidden=16", "data.resolution=32"],
}
#: stage models' micro configs (OTAvatar's EG3D generator)
STAGE_MICRO = {"eg3d": EG3D_MICRO}


def _experiment(name: str, overrides=()):
    cls = registry.model_class(name)
    return cls, build_experiment(name, cls.Config, defaults=cls.recipe, preset="tiny",
                                 overrides=list(overrides))


def build_model(name: str, monkeypatch, overrides=None):
    """``name`` at its tiny preset with its micro overrides, its stages built in memory (fresh
    weights; no stage is trained)."""
    import pyface.models.export3d.model as export3d
    import pyface.models.goha.stages as goha_stages
    import pyface.models.mmfa.vae as mmfa_vae
    import pyface.models.otavatar.model as otavatar

    cls, cfg = _experiment(name, MICRO.get(name, ()) if overrides is None else overrides)
    mc = cfg.model_config
    if cls.local_batch_field:
        setattr(mc, cls.local_batch_field, 1)
    built = {}
    for stage in cls.stages:
        _, scfg = _experiment(stage.model, STAGE_MICRO.get(stage.model, ()))
        key = f"<stage {stage.name}>"
        built[key] = registry.build_model(stage.model, scfg.model_config)
        setattr(mc, stage.checkpoint_key, key)
    for mod in (export3d, goha_stages, mmfa_vae):
        monkeypatch.setattr(mod, "load_pretrained",
                            lambda path, *, ema=True: (to_dict(built[path].cfg),
                                                       built[path].state_dict()))
    monkeypatch.setattr(otavatar, "load_registered",
                        lambda model, path, *, ema=True, device="cpu":
                        types.SimpleNamespace(G=built[path].G))
    return registry.build_model(name, mc)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: graphs cached by an earlier test (another model's
    shapes through the same renderer code) would make TorchDynamo compile for dynamic shapes."""
    from pyface.nn.compiling import reset_compiled

    reset_compiled()
    yield
    reset_compiled()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two synthetic video folders (frames, cameras, coefficients, landmarks, masks)."""
    from pyface.data.synthetic import SynthConfig, generate

    root = str(tmp_path_factory.mktemp("compile") / "data")
    generate(root, SynthConfig(identities=2, videos_per_identity=1, frames=4, resolution=32,
                               workers=1, cross=False), progress=False)
    return sorted(os.path.dirname(p) for p in glob.glob(f"{root}/**/coeffs.npy", recursive=True))


def _frames(pipe, videos, n=2):
    from pyface.data.driving import read_driving, read_source

    return (read_source(videos[0], pipe.resolution),
            read_driving(videos[1], pipe.resolution, max_frames=n))


def _source_state(name, pipe, source):
    if name == "eg3d":      # the inversion's own compiled run is OTAvatar's test below
        G = pipe.G
        z = torch.randn(1, G.cfg.z_dim, generator=torch.Generator().manual_seed(0))
        return {"ws": G.mapping(z, source["camera"][None].float())}
    with torch.no_grad():
        return pipe.encode_source(source)


def _generate(pipe, state, driving, t0=0):
    with torch.no_grad():
        motion = pipe.seed_frames(pipe.encode_driving(driving), 0, t0)    # EG3D, GOHA: seeded
        return pipe.generate(state, motion)


PIPELINE_MODELS = sorted(n for n in registry.BUILTIN_MODELS
                         if registry.model_class(n).Pipeline is not None)


@pytest.mark.parametrize("name", PIPELINE_MODELS)
def test_declared_modules_exist_and_are_pyface_modules(name, monkeypatch):
    """Every name resolves on a model at its tiny preset, and names a module whose forward is
    pyface's: Module.compile does not trace a torch built-in's own forward (an nn.Sequential,
    an nn.Conv2d), which would compile nothing while reporting it compiled."""
    model = build_model(name, monkeypatch, overrides=[])
    pipe = model.Pipeline(model, device="cpu")
    names = tuple(pipe.compile_modules)
    assert len(set(names)) == len(names)
    for n in names:                 # names relative to the pipeline's model (EG3D: G)
        m = pipe.model.get_submodule(n)
        assert type(m).forward.__module__.startswith("pyface."), (n, type(m))
    if name == "example":
        assert names == ()          # a fused op and an nn.Sequential MLP: nothing to compile
    else:
        assert names
    if name == "goha":
        assert names[-1] == "sr"    # s2's super-resolution; the earlier stages have none
    assert pipe.compile("eager") == list(names)
    assert all(is_compiled(pipe.model.get_submodule(n)) for n in names)
    assert pipe.compiled_modules == names and pipe.compile_mode == "eager"


@pytest.mark.parametrize("name", ["eg3d", "goha_s1", "export3d", "mmfa"])
def test_compiled_frames_equal_the_uncompiled_ones(name, videos, monkeypatch):
    """The same model compiled (eager backend) and not: the same frames from one cached source
    state for two chunks of driving frames; the second chunk (same shape) compiles nothing."""
    torch.manual_seed(0)
    model = build_model(name, monkeypatch)
    cls = type(model).Pipeline
    plain = cls(model, device="cpu")
    compiled = cls(copy.deepcopy(model), device="cpu")
    keys = list(compiled.model.state_dict())
    assert compiled.compile("eager") == list(compiled.compile_modules)
    assert list(compiled.model.state_dict()) == keys
    source, driving = _frames(plain, videos, n=4)
    first = {k: v[:2] if torch.is_tensor(v) else v for k, v in driving.items()}
    second = {k: v[2:] if torch.is_tensor(v) else v for k, v in driving.items()}
    torch.manual_seed(1)
    state = _source_state(name, plain, source)
    torch.manual_seed(1)
    cstate = _source_state(name, compiled, source)
    before = compiled_graphs()
    got = _generate(compiled, cstate, first)
    assert compiled_graphs() > before                  # the declared modules were traced
    assert_close(got, _generate(plain, state, first))
    before = compiled_graphs()
    got = _generate(compiled, cstate, second, t0=2)
    assert compiled_graphs() == before                 # compiled code reused, state cached
    assert_close(got, _generate(plain, state, second, t0=2))


def test_otavatar_pivotal_tuning_trains_the_compiled_copy(videos, monkeypatch):
    """OTAvatar's source encoding inverts W through many generator passes and, with PTI, tunes
    a copy of the generator: with the generator's modules compiled (aot_eager: AOTAutograd
    forward and backward graphs) the copy is compiled too, its weights move away from the
    model's, and they move as without compilation; the frames match."""
    torch.manual_seed(0)
    model = build_model("otavatar", monkeypatch)
    cls = type(model).Pipeline
    plain = cls(model, device="cpu")
    compiled = cls(copy.deepcopy(model), device="cpu")
    compiled.compile("aot_eager")
    source, driving = _frames(plain, videos)
    states = []
    for pipe in (plain, compiled):
        torch.manual_seed(3)
        with torch.no_grad():
            states.append(pipe.encode_source(source, steps=1, pti_steps=2))
    ref, got = states
    assert is_compiled(got["generator"].renderer)
    assert is_compiled(got["generator"].backbone.synthesis)
    assert_close(got["w"], ref["w"])
    G0 = dict(model.generator.named_parameters())
    moved = 0
    for (n, p_ref), (_, p_got) in zip(ref["generator"].named_parameters(),
                                      got["generator"].named_parameters()):
        if not torch.equal(p_ref, G0[n]):
            moved += 1
        assert_close(p_got, p_ref, msg=f"PTI weight {n}")
    assert moved > 0                                    # PTI changed the generator copy
    # the compiled model's own generator was left as it was
    for n, p in compiled.model.generator.named_parameters():
        assert torch.equal(p, G0[n]), n
    assert_close(_generate(compiled, got, driving), _generate(plain, ref, driving))


def test_the_renderer_draws_its_samples_under_dynamic_shapes():
    """A renderer compiled once shapes vary (another chunk size, another model's rays in the
    same process: TorchDynamo then compiles for dynamic shapes) still draws its own ray samples:
    torch.rand(..., generator=None) of a dynamic shape fails to trace in torch 2.13, so the
    samples are drawn without the argument when there is no generator."""
    from pyface.nn import OSGDecoder, RenderConfig, TriplaneRenderer, compile_modules
    from pyface.nn.compiling import CompileOptions
    from pyface.ops import ray_bundle

    torch.manual_seed(0)
    root = torch.nn.Module()
    root.renderer = TriplaneRenderer(RenderConfig.ffhq(depth_resolution=4,
                                                       depth_resolution_importance=4))
    decoder = OSGDecoder(4, 8, 4)
    assert compile_modules(root, ["renderer"], CompileOptions(backend="eager", mode=None,
                                                              dynamic=True)) == ["renderer"]
    for B, res in ((1, 4), (2, 6)):
        from pyface.face.cameras import orbit_labels

        o, d = ray_bundle(orbit_labels(B, kind="yaw").float(), res)
        before = compiled_graphs()
        out = root.renderer(torch.randn(B, 3, 4, 8, 8), decoder, o, d)
        assert compiled_graphs() > before or B > 1
        assert out.features.shape[:2] == (B, res * res) and torch.isfinite(out.features).all()


def test_compile_options_are_checked_and_recorded(monkeypatch):
    model = build_model("eg3d", monkeypatch)
    pipe = model.Pipeline(model, device="cpu")
    assert pipe.compile_mode == "off" and pipe.compiled_modules == ()
    assert pipe.compile("off") == [] and pipe.compile(None) == []
    assert pipe.compile_options is None
    with pytest.raises(ValueError, match=r"^compile: expected one of off, default.*got 'fast'"):
        pipe.compile("fast")
    assert pipe.compile("eager") == ["backbone.synthesis", "renderer", "superresolution"]
    assert pipe.compile("eager") == []                    # compiled already: nothing more
    assert pipe.compile_mode == "eager"
    with pytest.raises(ValueError, match=r"compiled with 'eager' already, got 'default'"):
        pipe.compile("default")

    class Bad(Pipeline):
        resolution = 16
        compile_modules = ("nope",)

    with pytest.raises(ValueError, match=r"EG3DGenerator has no submodule 'nope'"):
        Bad(model.G, device="cpu").compile("eager")


def test_models_load_compiles_and_checks_the_mode_first(tmp_path, monkeypatch):
    """pyface.models.load(compile=): a bad mode is refused before the checkpoint is read (a
    missing folder here); a good one compiles the loaded pipeline."""
    import pyface.models

    with pytest.raises(ValueError, match=r"^compile: expected one of .*got 'fast'"):
        pyface.models.load("eg3d", str(tmp_path / "missing"), compile="fast")
    model = build_model("mmfa", monkeypatch)
    monkeypatch.setattr(type(model), "load_pipeline",
                        staticmethod(lambda path, *, device=None, ema=True:
                                     type(model).Pipeline(model, device=device)), raising=False)
    pipe = pyface.models.load("mmfa", "any", device="cpu", compile="aot_eager")
    assert pipe.compile_mode == "aot_eager"
    assert pipe.compiled_modules == tuple(type(model).Pipeline.compile_modules)
    assert pyface.models.load("mmfa", "any", device="cpu").compile_mode == "off"


def test_inductor_frames_equal_the_uncompiled_ones(videos, monkeypatch):
    """The one Inductor test (C++ code generation on CPU; skipped without a C++ compiler): the
    micro MMFA pipeline with one module compiled (its expression decoder, to keep the
    compilation short) gives the uncompiled frames."""
    import shutil

    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "clang++")):
        pytest.skip("no C++ compiler (g++, clang++ or CXX): Inductor on CPU needs one")
    torch.manual_seed(0)
    model = build_model("mmfa", monkeypatch)
    cls = type(model).Pipeline
    plain, compiled = cls(model, device="cpu"), cls(copy.deepcopy(model), device="cpu")
    monkeypatch.setattr(compiled, "compile_modules", ("exp_decoder",))
    assert compiled.compile() == ["exp_decoder"] and compiled.compile_mode == "default"
    source, driving = _frames(plain, videos)
    before = compiled_graphs()
    got = _generate(compiled, _source_state("mmfa", compiled, source), driving)
    assert compiled_graphs() > before
    # Inductor fuses and reorders float32 arithmetic: 10x the float32 kernel tolerance
    assert_close(got, _generate(plain, _source_state("mmfa", plain, source), driving), scale=10)


def test_evaluate_leaves_the_chunks_that_compiled_out_of_fps(tmp_path):
    """pyface eval's evaluator on a pipeline whose generate runs a compiled function: the
    chunks during which TorchDynamo compiled (the first; the first of a new chunk size) are
    counted apart, and fps is that of the other chunks."""
    from pyface.data import synthetic as S
    from pyface.eval.evaluate import evaluate

    root = str(tmp_path / "ds")
    S.generate(root, S.default_config(identities=2, videos_per_identity=1, frames=5,
                                      resolution=16), progress=False)
    blur = torch.compile(lambda x: torch.nn.functional.avg_pool2d(x, 3, 1, 1) * 0.5,
                         backend="eager")

    class Copy:
        resolution = 16

        def encode_source(self, source):
            return source["image"]

        def encode_driving(self, driving):
            return driving["image"].shape[0]

        def generate(self, state, n):
            return blur(state[None].expand(n, -1, -1, -1))

    res = evaluate(Copy(), root, protocol="same", metrics=["psnr"], batch_size=2,
                   detector="none")
    d = res.to_dict()
    assert 1 <= d["compile_chunks"] < len(res.indices) and not d["fps_includes_compilation"]
    assert d["compile_seconds"] > 0
    assert res.fps == pytest.approx((res.frames - res.compile_frames)
                                    / (res.seconds - res.compile_seconds))


def test_compile_choices_are_the_cli_modes():
    from pyface.train.animate_cli import parse_compile_option

    assert [parse_compile_option(v) for v in COMPILE_CHOICES] == [None, *COMPILE_CHOICES[1:]]
    assert parse_compile_option(None) is None and parse_compile_option("on") == "default"
    with pytest.raises(ValueError, match=r"^--compile: expected one of off, default, .*got 'x'"):
        parse_compile_option("x")
