"""EG3D model (pyface.models.eg3d): generator shapes and EG3D semantics, the converter against a
hand transcription of EG3D's published module structure, the training recipe on the engine."""
from __future__ import annotations

import collections
import math
import os
import pickle
import shutil

import pytest
import torch
from torch import nn

from pyface import checkpoint as ckpt
from pyface.models.eg3d import EG3DGenerator, EG3DGeneratorConfig
from pyface.nn.render import RenderConfig
from _saved_runs import drop_saved_keys, edit_saved_config


def tiny_cfg(**kw) -> EG3DGeneratorConfig:
    base = dict(z_dim=16, w_dim=16, backbone_resolution=16, plane_channels=4, channel_base=64,
                channel_max=8, decoder_hidden=8, decoder_features=6, img_resolution=16,
                neural_rendering_resolution=8, sr_variant="hybrid2x", sr_input_resolution=8,
                sr_block_channels=[8, 4],
                render=RenderConfig.ffhq(depth_resolution=6, depth_resolution_importance=4))
    base.update(kw)
    return EG3DGeneratorConfig(**base)


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    return EG3DGenerator(tiny_cfg()).eval()


def _uniforms(B, res, cfg):
    g = torch.Generator().manual_seed(1)
    R = res * res
    return (torch.rand(B, R, cfg.render.depth_resolution, generator=g),
            torch.rand(B, R, cfg.render.depth_resolution_importance, generator=g))


# ------------------------------------------------------------------------------------------
# generator
# ------------------------------------------------------------------------------------------

def test_generator_forward_shapes(G):
    z, c = torch.randn(2, 16), G.camera([0.0, 0.4], [0.0, -0.1])
    out = G(z, c)
    assert out["image"].shape == (2, 3, 16, 16)
    assert out["image_raw"].shape == (2, 3, 8, 8)
    assert out["feature_image"].shape == (2, 6, 8, 8)
    assert out["image_depth"].shape == (2, 1, 8, 8)
    assert out["image_opacity"].shape == (2, 1, 8, 8)
    assert out["planes"].shape == (2, 3, 4, 16, 16)
    assert out["ws"].shape == (2, G.num_ws, 16) and G.num_ws == 6
    assert torch.equal(out["image_raw"], out["feature_image"][:, :3])
    # depth within the ray range, opacity in [0, 1]
    d = out["image_depth"]
    assert d.min() >= G.cfg.render.ray_start - 1e-4 and d.max() <= G.cfg.render.ray_end + 1e-4
    o = out["image_opacity"]
    assert o.min() >= 0 and o.max() <= 1 + 1e-5
    out = G(z, c, neural_rendering_resolution=4)
    assert out["image_raw"].shape == (2, 3, 4, 4) and out["image"].shape == (2, 3, 16, 16)


def test_mapping_synthesis_equal_forward_with_injected_uniforms(G):
    z, c = torch.randn(2, 16), G.camera([0.1, -0.2], 0.05)
    s, u = _uniforms(2, 8, G.cfg)
    with torch.no_grad():
        a = G(z, c, truncation_psi=0.7, truncation_cutoff=4, stratified_noise=s,
              importance_u=u)
        ws = G.mapping(z, c, truncation_psi=0.7, truncation_cutoff=4)
        b = G.synthesis(ws, c, stratified_noise=s, importance_u=u)
        b2 = G.synthesis(ws, c, stratified_noise=s, importance_u=u)
    for k in ("image", "image_raw", "image_depth", "feature_image", "planes"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    torch.testing.assert_close(b["image"], b2["image"], rtol=0, atol=0)   # const noise
    assert torch.equal(a["ws"], ws)
    # the uniforms matter: different draws give different renders
    s2, u2 = torch.rand_like(s), torch.rand_like(u)
    with torch.no_grad():
        c2 = G.synthesis(ws, c, stratified_noise=s2, importance_u=u2)
    assert not torch.allclose(c2["image_raw"], b["image_raw"])


def test_c_scale_and_c_gen_conditioning_zero():
    torch.manual_seed(0)
    G = EG3DGenerator(tiny_cfg(c_scale=2.0))
    z, c = torch.randn(2, 16), G.camera([0.0, 0.5], 0.0)
    with torch.no_grad():
        torch.testing.assert_close(G.mapping(z, c), G.backbone.mapping(z, 2 * c))
        G.cfg.c_gen_conditioning_zero = True
        zero = G.mapping(z, c)
        torch.testing.assert_close(zero, G.backbone.mapping(z, torch.zeros_like(c)))
        torch.testing.assert_close(G.mapping(z, c.flip(0)), zero)   # c no longer matters
        G.cfg.c_gen_conditioning_zero, G.cfg.c_scale = False, 0.0
        torch.testing.assert_close(G.mapping(z, c), zero)


def test_generator_bad_inputs(G):
    z, c = torch.randn(2, 16), G.camera([0.0, 0.1], 0.0)
    with pytest.raises(ValueError, match=r"z: expected shape \(2, 16\), got \(2, 15\)"):
        G(torch.randn(2, 15), c)
    with pytest.raises(ValueError, match=r"c: expected EG3D camera labels of shape \(B, 25\), "
                                         r"got \(2, 24\)"):
        G(z, c[:, :24])
    with pytest.raises(ValueError, match=r"ws: expected shape \(2, 6, 16\), got \(2, 7, 16\)"):
        G.synthesis(torch.randn(2, 7, 16), c)
    with pytest.raises(ValueError, match="noise_mode: expected one of"):
        G(z, c, noise_mode="fixed")
    with pytest.raises(ValueError, match="neural_rendering_resolution: expected a positive int, "
                                         "got 0"):
        G(z, c, neural_rendering_resolution=0)
    with pytest.raises(ValueError, match="img_resolution: the hybrid2x super-resolution outputs "
                                         "16"):
        EG3DGenerator(tiny_cfg(img_resolution=32))


def test_sr_float32_default_and_bf16_switch():
    from pyface.nn.stylegan import SuperResolution

    torch.manual_seed(0)
    sr = SuperResolution(variant="hybrid2x", channels=6, w_dim=16, input_resolution=8,
                         block_channels=[8, 4])
    sr16 = SuperResolution(variant="hybrid2x", channels=6, w_dim=16, input_resolution=8,
                           block_channels=[8, 4], dtype="bfloat16")
    sr16.load_state_dict(sr.state_dict())
    rgb, x, ws = torch.randn(1, 3, 8, 8), torch.randn(1, 6, 8, 8), torch.randn(1, 4, 16)
    with torch.no_grad():
        a, b = sr(rgb, x, ws), sr16(rgb, x, ws)
    assert a.dtype == b.dtype == torch.float32
    err = (a - b).abs().max().item()
    assert 0 < err < 0.1 * a.abs().max().item()
    with pytest.raises(ValueError, match="dtype: expected 'float32' or 'bfloat16'"):
        SuperResolution(variant="hybrid2x", dtype="float16")


# ------------------------------------------------------------------------------------------
# EG3D's module structure, transcribed from NVlabs/eg3d training/triplane.py,
# training/networks_stylegan2.py and training/superresolution.py (names and shapes only)
# ------------------------------------------------------------------------------------------

#: class -> (block0: (out channels, resolution, NoUp?), block1: (out, resolution),
#: top-level resample_filter buffer?)  - superresolution.py
EG3D_SR = {
    "SuperresolutionHybrid2X": ((128, 64, True), (64, 128), True),
    "SuperresolutionHybrid4X": ((128, 128, True), (64, 256), True),
    "SuperresolutionHybrid8X": ((128, 256, False), (64, 512), True),
    "SuperresolutionHybrid8XDC": ((256, 256, False), (128, 512), False),
    "SuperresolutionHybridDeepfp32": ((128, 128, True), (64, 256), True),
}
SR_VARIANT = {"SuperresolutionHybrid2X": "hybrid2x", "SuperresolutionHybrid4X": "hybrid4x",
              "SuperresolutionHybrid8X": "hybrid8x", "SuperresolutionHybrid8XDC": "hybrid8xdc",
              "SuperresolutionHybridDeepfp32": "hybriddeepfp32"}
BUFFERS = ("w_avg", "noise_const", "resample_filter")


def _synthesis_layer(S, p, cin, cout, w_dim, res, k=3):
    # networks_stylegan2.SynthesisLayer: affine = FC(w_dim -> in, bias_init 1), weight
    # [out, in, k, k], noise_const [res, res] buffer, noise_strength [], bias [out],
    # resample_filter buffer (setup_filter([1,3,3,1]) -> 4x4)
    S[f"{p}.resample_filter"] = (4, 4)
    S[f"{p}.affine.weight"] = (cin, w_dim)
    S[f"{p}.affine.bias"] = (cin,)
    S[f"{p}.weight"] = (cout, cin, k, k)
    S[f"{p}.noise_const"] = (res, res)
    S[f"{p}.noise_strength"] = ()
    S[f"{p}.bias"] = (cout,)


def _synthesis_block(S, p, cin, cout, w_dim, res, img_channels):
    # SynthesisBlock / SynthesisBlockNoUp ('skip'): resample_filter, const or conv0, conv1, torgb
    S[f"{p}.resample_filter"] = (4, 4)
    if cin == 0:
        S[f"{p}.const"] = (cout, res, res)
    else:
        _synthesis_layer(S, f"{p}.conv0", cin, cout, w_dim, res)
    _synthesis_layer(S, f"{p}.conv1", cout, cout, w_dim, res)
    S[f"{p}.torgb.affine.weight"] = (cout, w_dim)
    S[f"{p}.torgb.affine.bias"] = (cout,)
    S[f"{p}.torgb.weight"] = (img_channels, cout, 1, 1)
    S[f"{p}.torgb.bias"] = (img_channels,)


def eg3d_structure(sr_class: str | None, *, z_dim=512, c_dim=25, w_dim=512, map_layers=2,
                   channel_base=32768, channel_max=512) -> dict[str, tuple]:
    """Parameter and buffer names -> shapes of EG3D's TriPlaneGenerator (backbone 256^2 with
    32 x 3 channels, OSG decoder 32 -> 64 -> 33, the named SR module)."""
    S: dict[str, tuple] = {}
    m = "backbone.mapping"
    S[f"{m}.embed.weight"], S[f"{m}.embed.bias"] = (w_dim, c_dim), (w_dim,)
    for i in range(map_layers):
        S[f"{m}.fc{i}.weight"] = (w_dim, z_dim + w_dim if i == 0 else w_dim)
        S[f"{m}.fc{i}.bias"] = (w_dim,)
    S[f"{m}.w_avg"] = (w_dim,)
    ch = {r: min(channel_base // r, channel_max) for r in (4, 8, 16, 32, 64, 128, 256)}
    for r in ch:
        _synthesis_block(S, f"backbone.synthesis.b{r}", ch[r // 2] if r > 4 else 0, ch[r],
                         w_dim, r, 96)
    if sr_class is not None:
        (c0, r0, _), (c1, r1), buf = EG3D_SR[sr_class]
        _synthesis_block(S, "superresolution.block0", 32, c0, 512, r0, 3)
        _synthesis_block(S, "superresolution.block1", c0, c1, 512, r1, 3)
        if buf:
            S["superresolution.resample_filter"] = (4, 4)
    S["decoder.net.0.weight"], S["decoder.net.0.bias"] = (64, 32), (64,)
    S["decoder.net.2.weight"], S["decoder.net.2.bias"] = (33, 64), (33,)
    return S


def _gen_cfg(sr_class, **kw):
    if sr_class is None:
        return EG3DGeneratorConfig(sr_variant=None, **kw)
    (_, r0, noup), (_, r1), _ = EG3D_SR[sr_class]
    return EG3DGeneratorConfig(sr_variant=SR_VARIANT[sr_class], img_resolution=r1, **kw)


@pytest.mark.parametrize("sr_class", sorted(EG3D_SR) + [None])
def test_generator_matches_eg3d_structure(sr_class):
    """Full-size EG3D names and shapes (meta device: nothing allocated)."""
    with torch.device("meta"):
        G = EG3DGenerator(_gen_cfg(sr_class))
    own = {k: tuple(v.shape) for k, v in G.state_dict().items() if k != "rendering_resolution"}
    ref = eg3d_structure(sr_class)
    assert sorted(set(ref) - set(own)) == [] and sorted(set(own) - set(ref)) == []
    bad = {k: (own[k], ref[k]) for k in ref if own[k] != ref[k]}
    assert not bad
    if sr_class:
        (_, r0, noup), _, _ = EG3D_SR[sr_class]
        assert (G.superresolution.block0.conv0.up == 1) == noup
        assert G.superresolution.input_resolution == (r0 if noup else r0 // 2)


# ------------------------------------------------------------------------------------------
# converter on pickles built from the transcription
# ------------------------------------------------------------------------------------------

class _Rec(nn.Module):
    """A persistent EG3D module for the test pickle: class name + tensors + attributes."""

    def __init__(self, class_name: str, **attrs):
        super().__init__()
        self.class_name_, self.attrs = class_name, attrs


_CLASSES = {"": "training.triplane.TriPlaneGenerator",
            "backbone": "training.networks_stylegan2.Generator",
            "backbone.mapping": "training.networks_stylegan2.MappingNetwork",
            "backbone.synthesis": "training.networks_stylegan2.SynthesisNetwork",
            "decoder": "training.triplane.OSGDecoder"}


def _tree(structure: dict[str, tuple], sr_class, root_attrs) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    root = _Rec(_CLASSES[""], **root_attrs)
    for name, shape in structure.items():
        *path, leaf = name.split(".")
        node, prefix = root, []
        for part in path:
            prefix.append(part)
            key = ".".join(prefix)
            if part not in node._modules:
                if key == "decoder.net":
                    child = nn.Sequential(collections.OrderedDict(
                        [("0", _Rec("training.networks_stylegan2.FullyConnectedLayer")),
                         ("1", nn.Softplus()),
                         ("2", _Rec("training.networks_stylegan2.FullyConnectedLayer"))]))
                elif key == "superresolution":
                    child = _Rec(f"training.superresolution.{sr_class}")
                elif key in _CLASSES:
                    child = _Rec(_CLASSES[key])
                else:
                    child = _Rec("training.networks_stylegan2." + (
                        "SynthesisBlock" if part.startswith(("b", "block")) else
                        "ToRGBLayer" if part == "torgb" else "FullyConnectedLayer"
                        if part in ("affine", "embed") or part.startswith("fc") else
                        "SynthesisLayer"))
                node.add_module(part, child)
            node = node._modules[part]
        t = torch.randn(shape, generator=g) * 0.1
        if leaf in BUFFERS:
            node.register_buffer(leaf, t)
        else:
            node.register_parameter(leaf, nn.Parameter(t))
    return root


def _write_pickle(path, pers, EasyDict, structure, sr_class, rendering_kwargs, nrr=64,
                  img_resolution=512, extra_src="", attr_rendering_kwargs=None):
    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, _Rec):
                state = {"_parameters": collections.OrderedDict(obj._parameters),
                         "_buffers": collections.OrderedDict(obj._buffers),
                         "_non_persistent_buffers_set": set(),
                         "_modules": collections.OrderedDict(obj._modules),
                         "training": False, **obj.attrs}
                meta = dict(type="class", version=4, module_src=extra_src,
                            class_name=obj.class_name_, state=state)
                return pers._reconstruct_persistent_obj, (meta,)
            return NotImplemented

    init = EasyDict(z_dim=512, c_dim=25, w_dim=512, img_resolution=img_resolution,
                    img_channels=3, sr_num_fp16_res=4, rendering_kwargs=EasyDict(rendering_kwargs),
                    mapping_kwargs=EasyDict(num_layers=2), sr_kwargs=EasyDict(channel_base=32768))
    # EG3D's persistence pickles the instance __dict__: constructor kwargs under
    # "_init_kwargs", next to the rendering_kwargs attribute EG3D renders with
    attr_rk = EasyDict(rendering_kwargs if attr_rendering_kwargs is None else
                       attr_rendering_kwargs)
    G = _tree(structure, sr_class, {"_init_args": (), "_init_kwargs": init,
                                    "neural_rendering_resolution": nrr,
                                    "rendering_kwargs": attr_rk})
    with open(path, "wb") as f:
        Pickler(f, protocol=4).dump({"G": G, "G_ema": G, "D": None, "augment_pipe": None,
                                     "training_set_kwargs": EasyDict(resolution=img_resolution)})
    return G


SHAPENET_RK = dict(image_resolution=128, disparity_space_sampling=False, clamp_mode="softplus",
                   superresolution_module="training.superresolution.SuperresolutionHybrid2X",
                   c_gen_conditioning_zero=True, gpc_reg_prob=None, c_scale=1.0,
                   superresolution_noise_mode="none", density_reg=0.25, density_reg_p_dist=0.004,
                   reg_type="l1", decoder_lr_mul=1.0, sr_antialias=True, depth_resolution=64,
                   depth_resolution_importance=64, ray_start=0.1, ray_end=2.6, box_warp=1.6,
                   white_back=True, avg_camera_radius=1.7, avg_camera_pivot=[0, 0, 0])
FFHQ_RK = dict(SHAPENET_RK, image_resolution=512, c_gen_conditioning_zero=False,
               gpc_reg_prob=0.5, superresolution_module="training.superresolution."
               "SuperresolutionHybrid8XDC", depth_resolution=48, depth_resolution_importance=48,
               ray_start=2.25, ray_end=3.3, box_warp=1, white_back=False, avg_camera_radius=2.7,
               avg_camera_pivot=[0, 0, 0.2])
SMALL = dict(channel_base=256, channel_max=4)   # small backbone widths (EG3D's are 32768 / 512)


def test_convert_shapenet_hybrid2x_carries_rendering_kwargs(tmp_path, eg3d_modules):
    from pyface.convert import convert_eg3d

    pers, EasyDict = eg3d_modules
    marker = tmp_path / "pwned"
    structure = eg3d_structure("SuperresolutionHybrid2X", **SMALL)
    _write_pickle(tmp_path / "net.pkl", pers, EasyDict, structure, "SuperresolutionHybrid2X",
                  SHAPENET_RK, nrr=64, img_resolution=128,
                  extra_src=f"open({str(marker)!r}, 'w').write('x')\n")
    out = convert_eg3d(str(tmp_path / "net.pkl"), str(tmp_path / "o"))
    assert not marker.exists()
    meta = ckpt.read_meta(out)
    g = meta["config"]["generator"]
    assert g["sr_variant"] == "hybrid2x" and g["img_resolution"] == 128
    assert (g["render"]["ray_start"], g["render"]["ray_end"], g["render"]["box_warp"]) == \
        (0.1, 2.6, 1.6)
    assert (g["render"]["depth_resolution"], g["render"]["depth_resolution_importance"]) == \
        (64, 64)
    assert g["render"]["white_back"] is True and g["render"]["plane_axes"] == "eg3d"
    assert g["avg_camera_radius"] == 1.7 and g["avg_camera_pivot"] == [0, 0, 0]
    assert g["c_gen_conditioning_zero"] is True and g["c_scale"] == 1.0
    assert g["sr_noise_mode"] == "none" and g["sr_antialias"] is True
    assert g["neural_rendering_resolution"] == 64
    assert meta["config"]["rendering_kwargs"]["gpc_reg_prob"] is None
    # every tensor arrives under its EG3D name with its value
    tensors, _ = ckpt.load_weights(out)
    assert sorted(tensors) == sorted(structure)
    G = EG3DGenerator.from_converted(out)
    assert G.superresolution.input_resolution == 64
    sd = G.state_dict()
    src = _tree(structure, "SuperresolutionHybrid2X", {})     # same seed: same values
    for k, v in dict(src.named_parameters()).items():
        assert torch.equal(sd[k], v.detach()), k
    assert int(G.rendering_resolution) == 64
    with torch.no_grad():
        out_img = G(torch.randn(1, 512), G.camera(0.0, 0.0), neural_rendering_resolution=8)
    assert out_img["image"].shape == (1, 3, 128, 128) and torch.isfinite(out_img["image"]).all()


@pytest.mark.parametrize("sr_class, named", [("SuperresolutionHybrid4X", True),
                                             ("SuperresolutionHybrid4X", False),
                                             ("SuperresolutionHybrid8XDC", True)])
def test_convert_other_sr_modules(tmp_path, eg3d_modules, sr_class, named):
    from pyface.convert import convert_eg3d

    pers, EasyDict = eg3d_modules
    rk = dict(FFHQ_RK, superresolution_module=f"training.superresolution.{sr_class}")
    if not named:   # neither the record nor rendering_kwargs name it: inferred from shapes
        rk.pop("superresolution_module")
    res = EG3D_SR[sr_class][1][1]
    _write_pickle(tmp_path / "net.pkl", pers, EasyDict, eg3d_structure(sr_class, **SMALL),
                  sr_class if named else "SuperresolutionModule", rk, nrr=128,
                  img_resolution=res)
    out = convert_eg3d(str(tmp_path / "net.pkl"), str(tmp_path / "o"))
    g = ckpt.read_meta(out)["config"]["generator"]
    assert g["sr_variant"] == SR_VARIANT[sr_class] and g["img_resolution"] == res
    assert g["neural_rendering_resolution"] == 128 and g["avg_camera_pivot"] == [0, 0, 0.2]
    assert g["c_gen_conditioning_zero"] is False
    assert g["sr_image_raw_alias"] is False
    G = EG3DGenerator.from_converted(out)
    assert G.superresolution.output_resolution == res


def test_convert_reads_eg3d_instance_state(tmp_path, eg3d_modules):
    """EG3D renders with the ``rendering_kwargs`` attribute (scripts may edit it after
    construction); without it the constructor's ``_init_kwargs['rendering_kwargs']`` is used."""
    from pyface.convert import convert_eg3d

    pers, EasyDict = eg3d_modules
    s = eg3d_structure("SuperresolutionHybrid2X", **SMALL)
    _write_pickle(tmp_path / "a.pkl", pers, EasyDict, s, "SuperresolutionHybrid2X",
                  SHAPENET_RK, img_resolution=128,
                  attr_rendering_kwargs=dict(SHAPENET_RK, depth_resolution=20, box_warp=1.5))
    g = ckpt.read_meta(convert_eg3d(str(tmp_path / "a.pkl"), str(tmp_path / "a")))
    g = g["config"]["generator"]["render"]
    assert (g["depth_resolution"], g["box_warp"]) == (20, 1.5)
    _write_pickle(tmp_path / "b.pkl", pers, EasyDict, s, "SuperresolutionHybrid2X",
                  SHAPENET_RK, img_resolution=128, attr_rendering_kwargs={})
    g = ckpt.read_meta(convert_eg3d(str(tmp_path / "b.pkl"), str(tmp_path / "b")))
    g = g["config"]["generator"]["render"]
    assert (g["depth_resolution"], g["box_warp"], g["white_back"]) == (64, 1.6, True)


def test_sr_image_raw_alias_is_eg3d_in_place_add():
    """EG3D's NoUp first SR block adds its RGB into the rendered RGB in place (when the input is
    not resized); ``sr_image_raw_alias`` returns that, the default returns the rendering."""
    cfg = tiny_cfg(sr_variant="hybrid2x", sr_input_resolution=8,
                   sr_block_channels=[8, 8], img_resolution=16)
    G = EG3DGenerator(cfg).eval()
    z, c = torch.randn(1, cfg.z_dim), G.camera(0.1, 0.0)
    n8, u8 = _uniforms(1, 8, cfg)
    n4, u4 = _uniforms(1, 4, cfg)
    with torch.no_grad():
        a = G(z, c, neural_rendering_resolution=8, stratified_noise=n8, importance_u=u8)
        G.cfg.sr_image_raw_alias = True
        b = G(z, c, neural_rendering_resolution=8, stratified_noise=n8, importance_u=u8)
        _, alias = G.superresolution(a["image_raw"], a["feature_image"], a["ws"],
                                     return_alias=True)
        G.cfg.sr_image_raw_alias = True
        d = G(z, c, neural_rendering_resolution=4, stratified_noise=n4, importance_u=u4)
    torch.testing.assert_close(b["image"], a["image"], rtol=0, atol=0)
    torch.testing.assert_close(b["image_raw"], alias, rtol=0, atol=0)
    assert (b["image_raw"] - a["image_raw"]).abs().max() > 1e-3
    torch.testing.assert_close(b["feature_image"][:, 3:], a["feature_image"][:, 3:])
    G.cfg.sr_image_raw_alias = False
    with torch.no_grad():
        e = G(z, c, neural_rendering_resolution=4, stratified_noise=n4,
              importance_u=u4)      # input resized: EG3D leaves it untouched
    torch.testing.assert_close(d["image_raw"], e["image_raw"], rtol=0, atol=0)


def test_convert_refuses_unsupported_options(tmp_path, eg3d_modules):
    from pyface.convert import convert_eg3d

    pers, EasyDict = eg3d_modules
    s = eg3d_structure("SuperresolutionHybrid2X", **SMALL)
    _write_pickle(tmp_path / "a.pkl", pers, EasyDict, s, "SuperresolutionHybrid2X",
                  dict(SHAPENET_RK, ray_start="auto"), img_resolution=128)
    with pytest.raises(ckpt.CheckpointError, match=r"rendering_kwargs\['ray_start'\] = 'auto'"):
        convert_eg3d(str(tmp_path / "a.pkl"), str(tmp_path / "o"))
    s.pop("superresolution.resample_filter")
    _write_pickle(tmp_path / "b.pkl", pers, EasyDict, s, "SuperresolutionHybrid2X",
                  SHAPENET_RK, img_resolution=128)
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys: resample_filter"):
        convert_eg3d(str(tmp_path / "b.pkl"), str(tmp_path / "o2"))


# ------------------------------------------------------------------------------------------
# training on the engine
# ------------------------------------------------------------------------------------------

class _Frames(torch.utils.data.Dataset):
    """Tiny stand-in for the synthetic frames: an ellipse head over a gradient, exact cameras."""

    def __init__(self, n=8, R=16):
        self.n, self.R = n, R

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from pyface.face import cameras as cams

        R = self.R
        yaw = (i / self.n - 0.5) * 0.6
        lab = cams.make_label(cams.orbit_camera(yaw, 0.0), cams.intrinsics_from_focal())
        lin = (torch.arange(R) + 0.5) / R * 2 - 1
        y, x = torch.meshgrid(lin, lin, indexing="ij")
        mask = (((x - yaw) / 0.5) ** 2 + (y / 0.7) ** 2 < 1).float()[None]
        img = torch.stack([x, y, x * y]) * 0.5 * (1 - mask) + mask * 0.3
        return {"image": img, "mask": mask, "camera": lab, "index": torch.tensor(i)}


def _experiment(run_dir, steps, **train):
    from pyface.models.eg3d.model import EG3D
    from pyface.train.config import build_experiment, merge

    small = {"model": {"generator": {"z_dim": 16, "w_dim": 16, "backbone_resolution": 16,
                                     "plane_channels": 4, "channel_base": 64, "channel_max": 8,
                                     "decoder_hidden": 8, "decoder_features": 6,
                                     "img_resolution": 16, "neural_rendering_resolution": 8,
                                     "sr_input_resolution": 8, "sr_block_channels": [8, 4],
                                     "render": {"depth_resolution": 6,
                                                "depth_resolution_importance": 4}},
                       "discriminator": {"channel_base": 64, "channel_max": 8,
                                         "mapping_layers": 1},
                       "neural_rendering_resolution_initial": 8, "d_reg_interval": 2,
                       "g_reg_interval": 2, "measure_every": 1},
             "data": {"resolution": 16},
             "train": {"steps": steps, "batch_size": 4, "run_dir": str(run_dir),
                       "progress": False, "tensorboard": False, "image_every": 0,
                       "ckpt_every": 2, "log_every": 1, **train}}
    return build_experiment("eg3d", EG3D.Config, defaults=merge(EG3D.recipe, small))


def test_engine_steps_every_phase_and_logs_measures(tmp_path, caplog):
    import logging

    from pyface.train.engine import Trainer

    cfg = _experiment(tmp_path / "run", 2)
    tr = Trainer(cfg, dataset=_Frames())
    names = [p.name for p in tr.phases]
    assert names == ["Gmain", "Greg", "Dmain", "Dreg"]
    assert [p.interval for p in tr.phases] == [1, 2, 1, 2]
    # lazy-regularisation compensation (EG3D): lr * k/(k+1), betas ** (k/(k+1))
    g = tr.optimizers["G"].param_groups[0]
    assert g["lr"] == pytest.approx(0.0025 * 2 / 3) and g["betas"][1] == pytest.approx(
        0.99 ** (2 / 3))
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    batch = tr._to_device(next(iter(tr._loader())))
    with caplog.at_level(logging.INFO, logger="pyface"):
        losses = tr.train_step(batch)
    for k in ("Gmain/loss", "Greg/density_tv", "Dmain/logit_gap", "Dreg/r1_penalty",
              "Gmain/iou", "Gmain/iou_all", "Gmain/fg_opacity", "Gmain/bg_opacity",
              "Gmain/depth_err", "Gmain/depth_err_flat", "Gmain/depth_overlap"):
        assert k in losses and torch.isfinite(losses[k]), k
    assert "eg3d measures step 0" in caplog.text and "iou=" in caplog.text
    assert "depth_err=" in caplog.text
    after = tr.model.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"G", "D"}
    # G's w_avg moved (update_emas in Dmain), the EMA generator exists
    assert not torch.equal(after["G.backbone.mapping.w_avg"],
                           before["G.backbone.mapping.w_avg"])
    assert "G" in tr.ema.modules


def _sphere_depth(c, r, radius=0.4):
    """Exact ray-sphere depths (B, 1, r, r) and opacities of a sphere at the origin."""
    from pyface.ops.render import ray_bundle

    o, d = ray_bundle(c, r)
    b = (o * d).sum(-1)
    disc = b.square() - (o.square().sum(-1) - radius ** 2)
    hit = disc > 0
    t = torch.where(hit, -b - disc.clamp(min=0).sqrt(), torch.zeros_like(b))
    B = c.shape[0]
    return t.reshape(B, 1, r, r), hit.float().reshape(B, 1, r, r)


def test_depth_consistency_is_small_for_a_solid_and_large_for_flat_depth():
    from pyface.face import cameras as cams
    from pyface.models.eg3d.model import depth_consistency, orbit_label

    K = cams.intrinsics_from_focal(cams.FFHQ_FOCAL).expand(2, 3, 3)
    c = cams.make_label(cams.orbit_camera(torch.tensor([0.0, -0.2]), torch.tensor([0.0, 0.1]),
                                          radius=2.7, pivot=(0.0, 0.0, 0.0)), K)
    c_b = orbit_label(c, 0.35)
    # the orbit keeps the distance to the origin and turns the camera by the yaw
    pa, pb = c[:, :16].reshape(-1, 4, 4)[:, :3, 3], c_b[:, :16].reshape(-1, 4, 4)[:, :3, 3]
    torch.testing.assert_close(pb.norm(dim=-1), pa.norm(dim=-1))
    cos = (pa * pb).sum(-1) / pa.norm(dim=-1) / pb.norm(dim=-1)
    torch.testing.assert_close(cos[:1], torch.tensor([math.cos(0.35)]))
    da, oa = _sphere_depth(c, 32)
    db, ob = _sphere_depth(c_b, 32)
    err, overlap = depth_consistency(da, oa, c, db, ob, c_b)
    flat = torch.full_like(da, 2.775)
    err_flat, _ = depth_consistency(flat, torch.ones_like(da), c, flat, torch.ones_like(da), c_b)
    assert err < 0.01 and overlap > 0.8 and err_flat > 5 * err
    # a sphere seen from B but placed differently in A is inconsistent
    err_bad, _ = depth_consistency(da + 0.2, oa, c, db, ob, c_b)
    assert err_bad > 5 * err


def test_presets_are_complete_and_full_is_eg3d_ffhq():
    from pyface.models.eg3d.model import EG3D
    from pyface.train.config import build_experiment

    assert set(EG3D.presets) == {"tiny", "gpu-short", "full"}
    for name in EG3D.presets:      # as `pyface train eg3d --preset NAME`: over the recipe
        exp = build_experiment("eg3d", EG3D.Config, defaults=EG3D.recipe, preset=name,
                               presets=EG3D.presets)
        assert exp.model_config.generator.img_resolution == exp.data.resolution, name
        with torch.device("meta"):
            m = EG3D(exp.model_config)
        assert m.G.superresolution.output_resolution == exp.data.resolution, name
        if name != "tiny":       # nothing of tiny's sizes leaks into the other presets
            g = exp.model_config.generator
            assert (g.decoder_hidden, g.decoder_features, g.sr_input_resolution,
                    g.sr_block_channels) == (64, 32, None, None), name
            assert exp.model_config.discriminator.mapping_layers == 8, name
    full = build_experiment("eg3d", EG3D.Config, defaults=EG3D.recipe, preset="full",
                            presets=EG3D.presets)
    m, t = full.model_config, full.train
    g = m.generator
    assert (g.z_dim, g.w_dim, g.backbone_resolution, g.plane_channels, g.sr_variant) == \
        (512, 512, 256, 32, "hybrid8xdc")
    assert (g.img_resolution, g.neural_rendering_resolution, g.channel_base, g.channel_max) == \
        (512, 64, 32768, 512)
    assert (g.render.depth_resolution, g.render.depth_resolution_importance,
            g.render.white_back) == (48, 48, False)
    assert m.background == "data" and full.data.resolution == 512
    assert (m.r1_gamma, m.d_reg_interval, m.g_reg_interval, m.density_reg, m.reg_type) == \
        (1.0, 16, 4, 0.25, "l1")
    assert (m.g_lr, m.d_lr, m.betas, m.gpc_reg_prob, m.blur_init_sigma) == \
        (0.0025, 0.002, [0.0, 0.99], 0.5, 10.0)
    assert t.batch_size == 32 and t.steps * 32 == 27_000_000      # 25000 + 2000 kimg
    assert t.ema.half_life_kimg == 10 and t.ema.rampup == 0.05 and t.ema.modules == ["G"]
    assert full.data.name == "eg3d" and m.mirror


def test_schedules_follow_eg3d():
    from pyface.models.eg3d.model import EG3D, eg3d_blur

    m = EG3D.__new__(EG3D)
    m.cfg = EG3D.Config(gpc_reg_prob=0.5, gpc_reg_fade_kimg=1000, blur_init_sigma=10,
                        blur_fade_kimg=None, neural_rendering_resolution_initial=64,
                        neural_rendering_resolution_final=128,
                        neural_rendering_resolution_fade_kimg=1000)
    assert m.swapping_prob(0) == 1.0 and m.swapping_prob(500_000) == 0.75
    assert m.swapping_prob(10**7) == 0.5
    assert m.blur_sigma(0, 32) == 10 and m.blur_sigma(100_000, 32) == 5.0     # 200 kimg fade
    assert m.blur_sigma(10**6, 32) == 0
    assert m.rendering_resolution(0) == 64 and m.rendering_resolution(500_000) == 96
    assert m.rendering_resolution(2 * 10**6) == 128
    m.cfg.neural_rendering_resolution_fade_start_kimg = 25000
    assert m.rendering_resolution(25 * 10**6) == 64
    assert m.rendering_resolution(25_500_000) == 96 and m.rendering_resolution(10**9) == 128
    x = torch.zeros(1, 1, 9, 9)
    x[..., 4, 4] = 1
    y = eg3d_blur(x, 1.0)            # kernel 2^-(t/s)^2, t in [-3, 3], normalised
    k = torch.exp2(-torch.arange(-3.0, 4.0).square())
    k = k / k.sum()
    torch.testing.assert_close(y[0, 0, 4, 1:8], k * k[3])
    assert eg3d_blur(x, 0.3) is x


def _assert_same_weights(a, c) -> None:
    """Trainers ``a`` and ``c`` (a resumed run) hold bit-identical weights and EMA generators."""
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    for k, v in a.ema.modules["G"].state_dict().items():
        assert torch.equal(v, c.ema.modules["G"].state_dict()[k]), k


def test_exact_resume(tmp_path):
    from pyface.train.engine import Trainer

    a = Trainer(_experiment(tmp_path / "a", 4), dataset=_Frames())
    a.fit()
    b = Trainer(_experiment(tmp_path / "b", 2), dataset=_Frames())
    b.fit()
    c = Trainer(_experiment(tmp_path / "b", 4), dataset=_Frames())
    c.resume("auto")
    assert c.step == 2
    c.fit()
    _assert_same_weights(a, c)


def test_training_bad_input(tmp_path):
    from pyface.models.eg3d.model import EG3D
    from pyface.train.model import StepContext

    cfg = _experiment(tmp_path / "r", 1).model_config
    m = EG3D(cfg)
    ctx = StepContext(step=0, images_seen=0, batch_size=2)
    b = _Frames(2, 16)
    batch = torch.utils.data.default_collate([b[0], b[1]])
    with pytest.raises(KeyError, match=r"batch\['camera'\] missing"):
        m.step("Gmain", {"image": batch["image"]}, ctx)
    with pytest.raises(ValueError, match=r"batch\['image'\]: expected \(B, 3, 16, 16\)"):
        m.step("Gmain", {**batch, "image": batch["image"][..., :8, :8]},
               StepContext(step=1, images_seen=0, batch_size=2))
    with pytest.raises(KeyError, match=r"batch\['mask'\] missing: model.background='white'"):
        m.step("Gmain", {k: v for k, v in batch.items() if k != "mask"},
               StepContext(step=2, images_seen=0, batch_size=2))
    with pytest.raises(ValueError, match="model.reg_type: expected one of"):
        EG3D(EG3D.Config(reg_type="tv", generator=cfg.generator))


def test_eg3d_dataset_folder_and_zip(tmp_path):
    import json
    import zipfile

    from PIL import Image

    from pyface.models.eg3d.data import EG3DImages
    from pyface.train.config import DataConfig

    d = tmp_path / "ds"
    d.mkdir()
    labels = []
    for i in range(2):
        Image.fromarray((torch.rand(8, 8, 3) * 255).byte().numpy()).save(d / f"img{i}.png")
        labels.append([f"img{i}.png", [float(i)] * 25])
    (d / "dataset.json").write_text(json.dumps({"labels": labels}))
    with zipfile.ZipFile(tmp_path / "ds.zip", "w") as z:
        for f in d.iterdir():
            z.write(f, f.name)
    for path in (d, tmp_path / "ds.zip"):
        ds = EG3DImages.from_config(DataConfig(name="eg3d", path=str(path), resolution=4))
        item = ds[1]
        assert item["image"].shape == (3, 4, 4) and item["camera"].tolist() == [1.0] * 25
        assert item["image"].dtype == torch.float32
        assert -1 <= item["image"].min() and item["image"].max() <= 1
    with pytest.raises(ValueError, match="data.path: the eg3d dataset needs a folder"):
        EG3DImages.from_config(DataConfig(name="eg3d", resolution=4))


# ------------------------------------------------------------------------------------------
# inference: loading runs, orbit videos, inversion, pipeline, CLI
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from pyface.train.engine import Trainer

    run = tmp_path_factory.mktemp("eg3d") / "run"
    tr = Trainer(_experiment(run, 1), dataset=_Frames())
    tr.train_step(tr._to_device(next(iter(tr._loader()))))
    with torch.no_grad():   # (the EMA ramp-up copies G at step 0) make the EMA copy distinct
        for p in tr.ema.modules["G"].parameters():
            p.add_(0.01)
    tr.save_checkpoint()
    return str(run), tr


def test_load_generator_prefers_ema(tiny_run):
    from pyface.models.eg3d.pipeline import load_generator

    run, tr = tiny_run
    G = load_generator(run)
    ema = tr.ema.modules["G"].state_dict()
    live = tr.model.G.state_dict()
    for k, v in G.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert any(not torch.equal(ema[k], live[k]) for k in ema)
    Glive = load_generator(run, ema=False)
    assert all(torch.equal(v, live[k]) for k, v in Glive.state_dict().items())
    with pytest.raises(ckpt.CheckpointError, match="run folder without checkpoints"):
        os.makedirs(os.path.join(run + "_empty", "checkpoints"))
        load_generator(run + "_empty")


def test_orbit_inversion_pipeline(tiny_run):
    from pyface.models.eg3d.pipeline import (EG3DPipeline, load_generator, orbit_video,
                                             parse_seeds, project)

    run, _ = tiny_run
    G = load_generator(run)
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    frames = orbit_video(G, [0, 1], 3, progress=False)
    assert frames.shape == (3, 3, 16, 32) and frames.abs().max() <= 1
    assert not torch.equal(frames[0], frames[1])          # the camera moves
    target = _Frames(2, 16)[1]
    ws, info = project(G, target["image"], target["camera"], space="w+", steps=8, lr=0.05,
                       progress=False, w_avg_samples=16)
    assert ws.shape == (1, G.num_ws, 16) and info["loss"][-1] < info["loss"][0]
    with pytest.raises(ValueError, match=r"camera: expected an EG3D label \(25,\)"):
        project(G, target["image"], target["camera"][:24], steps=1, progress=False)
    from pyface.models.eg3d import load_pipeline

    assert isinstance(load_pipeline(run), EG3DPipeline)
    with pytest.raises(ValueError, match="device: got 'cuda:"):
        load_pipeline(run, device=f"cuda:{torch.cuda.device_count()}")
    pipe = EG3DPipeline.from_checkpoint(run, invert_steps=2)
    assert pipe.resolution == 16
    cams = torch.stack([_Frames(4, 16)[i]["camera"] for i in range(3)])
    out = pipe.animate({"image": target["image"], "camera": target["camera"]},
                       {"camera": cams})
    assert out.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"driving\['camera'\]: expected shape \(T, 25\), got "
                                         r"\(3, 5\)"):
        pipe.encode_driving({"camera": cams[:, :5]})
    with pytest.raises(TypeError, match="space"):     # an encode_source option, not a control
        pipe.generate({"ws": torch.zeros(1, G.num_ws, 16)}, {"camera": cams}, space="w")
    # streaming a camera-only driving dict (no images) in chunks
    torch.manual_seed(0)
    whole = pipe.generate({"ws": torch.zeros(1, G.num_ws, 16)}, {"camera": cams})
    torch.manual_seed(0)
    parts = list(pipe.stream({"ws": torch.zeros(1, G.num_ws, 16)}, {"camera": cams}, chunk=2))
    assert [t for t, _ in parts] == [0, 2]
    torch.testing.assert_close(torch.cat([f for _, f in parts]), whole)


def _converted_release(G, folder) -> str:
    """``G`` written as ``pyface convert eg3d`` writes a release (kind ``eg3d``)."""
    from pyface.train.config import to_dict

    state = {k: v for k, v in G.state_dict().items() if k != "rendering_resolution"}
    return ckpt.save_weights(str(folder), state, kind="eg3d",
                             config={"generator": to_dict(G.cfg)})


def test_load_options_reach_runs_and_converted_releases(tiny_run, tmp_path):
    """``pyface.models.load("eg3d", ..., options=...)`` sets the declared generator fields
    (dotted keys, with or without ``model.``) on the generator EG3D's own load_pipeline builds,
    for a training run and a converted release alike: the renderer uses the new sample counts,
    the SR the noise mode, the weights and every other field stay, and the frames change."""
    import pyface.models
    from pyface.models.eg3d.pipeline import load_generator

    run, _ = tiny_run
    conv = _converted_release(load_generator(run), tmp_path / "release")
    opts = {"generator.render.depth_resolution": 7,
            "model.generator.render.depth_resolution_importance": "5",
            "generator.sr_noise_mode": "const", "generator.render.chunk_points": 4096}
    cams = torch.stack([_Frames(2, 16)[i]["camera"] for i in range(2)])
    w = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(3))
    for path in (run, conv):
        default = pyface.models.load("eg3d", path, device="cpu")
        pipe = pyface.models.load("eg3d", path, device="cpu", options=opts)
        rc, saved = pipe.G.renderer.config, default.G.renderer.config
        assert (saved.depth_resolution, saved.depth_resolution_importance) == (6, 4)
        assert (rc.depth_resolution, rc.depth_resolution_importance) == (7, 5)
        assert rc.chunk_points == 4096 and pipe.G.cfg.render is rc
        assert pipe.G.superresolution.cfg.noise_mode == "const"
        assert default.G.superresolution.cfg.noise_mode == "none"
        for k in ("ray_start", "ray_end", "box_warp", "plane_axes", "density_bias",
                  "white_back"):
            assert getattr(rc, k) == getattr(saved, k), k
        ref = default.G.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in pipe.G.state_dict().items())
        state = {"ws": w.expand(1, pipe.G.num_ws, 16)}
        frames = [p.generate(state, p.seed_frames({"camera": cams}, 0, 0))
                  for p in (default, default, pipe)]
        assert torch.equal(frames[0], frames[1])
        assert not torch.allclose(frames[0], frames[2])  # the option is used, not ignored
    G = load_generator(run, options={"generator.render.depth_resolution": 8})
    assert G.renderer.config.depth_resolution == 8


def test_load_options_refuse_architecture_keys_and_bad_values(tiny_run):
    """A field the weights depend on is refused naming it and listing the valid keys; a bad
    value names model.generator.KEY; nothing is read before."""
    import pyface.models
    from pyface.models.eg3d.pipeline import generator_options

    run, _ = tiny_run
    valid = ("model.generator.render.depth_resolution, "
             "model.generator.render.depth_resolution_importance, "
             "model.generator.render.backend, model.generator.render.recompute, "
             "model.generator.render.chunk_points, model.generator.sr_noise_mode")
    for key in ("generator.render.ray_start", "generator.render.plane_axes",
                "generator.plane_channels", "model.generator.render", "render.depth_resolution"):
        with pytest.raises(ValueError, match=rf"options: '{key}' is not an inference option of "
                                             rf"model 'eg3d' .*; valid: {valid}$"):
            pyface.models.load("eg3d", run, options={key: 1})
    for opts, msg in [({"generator.render.depth_resolution": "many"},
                       r"model.generator.render.depth_resolution: expected int, got 'many'"),
                      ({"generator.render.depth_resolution": 1},
                       r"model.generator.render.depth_resolution: expected an int >= 2, got 1"),
                      ({"generator.render.depth_resolution_importance": -1},
                       r"model.generator.render.depth_resolution_importance: expected an int "
                       r">= 0"),
                      ({"generator.sr_noise_mode": "fresh"},
                       r"model.generator.sr_noise_mode: expected one of \('random', 'const', "
                       r"'none'\), got 'fresh'"),
                      ({"generator.render.recompute": "all"},
                       r"model.generator.render.recompute: expected true, false or 'decoder'"),
                      ({"generator.render.recompute": None},
                       r"model.generator.render.recompute: expected true, false or 'decoder', "
                       r"got None$"),
                      ({"generator.render.recompute": 2},
                       r"model.generator.render.recompute: expected true, false or 'decoder', "
                       r"got 2$"),
                      ({"generator.render.chunk_points": 0},
                       r"model.generator.render.chunk_points: expected an int >= 1")]:
        with pytest.raises(ValueError, match=msg):
            pyface.models.load("eg3d", run + "_missing", options=opts)
    # with the saved config: 3 coarse samples need no importance samples (this run has 4)
    with pytest.raises(ValueError, match=r"model.generator.render.depth_resolution: expected "
                                         r">= 4 with importance samples "
                                         r"\(depth_resolution_importance 4\), got 3"):
        pyface.models.load("eg3d", run, options={"generator.render.depth_resolution": 3})
    pipe = pyface.models.load("eg3d", run, options={
        "generator.render.depth_resolution": 3, "generator.render.depth_resolution_importance": 0})
    assert (pipe.G.renderer.config.depth_resolution,
            pipe.G.renderer.config.depth_resolution_importance) == (3, 0)
    with pytest.raises(ValueError, match=r"options: 'render.x': EG3D's inference options are "
                                         r"fields of model.generator"):
        generator_options({"render.x": 1})


def test_load_option_backend_is_checked_before_anything_is_read(tmp_path):
    """``generator.render.backend`` takes None or a render_triplane backend: another value is
    refused by check_options (and load, before the checkpoint is read) naming
    model.generator.render.backend, not at the first rendered frame."""
    import pyface.models

    assert pyface.models.check_options("eg3d", {"generator.render.backend": "reference"}) == \
        {"generator.render.backend": "reference"}
    assert pyface.models.check_options("eg3d", {"generator.render.backend": "none"}) == \
        {"generator.render.backend": None}
    msg = (r"model.generator.render.backend: expected one of \['reference', 'cpu', 'cuda', "
           r"'triton'\] or None \(the default for the device\), got 'fast'")
    with pytest.raises(ValueError, match=msg):
        pyface.models.check_options("eg3d", {"generator.render.backend": "fast"})
    with pytest.raises(ValueError, match=msg):
        pyface.models.load("eg3d", str(tmp_path / "missing"),
                           options={"model.generator.render.backend": "fast"})


def test_seeded_frames_do_not_depend_on_the_chunking(tiny_run, tmp_path, monkeypatch):
    """With a seed, frame i's ray samples come from a generator of (seed, i): stream in chunks of
    1 and of 3, animate and `pyface animate --batch 1 / 3` give the same pixels; another seed
    other pixels; unseeded generate still draws from torch's generator."""
    from pyface.cli import main
    from pyface.models.eg3d.pipeline import EG3DPipeline
    from pyface.train import animate_cli
    from pyface.train.monitor import save_png

    run, _ = tiny_run
    pipe = EG3DPipeline.from_checkpoint(run, invert_steps=1)
    state = {"ws": torch.randn(1, pipe.G.num_ws, 16, generator=torch.Generator().manual_seed(2))}
    cams = torch.stack([_Frames(5, 16)[i]["camera"] for i in range(5)])
    drv = {"camera": cams}

    def frames(chunk, seed=4):
        return torch.cat([f for _, f in pipe.stream(state, drv, chunk=chunk, seed=seed)])

    one, three = frames(1), frames(3)
    assert torch.equal(one, three)
    assert not torch.equal(one, frames(1, seed=5))
    # the CLI: a camera-labelled video folder drives, --batch 1 and --batch 3 write the same
    # frames (recorded before the lossy video encoding)
    from test_cli_animate import _orbit_video

    video = _orbit_video(tmp_path, "v")
    save_png(_Frames(2, 16)[0]["image"], str(tmp_path / "src.png"))
    written = []
    columns = animate_cli.side_by_side
    monkeypatch.setattr(animate_cli, "side_by_side",
                        lambda *cols: (written.append(cols[-1].clone()), columns(*cols))[1])
    monkeypatch.setattr(EG3DPipeline, "encode_source", lambda self, source: state)
    assert torch.equal(pipe.animate({}, drv, seed=4), one)
    runs = []
    for batch in ("1", "3"):
        written.clear()
        assert main(["animate", "eg3d", "--checkpoint", run, "--source", video, "--driving",
                     video, "--batch", batch, "--device", "cpu", "--no-progress",
                     "--out", str(tmp_path / f"b{batch}.mp4")]) == 0
        runs.append(torch.cat(written))
    assert runs[0].shape[0] >= 4 and torch.equal(runs[0], runs[1])


def test_eval_predictions_do_not_depend_on_the_batch_size(tiny_run, tmp_path, monkeypatch):
    """`pyface eval` seeds EG3D's frames as stream / animate do (Pipeline.seed_frames): the pair
    at position k of a source's group is frame k of an animation seeded with seed + the group's
    first pair index, so chunks of 1 and of 3 predict the same pixels; another seed others."""
    import numpy as np
    from _eval_data import eval_set

    from pyface.eval.evaluate import evaluate
    from pyface.models.eg3d.pipeline import EG3DPipeline

    run, _ = tiny_run
    pipe = EG3DPipeline.from_checkpoint(run, invert_steps=1)
    root = eval_set(str(tmp_path / "ds"), 4, identities=1, videos_per_identity=1, frames=4,
                    resolution=32, cross=False)
    state = {"ws": torch.randn(1, pipe.G.num_ws, 16, generator=torch.Generator().manual_seed(2))}
    monkeypatch.setattr(EG3DPipeline, "encode_source", lambda self, source: state)
    seen = []
    generate = EG3DPipeline.generate
    monkeypatch.setattr(EG3DPipeline, "generate",
                        lambda self, st, m: (seen.append(generate(self, st, m)), seen[-1])[1])

    def predictions(batch, seed=0):
        seen.clear()
        res = evaluate(pipe, root, protocol="same", metrics=["psnr"], batch_size=batch,
                       detector="none", seed=seed)
        return torch.cat(seen), res.values["psnr"]["image"]

    (one, psnr1), (three, psnr3) = predictions(1), predictions(3)
    assert one.shape[0] >= 4 and torch.equal(one, three)
    np.testing.assert_array_equal(psnr1, psnr3)
    assert not torch.equal(predictions(1, seed=1)[0], one)


def test_cli_animate_image_source_without_camera_is_a_message(tiny_run, tmp_path, capsys,
                                                              monkeypatch):
    from pyface.cli import main
    from pyface.train.monitor import save_png

    run, _ = tiny_run
    save_png(_Frames(2, 16)[0]["image"], str(tmp_path / "src.png"))
    save_png(_Frames(2, 16)[1]["image"], str(tmp_path / "drv" / "00000.png"))
    assert main(["animate", "eg3d", "--checkpoint", run, "--source", str(tmp_path / "src.png"),
                 "--driving", str(tmp_path / "drv"), "--out", str(tmp_path / "a.mp4"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyface animate: source['camera']") and "Traceback" not in err
    assert "pyface data prepare FILE --out DIR" in err
    # a camera-less driving folder behind a pyface video folder source: the same hint (the
    # source's inversion is skipped: the driving frames fail before it is used)
    from pyface.data import format as fmt
    from pyface.models.eg3d.pipeline import EG3DPipeline
    monkeypatch.setattr(EG3DPipeline, "encode_source", lambda self, source, **kw: {})
    item = _Frames(2, 16)[0]
    frame = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()[None]
    fmt.write_video(str(tmp_path), "v", frame, torch.zeros(1, 257).numpy(),
                    item["camera"][None].numpy(), identity="a", fps=10.0)
    assert main(["animate", "eg3d", "--checkpoint", run, "--source", str(tmp_path / "v"),
                 "--driving", str(tmp_path / "drv"), "--out", str(tmp_path / "a.mp4"),
                 "--no-progress", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyface animate: driving['camera']") and "pyface data prepare" in err


def test_cli_animate_seeds_honours_no_progress_and_device(tiny_run, tmp_path, capsys):
    from pyface.cli import main

    run, _ = tiny_run
    capsys.readouterr()
    assert main(["animate", "eg3d", "--checkpoint", run, "--seeds", "0", "--frames", "2",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o.mp4")]) == 0
    assert "frame" not in capsys.readouterr().err                 # no progress bar
    assert main(["animate", "eg3d", "--checkpoint", run, "--seeds", "0", "--frames", "2",
                 "--device", "nodevice", "--out", str(tmp_path / "o.mp4")]) == 2
    assert "--device: expected cpu, cuda or cuda:N, got 'nodevice'" in capsys.readouterr().err


def test_cli_animate_seeds_takes_fps_and_refuses_a_source(tiny_run, tmp_path, capsys):
    import imageio.v2 as iio

    from pyface.cli import main

    run, _ = tiny_run
    out = str(tmp_path / "o.mp4")
    base = ["animate", "eg3d", "--checkpoint", run, "--frames", "2", "--device", "cpu",
            "--no-progress", "--out", out]
    assert main(base + ["--seeds", "0", "--fps", "5"]) == 0
    with iio.get_reader(out) as r:
        assert r.get_meta_data()["fps"] == 5.0
    capsys.readouterr()
    assert main(base + ["--seeds", "0", "--source", str(tmp_path)]) == 2
    assert "--seeds renders latent seeds along an orbit and takes no --source" in \
        capsys.readouterr().err
    assert main(base + ["--seeds", "a-b"]) == 1
    assert capsys.readouterr().err == ("pyface animate eg3d: --seeds: expected integers, e.g. 0-3 "
                                       "or 0,5,9, got 'a-b'\n")


@pytest.mark.parametrize("extra, code, msg", [
    (["--steps", "0"], 2, "--steps: expected an integer >= 1, got 0"),
    (["--lr", "nan"], 2, "--lr: expected a learning rate > 0, got nan"),
    (["--lr", "-1"], 2, "--lr: expected a learning rate > 0, got -1.0"),
    (["--device", "tpu"], 2, "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--camera", "abc"], 1, "--camera: expected 25 comma-separated floats, 'frontal'"),
    (["--camera", "missing.json"], 1, "--camera missing.json: not found"),
    (["--vgg", "missing.pth"], 1, "--vgg missing.pth: weights file 'missing.pth' does not exist"),
    (["--out", "FILE"], 2, "exists and is not a folder"),
    (["--out", ""], 2, "--out: expected a folder, got ''"),
])
def test_cli_invert_option_errors_are_one_line(tiny_run, tmp_path, capsys, extra, code, msg):
    from pyface.cli import main
    from pyface.train.monitor import save_png

    run, _ = tiny_run
    save_png(_Frames(2, 16)[0]["image"], str(tmp_path / "src.png"))
    (tmp_path / "FILE").write_text("x")
    extra = [str(tmp_path / "FILE") if e == "FILE" else e for e in extra]
    args = ["invert", "eg3d", str(tmp_path / "src.png"), "--checkpoint", run, "--steps", "1",
            "--no-progress", "--device", "cpu", "--out", str(tmp_path / "inv"), *extra]
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.startswith("pyface invert: ") and msg in err and "Traceback" not in err, err
    assert not (tmp_path / "inv").exists()


def test_cli_invert_reads_a_video_folder_with_its_camera(tiny_run, tmp_path, capsys):
    """A pyface video folder gives its first frame and that frame's camera (no --camera)."""
    import numpy as np

    from pyface.cli import main
    from pyface.data import format as fmt

    run, _ = tiny_run
    items = [_Frames(8, 16)[i] for i in (0, 6)]
    frames = np.stack([((it["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
                       for it in items])
    labels = np.stack([it["camera"].numpy() for it in items]).astype(np.float32)
    fmt.write_video(str(tmp_path), "v", frames, np.zeros((2, 257), np.float32), labels,
                    identity="a", fps=10.0)
    assert main(["invert", "eg3d", str(tmp_path / "v"), "--checkpoint", run, "--steps", "1",
                 "--no-progress", "--device", "cpu", "--out", str(tmp_path / "inv")]) == 0
    t, _ = ckpt.load_weights(str(tmp_path / "inv" / "latent"), kind="eg3d-latent")
    torch.testing.assert_close(t["camera"], torch.from_numpy(labels[0]))


def test_cli_animate_and_invert(tiny_run, tmp_path):
    from pyface.cli import main
    from pyface.train.monitor import save_png

    run, _ = tiny_run
    assert main(["animate", "eg3d", "--checkpoint", run, "--seeds", "0-1", "--frames", "4",
                 "--out", str(tmp_path / "orbit.mp4")]) == 0
    assert (tmp_path / "orbit.mp4").stat().st_size > 0
    item = _Frames(2, 16)[0]
    save_png(item["image"], str(tmp_path / "src.png"))
    cam = ",".join(str(float(v)) for v in item["camera"])
    assert main(["invert", "eg3d", str(tmp_path / "src.png"), "--checkpoint", run,
                 "--camera", cam, "--steps", "3", "--out", str(tmp_path / "inv")]) == 0
    t, meta = ckpt.load_weights(str(tmp_path / "inv" / "latent"), kind="eg3d-latent")
    assert t["ws"].shape[0] == 1 and (tmp_path / "inv" / "reconstruction.png").is_file()
    assert main(["invert", "eg3d", str(tmp_path / "src.png"), "--checkpoint", run,
                 "--camera", "1,2,3", "--out", str(tmp_path / "x")]) == 1


# -- --compile: the generator compiled without a pipeline (pyface invert, animate --seeds) ----

@pytest.fixture
def fresh_dynamo():
    """Compiles from scratch (graphs cached by another test would compile for dynamic shapes)
    and leaves no compiled graph behind."""
    from pyface.nn.compiling import reset_compiled

    reset_compiled()
    yield
    reset_compiled()


def _spy_generators(monkeypatch):
    from pyface.models.eg3d import pipeline

    loaded, load = [], pipeline.load_generator
    monkeypatch.setattr(pipeline, "load_generator",
                        lambda *a, **kw: (loaded.append(load(*a, **kw)), loaded[-1])[1])
    return loaded


def test_cli_option_reaches_the_seed_animation_and_the_pipeline(tiny_run, tmp_path, capsys,
                                                               monkeypatch):
    """``pyface animate eg3d --option generator.render.depth_resolution=N`` reaches the
    generator of a seed animation (load_generator) and the pipeline of a source animation
    (pyface.models.load); an architecture key exits 2 naming it, before anything loads."""
    import pyface.models
    from pyface.cli import main
    from pyface.data import format as fmt
    from pyface.models.eg3d.pipeline import EG3DPipeline

    run, _ = tiny_run
    loaded = _spy_generators(monkeypatch)
    out = ["--out", str(tmp_path / "o.mp4"), "--device", "cpu", "--no-progress"]
    assert main(["animate", "eg3d", "--checkpoint", run, "--seeds", "0", "--frames", "2", *out,
                 "--option", "generator.render.depth_resolution=7",
                 "--option", "model.generator.render.depth_resolution_importance=5"]) == 0
    assert [(G.renderer.config.depth_resolution, G.renderer.config.depth_resolution_importance)
            for G in loaded] == [(7, 5)]
    seen, load = [], pyface.models.load
    monkeypatch.setattr(pyface.models, "load", lambda *a, **kw: (
        seen.append((kw.get("options"), load(*a, **kw))), seen[-1][1])[1])
    monkeypatch.setattr(EG3DPipeline, "encode_source",   # no inversion: the options are tested
                        lambda self, source, **kw: {"ws": torch.zeros(1, self.G.num_ws, 16)})
    item = _Frames(2, 16)[0]
    frame = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()[None]
    fmt.write_video(str(tmp_path), "v", frame, torch.zeros(1, 257).numpy(),
                    item["camera"][None].numpy(), identity="a", fps=10.0)
    video = str(tmp_path / "v")
    assert main(["animate", "eg3d", "--checkpoint", run, "--source", video, "--driving", video,
                 *out, "--option", "generator.render.depth_resolution=96",
                 "--option", "generator.render.depth_resolution_importance=96"]) == 0
    (options, pipe), = seen
    assert options == {"generator.render.depth_resolution": 96,
                       "generator.render.depth_resolution_importance": 96}
    assert (pipe.G.renderer.config.depth_resolution,
            pipe.G.renderer.config.depth_resolution_importance) == (96, 96)
    capsys.readouterr()
    loaded.clear()
    seen.clear()
    for extra in (["--seeds", "0"], ["--source", video, "--driving", video]):
        assert main(["animate", "eg3d", "--checkpoint", run, *extra, *out,
                     "--option", "generator.render.ray_start=2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pyface animate: options: 'generator.render.ray_start' is not an "
                              "inference option of model 'eg3d'")
        assert "valid: model.generator.render.depth_resolution, " in err
        assert "Traceback" not in err
    assert loaded == [] and seen == []


def test_cli_invert_option_reaches_a_run_generator(tiny_run, tmp_path, capsys, monkeypatch):
    """``pyface invert eg3d --option`` builds a training run's generator with the given samples
    per ray (what the renderer marches; recorded in the latent's metadata); a value that does
    not fit the run's saved config (3 coarse samples with its 4 importance samples) exits 2
    naming model.KEY, and nothing is written."""
    from pyface.cli import main
    from pyface.nn import render
    from pyface.train.monitor import save_png

    run, _ = tiny_run
    marched, march = [], render.render_triplane
    monkeypatch.setattr(render, "render_triplane", lambda *a, **kw: (
        marched.append((kw["n_coarse"], kw["n_fine"])), march(*a, **kw))[1])
    save_png(_Frames(2, 16)[0]["image"], str(tmp_path / "src.png"))
    base = ["invert", "eg3d", str(tmp_path / "src.png"), "--checkpoint", run, "--steps", "1",
            "--no-progress", "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "a"), "--option",
                        "generator.render.depth_resolution=7", "--option",
                        "generator.render.depth_resolution_importance=5"]) == 0
    assert marched and set(marched) == {(7, 5)}
    _, meta = ckpt.load_weights(str(tmp_path / "a" / "latent"), kind="eg3d-latent")
    assert meta["config"]["options"] == {"model.generator.render.depth_resolution": 7,
                                         "model.generator.render.depth_resolution_importance": 5}
    marched.clear()
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "b"), "--option",
                        "generator.render.depth_resolution=3"]) == 2
    assert capsys.readouterr().err == (
        "pyface invert: model.generator.render.depth_resolution: expected >= 4 with importance "
        "samples (depth_resolution_importance 4), got 3\n")
    assert marched == [] and not (tmp_path / "b").exists()
    assert main(base + ["--out", str(tmp_path / "b"), "--option",
                        "generator.render.depth_resolution=3", "--option",
                        "generator.render.depth_resolution_importance=0"]) == 0
    assert marched and set(marched) == {(3, 0)}


def test_importance_option_refused_by_saved_coarse_samples_names_its_own_key(tiny_run,
                                                                            tmp_path, capsys):
    """Importance samples given as an option to a generator saved with fewer than 4 coarse
    samples (and none of importance) are refused naming the key that was set,
    model.generator.render.depth_resolution_importance (not the saved depth_resolution), so
    that pyface invert exits 2 naming it, not 1 blaming --checkpoint; the coarse count set
    with it is still the one named."""
    from pyface.cli import main
    from pyface.models.eg3d.pipeline import load_generator
    from pyface.train.monitor import save_png

    run, _ = tiny_run
    G = load_generator(run)
    G.cfg.render.depth_resolution, G.cfg.render.depth_resolution_importance = 3, 0
    conv = _converted_release(G, tmp_path / "coarse3")
    assert load_generator(conv).renderer.config.depth_resolution == 3
    want = (r"model.generator.render.depth_resolution_importance: expected 0 with fewer than 4 "
            r"coarse samples \(depth_resolution 3\), got 5")
    with pytest.raises(ValueError, match=want):
        load_generator(conv, options={"generator.render.depth_resolution_importance": 5})
    with pytest.raises(ValueError, match=r"model.generator.render.depth_resolution: expected "
                                         r">= 4 with importance samples "
                                         r"\(depth_resolution_importance 5\), got 2"):
        load_generator(conv, options={"generator.render.depth_resolution": 2,
                                      "generator.render.depth_resolution_importance": 5})
    # a training run saved with 3 coarse samples and none of importance: the same
    copy = tmp_path / "run3"
    shutil.copytree(run, copy)
    edit_saved_config(copy, lambda config: config["generator"]["render"].update(
        depth_resolution=3, depth_resolution_importance=0))
    assert load_generator(str(copy)).renderer.config.depth_resolution == 3
    with pytest.raises(ValueError, match=want):
        load_generator(str(copy), options={"generator.render.depth_resolution_importance": 5})
    save_png(_Frames(2, 16)[0]["image"], str(tmp_path / "src.png"))
    capsys.readouterr()
    assert main(["invert", "eg3d", str(tmp_path / "src.png"), "--checkpoint", conv, "--steps",
                 "1", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "inv"),
                 "--option", "generator.render.depth_resolution_importance=5"]) == 2
    assert capsys.readouterr().err == (
        "pyface invert: model.generator.render.depth_resolution_importance: expected 0 with "
        "fewer than 4 coarse samples (depth_resolution 3), got 5\n")
    assert not (tmp_path / "inv").exists()


def test_cli_option_value_the_saved_config_refuses_exits_2_in_both_animations(tiny_run, tmp_path,
                                                                            capsys):
    """An --option value that only the saved config makes wrong (3 coarse samples with this
    run's importance samples) exits 2 naming model.generator.KEY in a seed animation as in a
    source animation (pyface animate: 2 for a bad key or value), before anything renders."""
    from pyface.cli import main
    from pyface.data import format as fmt

    run, _ = tiny_run
    item = _Frames(2, 16)[0]
    frame = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()[None]
    fmt.write_video(str(tmp_path), "v", frame, torch.zeros(1, 257).numpy(),
                    item["camera"][None].numpy(), identity="a", fps=10.0)
    video = str(tmp_path / "v")
    out = tmp_path / "o.mp4"
    capsys.readouterr()
    for extra in (["--seeds", "0"], ["--source", video, "--driving", video]):
        assert main(["animate", "eg3d", "--checkpoint", run, *extra, "--out", str(out),
                     "--device", "cpu", "--no-progress", "--frames", "2",
                     "--option", "generator.render.depth_resolution=3"]) == 2, extra
        err = capsys.readouterr().err
        assert "model.generator.render.depth_resolution: expected >= 4 with importance " \
               "samples (depth_resolution_importance 4), got 3" in err
        assert "Traceback" not in err and not out.exists()


def test_cli_invert_compiled_equals_uncompiled(tiny_run, tmp_path, capsys, monkeypatch,
                                               fresh_dynamo):
    """pyface invert --compile aot_eager compiles EG3DPipeline's modules of the generator and
    optimises the latent through their forward and backward graphs: the latent and the losses
    are those of the uncompiled inversion; the steps during which a graph compiled are reported
    apart from the others."""
    import re

    from pyface.cli import main
    from pyface.models.eg3d.pipeline import EG3DPipeline
    from pyface.nn.compiling import is_compiled
    from pyface.train.model import compiled_graphs
    from pyface.train.monitor import save_png

    run, _ = tiny_run
    item = _Frames(2, 16)[0]
    save_png(item["image"], str(tmp_path / "src.png"))
    cam = ",".join(str(float(v)) for v in item["camera"])
    loaded = _spy_generators(monkeypatch)
    results = {}
    for name, extra in (("plain", []), ("compiled", ["--compile", "aot_eager"])):
        before = compiled_graphs()
        assert main(["invert", "eg3d", str(tmp_path / "src.png"), "--checkpoint", run,
                     "--camera", cam, "--steps", "2", "--lr", "0.05", "--no-progress",
                     "--device", "cpu", "--out", str(tmp_path / name), *extra]) == 0
        results[name] = (ckpt.load_weights(str(tmp_path / name / "latent")),
                         capsys.readouterr().out, compiled_graphs() - before)
    (plain, pmeta), pout, pgraphs = results["plain"]
    (comp, cmeta), cout, cgraphs = results["compiled"]
    assert pgraphs == 0 and cgraphs > 0
    assert all(not is_compiled(loaded[0].get_submodule(n))
               for n in EG3DPipeline.compile_modules)
    assert all(is_compiled(loaded[1].get_submodule(n)) for n in EG3DPipeline.compile_modules)
    torch.testing.assert_close(comp["ws"], plain["ws"])
    torch.testing.assert_close(cmeta["config"]["final_loss"], pmeta["config"]["final_loss"])
    first, last = map(float, re.search(r"loss (\S+) -> (\S+)\n", cout).groups())
    assert last < first                         # the gradients reached the latent
    assert re.search(r"\n  2 steps: \d+\.\d ms each on cpu\n$", pout), pout
    # the forward and backward graphs compile in the first step; the second runs them
    assert re.search(r"\n  --compile aot_eager: compiled backbone\.synthesis, renderer, "
                     r"superresolution; compiled in \d+\.\d s over the first step; the other 1 "
                     r"step: \d+\.\d ms each on cpu\n$", cout), cout


@pytest.mark.parametrize("importance", [4, 0])
def test_uniforms_drawn_before_synthesis_are_those_the_renderer_draws(importance):
    """project and orbit_frames draw the renderer's ray samples before G.synthesis (so that a
    renderer compiled by Inductor, which would draw others, renders the same samples): from the
    same torch seed they are the numbers the renderer draws itself, so the uncompiled images do
    not change, bit for bit."""
    from pyface.models.eg3d.pipeline import render_uniforms_of

    torch.manual_seed(0)
    G = EG3DGenerator(tiny_cfg(render=RenderConfig.ffhq(
        depth_resolution=6, depth_resolution_importance=importance))).eval()
    ws = G.mapping(torch.randn(2, 16), G.camera([0.0, 0.3], 0.0))
    c = G.camera([0.2, -0.1], 0.1)
    with torch.no_grad():
        torch.manual_seed(7)
        own = G.synthesis(ws, c)["image"]
        torch.manual_seed(7)
        kw = render_uniforms_of(G, 2, 8, ws)
        drawn = G.synthesis(ws, c, **kw)["image"]
        other = G.synthesis(ws, c, **render_uniforms_of(G, 2, 8, ws))["image"]
    assert kw["stratified_noise"].shape == (2, 64, 6)
    assert (kw["importance_u"] is None) == (importance == 0)
    assert torch.equal(own, drawn) and not torch.equal(own, other)


def test_invert_step_report_names_the_steps_that_compiled():
    from pyface.models.eg3d.cli import step_report

    names = ["renderer"]
    assert step_report([0.5, 0.25], [], "cpu", None, []) == "2 steps: 375.0 ms each on cpu"
    assert step_report([2.0, 0.01, 3.0, 0.03], [0, 2], "cpu", "eager", names) == (
        "--compile eager: compiled renderer; compiled in 5.0 s over steps 1, 3; the other 2 "
        "steps: 20.0 ms each on cpu")
    assert step_report([2.0], [0], "cpu", "default", names) == (
        "--compile default: compiled renderer; compiled in 2.0 s over the first step; every "
        "step compiled, so there is no compiled step to time (more --steps)")
    assert step_report([0.002], [], "cuda:0", "default", []) == (
        "--compile default: compiled nothing (compiled already); no step compiled; 1 step: "
        "2.0 ms each on cuda:0")


def test_cli_animate_seeds_compiled_equals_uncompiled(tiny_run, tmp_path, capsys, monkeypatch,
                                                      fresh_dynamo):
    """pyface animate --seeds --compile aot_eager: the orbit frames of the uncompiled generator,
    the compiled modules named, and the frames during which a graph compiled left out of the
    frames per second."""
    import re

    from pyface.cli import main
    from pyface.models.eg3d import cli
    from pyface.models.eg3d.pipeline import EG3DPipeline
    from pyface.nn.compiling import is_compiled

    run, _ = tiny_run
    loaded = _spy_generators(monkeypatch)
    written = []
    write = cli.write_video
    monkeypatch.setattr(cli, "write_video",
                        lambda frames, *a, **kw: (written.append(frames), write(frames, *a,
                                                                                 **kw))[1])
    outs = []
    for extra in ([], ["--compile", "aot_eager"]):
        assert main(["animate", "eg3d", "--checkpoint", run, "--seeds", "0-1", "--frames", "3",
                     "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o.mp4"),
                     *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert written[0].shape == (3, 3, 16, 32) and not torch.equal(written[0][0], written[0][1])
    torch.testing.assert_close(written[1], written[0])
    assert all(is_compiled(loaded[1].get_submodule(n)) for n in EG3DPipeline.compile_modules)
    frames = (r"\n  3 frames of 2 seeds at 16x32; animate: \d+\.\d frames/s on cpu \(the seeds' "
              r"mapping and tri-planes and video writing excluded\)\n")
    assert re.fullmatch(f".*o\\.mp4{frames}", outs[0], re.S), outs[0]
    m = re.fullmatch(f".*o\\.mp4{frames}  --compile aot_eager: compiled backbone\\.synthesis, "
                     r"renderer, superresolution; the seeds' tri-planes compiled before the "
                     r"frames \(\d+\.\d s\); (\d) frames? compiled \(\d+\.\d s with the "
                     r"compilation\), left out of the frames per second\n", outs[1], re.S)
    assert m and 1 <= int(m[1]) < 3, outs[1]


def test_unseeded_generate_draws_the_ray_samples_before_each_render(monkeypatch):
    """EG3DPipeline.generate without a seed draws each frame's ray samples from torch's
    generator before G.synthesis (out of a compiled renderer): the numbers the renderer draws
    itself, so the frames equal those of renders that draw their own, bit for bit."""
    import pyface.models.eg3d.pipeline as eg3d_pipeline
    from pyface.nn.render import TriplaneRenderer

    torch.manual_seed(0)
    G = EG3DGenerator(tiny_cfg()).eval()
    pipe = eg3d_pipeline.EG3DPipeline(G, device="cpu")
    state = {"ws": G.mapping(torch.randn(1, 16), G.camera(0.0, 0.0))}
    motion = {"camera": G.camera([0.1, -0.2, 0.3], 0.0)}
    given, forward = [], TriplaneRenderer.forward

    def recording(self, *args, **kw):
        given.append(kw.get("stratified_noise"))
        return forward(self, *args, **kw)

    monkeypatch.setattr(TriplaneRenderer, "forward", recording)
    torch.manual_seed(4)
    drawn = pipe.generate(state, motion)
    assert len(given) == 3 and all(n is not None and n.shape == (1, 64, 6) for n in given)
    given.clear()
    monkeypatch.setattr(eg3d_pipeline, "render_uniforms_of", lambda *a: {})  # renderer draws
    torch.manual_seed(4)
    own = pipe.generate(state, motion)
    assert len(given) == 3 and all(n is None for n in given)
    assert torch.equal(own, drawn) and drawn.shape == (3, 3, 16, 16)


def test_sr_noise_random_is_drawn_before_the_super_resolution(monkeypatch):
    """sr_noise_mode: random: unseeded generate / orbit / inversion draw the super-resolution's
    noise with the ray samples, before G.synthesis (out of compiled modules): the frames equal
    those of a super-resolution drawing its own, bit for bit. Seeded frames draw it from the
    frame's generator, so they do not depend on torch's generator."""
    import pyface.models.eg3d.pipeline as eg3d_pipeline
    from pyface.nn.stylegan import SuperResolution

    torch.manual_seed(0)
    G = EG3DGenerator(tiny_cfg(sr_noise_mode="random")).eval()
    for m in G.superresolution.modules():
        if getattr(m, "use_noise", False):
            m.noise_strength.data.fill_(0.5)
    pipe = eg3d_pipeline.EG3DPipeline(G, device="cpu")
    state = {"ws": G.mapping(torch.randn(1, 16), G.camera(0.0, 0.0))}
    motion = {"camera": G.camera([0.1, -0.2, 0.3], 0.0)}
    given, forward = [], SuperResolution.forward

    def recording(self, *args, **kw):
        given.append(kw.get("noise"))
        return forward(self, *args, **kw)

    monkeypatch.setattr(SuperResolution, "forward", recording)
    torch.manual_seed(4)
    drawn = pipe.generate(state, motion)
    assert len(given) == 3 and all(n is not None and len(n) == 4 for n in given)
    torch.manual_seed(4)
    orbit = torch.stack(list(eg3d_pipeline.orbit_frames(G, [1], frames=2)))
    given.clear()
    monkeypatch.setattr(eg3d_pipeline, "render_uniforms_of", lambda *a: {})
    torch.manual_seed(4)
    own = pipe.generate(state, motion)
    assert len(given) == 3 and all(n is None for n in given)
    assert torch.equal(own, drawn)
    torch.manual_seed(4)
    assert torch.equal(torch.stack(list(eg3d_pipeline.orbit_frames(G, [1], frames=2))), orbit)
    monkeypatch.undo()
    seeded = pipe.seed_frames(motion, 5, 0)
    torch.manual_seed(1)
    a = pipe.generate(state, seeded)
    torch.manual_seed(2)
    assert torch.equal(pipe.generate(state, seeded), a)
    assert not torch.equal(pipe.generate(state, pipe.seed_frames(motion, 6, 0)), a)


def test_prepared_batch_is_shared_by_the_phases_of_a_step(tmp_path):
    """The real images, mirrored cameras and generator cameras are prepared once per step and
    batch: the later phases of the step reuse them; another step or batch prepares anew."""
    from pyface.models.eg3d.model import EG3D
    from pyface.train.model import StepContext

    m = EG3D(_experiment(tmp_path / "r", 1).model_config)
    b = _Frames(4, 16)
    batch = torch.utils.data.default_collate([b[i] for i in range(4)])
    ctx = StepContext(step=3, images_seen=12, batch_size=4)
    first = m._prepare(batch, ctx)
    assert m._prepare(batch, ctx) is first
    again = m._prepare(batch, StepContext(step=4, images_seen=16, batch_size=4))
    assert again is not first
    other = {**batch, "image": batch["image"].clone()}
    assert m._prepare(other, StepContext(step=4, images_seen=16, batch_size=4)) is not again


def test_previews_render_the_ema_generator(tmp_path):
    """The training previews show the EMA generator (train.ema), not the live one."""
    from pyface.train.engine import Trainer

    tr = Trainer(_experiment(tmp_path / "run", 2, **{"ema": {"modules": ["G"],
                                                            "half_life_kimg": 1000.0,
                                                            "rampup": None}}),
                 dataset=_Frames())
    tr.fit()
    m, ema = tr.model.eval(), tr.ema.modules["G"]
    batch = tr.preview_batch(4)
    cam = batch["camera"].float()
    z = torch.randn(4, m.cfg.generator.z_dim, generator=torch.Generator().manual_seed(123))
    torch.manual_seed(0)
    shown = m.preview(batch)["image"]
    torch.manual_seed(0)
    want = ema(z, cam)["image"]
    torch.manual_seed(0)
    live = m.G(z, cam)["image"]
    assert (live - want).abs().max() > 1e-3          # the two generators differ by now
    torch.testing.assert_close(shown, want)


def _phase_cameras(m, batch, step=5):
    """The cameras the generator's mapping sees (before the pose swap) in Gmain, Greg and
    Dmain of one step."""
    from pyface.train.model import StepContext

    seen = {}
    orig = m._c_cond

    def record(c, swapping_prob):
        seen.setdefault(phase, c.detach().clone())
        return orig(c, swapping_prob)

    m._c_cond = record
    for phase in ("Gmain", "Greg", "Dmain"):
        m.step(phase, batch, StepContext(step=step, images_seen=step * 4, batch_size=4))
    del m._c_cond
    return seen


def test_gen_c_per_phase_draws_the_generator_cameras_for_each_phase(tmp_path):
    """model.gen_c_per_phase (EG3D draws gen_c for every phase): Greg and Dmain render at their
    own permutations of the batch's labels; without it (the default) the phases of a step share
    Gmain's."""
    from pyface.models.eg3d.model import EG3D

    cfg = _experiment(tmp_path / "r", 1).model_config
    assert cfg.gen_c_per_phase is False
    b = _Frames(4, 16)
    batch = torch.utils.data.default_collate([b[i] for i in range(4)])
    torch.manual_seed(0)
    shared = _phase_cameras(EG3D(cfg), batch)
    assert torch.equal(shared["Gmain"], shared["Greg"])
    assert torch.equal(shared["Gmain"], shared["Dmain"])
    cfg.gen_c_per_phase = True
    torch.manual_seed(0)
    m = EG3D(cfg)
    own = _phase_cameras(m, batch)
    torch.testing.assert_close(own["Gmain"], shared["Gmain"])        # Gmain's are the step's
    assert not torch.equal(own["Greg"], own["Gmain"])
    assert not torch.equal(own["Dmain"], own["Gmain"])
    assert not torch.equal(own["Dmain"], own["Greg"])
    cams = m._prepared[2]["camera"]                 # each a permutation of the batch's labels
    for ph in ("Greg", "Dmain"):
        assert sorted(map(tuple, own[ph].tolist())) == sorted(map(tuple, cams.tolist())), ph
    again = _phase_cameras(EG3D(cfg), batch)        # seeded by the step: reproducible
    assert torch.equal(again["Dmain"], own["Dmain"])


def test_gen_c_per_phase_presets_and_saved_configs():
    """EG3D's per-phase cameras in full and gpu-short; tiny and a saved config without the key
    keep one permutation per step."""
    import dataclasses

    from pyface.models.eg3d.model import EG3D
    from pyface.train.config import build_experiment, from_dict, saved_config

    for name, want in (("tiny", False), ("gpu-short", True), ("full", True)):
        exp = build_experiment("eg3d", EG3D.Config, defaults=EG3D.recipe, preset=name,
                               presets=EG3D.presets)
        assert exp.model_config.gen_c_per_phase is want, name
    old = dataclasses.asdict(EG3D.Config())
    del old["gen_c_per_phase"]
    assert from_dict(EG3D.Config, saved_config(EG3D.Config, old)).gen_c_per_phase is False


def test_gen_c_per_phase_resume_refuses_a_changed_key_and_takes_an_old_run(tmp_path):
    """A run resumed with gen_c_per_phase changed is refused naming the key; a checkpoint saved
    before the key existed resumes with the default (one permutation per step)."""

    from pyface.train.engine import Trainer

    Trainer(_experiment(tmp_path / "a", 2), dataset=_Frames()).fit()
    changed = _experiment(tmp_path / "a", 4)
    changed.model_config.gen_c_per_phase = True
    with pytest.raises(ckpt.CheckpointError, match=r"model\.gen_c_per_phase: checkpoint False "
                                                   r"vs run True"):
        Trainer(changed, dataset=_Frames()).resume("auto")
    path = drop_saved_keys(tmp_path / "a", ["gen_c_per_phase"])[-1]
    tr = Trainer(_experiment(tmp_path / "a", 4), dataset=_Frames())
    assert tr.resume("auto") == path and tr.step == 2


def _rows(t):
    return {tuple(round(v, 5) for v in r) for r in t.tolist()}


def test_gen_c_source_dataset_draws_the_cameras_from_the_whole_dataset(tmp_path):
    """model.gen_c_source='dataset' (EG3D draws gen_c from the whole training set): every
    phase's cameras are rows of the dataset's label pool or their mirrors (model.mirror), not
    the batch's; each phase draws its own with gen_c_per_phase; seeded by the step; N ranks
    draw the rows one process draws for the whole batch; the silhouette measures are taken at
    the batch's cameras (a drawn camera has no mask)."""
    from pyface.face.cameras import mirror_label
    from pyface.models.eg3d.model import EG3D
    from pyface.train.model import StepContext

    cfg = _experiment(tmp_path / "r", 1).model_config
    cfg.gen_c_source, cfg.gen_c_per_phase = "dataset", True
    b = _Frames(4, 16)
    batch = torch.utils.data.default_collate([b[i] for i in range(4)])
    from pyface.face import cameras as cams

    # a pool of cameras pitched 0.1 rad, the batch's are not: disjoint (also when mirrored)
    pool = torch.stack([cams.make_label(cams.orbit_camera(y, 0.1), cams.intrinsics_from_focal())
                        for y in torch.linspace(-0.4, 0.3, 32).tolist()])
    allowed = _rows(pool) | _rows(mirror_label(pool))
    given = _rows(batch["camera"]) | _rows(mirror_label(batch["camera"]))
    assert not allowed & given
    torch.manual_seed(0)
    m = EG3D(cfg)
    assert m.label_pools() == ("camera",)
    m.set_label_pool("camera", pool)
    seen = _phase_cameras(m, batch)
    for ph in ("Gmain", "Greg", "Dmain"):
        assert _rows(seen[ph]) <= allowed, ph
    assert not torch.equal(seen["Greg"], seen["Gmain"])
    assert not torch.equal(seen["Dmain"], seen["Gmain"])
    drawn = torch.cat([seen[ph] for ph in seen])
    mirrored = _rows(drawn) - _rows(pool)               # mirror with probability 1/2
    assert mirrored and mirrored != _rows(drawn)
    # the silhouette measures: the planes rendered again at the batch's cameras (no mask of a
    # drawn camera), on the depth measures' steps only
    given = []
    orig = m.G.synthesis

    def record(ws, c, **kw):
        given.append(c.detach().clone())
        return orig(ws, c, **kw)

    m.G.synthesis = record
    cfg.measure_every = 10                  # depth (and silhouette) measures every 2 steps
    out = m.step("Gmain", batch, StepContext(step=6, images_seen=24, batch_size=4))
    assert "iou" in out and 0 <= out["iou"] <= 1 and torch.isfinite(out["loss"])
    assert any(torch.equal(c, m._prepared[2]["camera"]) for c in given)
    assert "iou" not in m.step("Gmain", batch, StepContext(step=7, images_seen=28, batch_size=4))
    del m.G.synthesis
    again = EG3D(cfg)
    again.set_label_pool("camera", pool)
    same = _phase_cameras(again, batch)
    for ph in seen:
        assert torch.equal(same[ph], seen[ph]), ph
    assert not torch.equal(_phase_cameras(again, batch, step=7)["Gmain"], seen["Gmain"])
    one = m._draw_gen_c(4, 0, StepContext(step=9, images_seen=36, batch_size=4))
    ranks = [m._draw_gen_c(2, 0, StepContext(step=9, images_seen=36, batch_size=4, rank=r,
                                             world_size=2)) for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), one)
    cfg.mirror = False
    plain = EG3D(cfg)
    plain.set_label_pool("camera", pool)
    assert _rows(_phase_cameras(plain, batch)["Dmain"]) <= _rows(pool)


def test_gen_c_source_is_checked_and_needs_the_pool(tmp_path):
    """A bad model.gen_c_source is refused naming it; gen_c_source='dataset' stepped without
    the dataset's labels (a model built by hand) is an error saying what to do; 'batch' asks
    for no pool."""
    from pyface.models.eg3d.model import EG3D
    from pyface.train.model import StepContext

    cfg = _experiment(tmp_path / "r", 1).model_config
    assert cfg.gen_c_source == "batch" and EG3D(cfg).label_pools() == ()
    cfg.gen_c_source = "all"
    with pytest.raises(ValueError, match=r"model\.gen_c_source: expected one of \('batch', "
                                         r"'dataset'\), got 'all'"):
        EG3D(cfg)
    cfg.gen_c_source = "dataset"
    m = EG3D(cfg)
    b = _Frames(2, 16)
    batch = torch.utils.data.default_collate([b[0], b[1]])
    with pytest.raises(RuntimeError, match=r"model\.gen_c_source='dataset' needs the dataset's "
                                           r"camera labels: .*set_label_pool\('camera'"):
        m.step("Gmain", batch, StepContext(step=0, images_seen=0, batch_size=2))
    m.set_label_pool("camera", torch.zeros(3, 16))
    with pytest.raises(ValueError, match=r"label pool 'camera': expected \(N, 25\) EG3D labels, "
                                         r"got \(3, 16\)"):
        m.step("Gmain", batch, StepContext(step=1, images_seen=0, batch_size=2))


def test_gen_c_source_presets_saved_configs_and_resume(tmp_path):
    """'dataset' in gpu-short and full (EG3D's), 'batch' in tiny and in a saved config without
    the key; the Trainer hands the dataset's cameras to the model (not saved: a resumed run
    rebuilds them and continues exactly); a run resumed with the key changed is refused."""
    import dataclasses

    from pyface.models.eg3d.model import EG3D
    from pyface.train.config import build_experiment, from_dict, saved_config
    from pyface.train.engine import Trainer

    for name, want in (("tiny", "batch"), ("gpu-short", "dataset"), ("full", "dataset")):
        exp = build_experiment("eg3d", EG3D.Config, defaults=EG3D.recipe, preset=name,
                               presets=EG3D.presets)
        assert exp.model_config.gen_c_source == want, name
    old = dataclasses.asdict(EG3D.Config())
    del old["gen_c_source"]
    assert from_dict(EG3D.Config, saved_config(EG3D.Config, old)).gen_c_source == "batch"

    def run(name, steps):
        exp = _experiment(tmp_path / name, steps)
        exp.model_config.gen_c_source = "dataset"
        return Trainer(exp, dataset=_Frames())

    a = run("a", 4)
    data = _Frames()
    want = torch.stack([data[i]["camera"] for i in range(len(data))])
    assert torch.equal(a.model.label_pool("camera"), want)
    a.fit()
    run("b", 2).fit()
    tensors, _ = ckpt.load_folder(ckpt.latest_checkpoint(str(tmp_path / "b")))
    assert not any("label_pool" in k for k in tensors)
    c = run("b", 4)
    c.resume("auto")
    assert c.step == 2
    c.fit()
    _assert_same_weights(a, c)
    with pytest.raises(ckpt.CheckpointError, match=r"model\.gen_c_source: checkpoint 'dataset' "
                                                   r"vs run 'batch'"):
        Trainer(_experiment(tmp_path / "b", 6), dataset=_Frames()).resume("auto")
