# Provenance: the SegFormer and dense-motion blocks below transcribe the key layouts and forward
# semantics of HuggingFace transformers' SegFormer (Apache-2.0) and of face-vid2vid as
# reimplemented in zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis (commit
# 9511d25, CC BY-NC 4.0; LivePortrait, KwaiVGI/LivePortrait 1986663, MIT, has the same layout),
# written from their documented behaviour; no upstream code is copied.
"""Converters: the restricted unpickler refuses code and never runs embedded sources; EG3D-
structured pickles, torchvision VGG19, insightface ArcFace, GFPGAN, HF SegFormer and face-vid2vid /
LivePortrait dense-motion files convert and load; mismatches give precise errors. SegFormer and
dense motion are checked against independent transcriptions of the upstream key layouts and
forward passes."""
from __future__ import annotations

import collections
import os
import pickle
import sys

import pytest
import torch
from torch import nn

from pyface import checkpoint as ckpt
from pyface.convert import (ConversionError, RestrictedUnpickler, convert_arcface, convert_eg3d,
                            convert_gfpgan, convert_segformer, convert_vgg19, load_eg3d,
                            restricted_load)
from pyface.nn.layers import FullyConnectedLayer
from pyface.nn.stylegan import (MappingConfig, SuperResolution, SynthesisConfig,
                                TriplaneBackbone, TriplaneBackboneConfig)

# ------------------------------------------------------------------------------------------
# malicious pickles
# ------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("payload, name", [("system", "posix.system"),
                                           ("eval", "builtins.eval")])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, name):
    marker = tmp_path / "pwned"
    obj = _Evil(marker) if payload == "system" else _EvilEval()
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": obj}))
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load global {name}"):
        restricted_load(str(path))
    with pytest.raises(ConversionError, match="refusing to load global"):
        convert_eg3d(str(path), str(tmp_path / "out"))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def _build_on_global(module: str, name: str, attr: str, value_ops: bytes) -> bytes:
    """A protocol-2 pickle that pushes the global ``module.name`` itself and BUILDs it with the
    slot state ``{attr: value}`` (what setattr on the shared function or class would do)."""
    def text(s):
        b = s.encode()
        return b"X" + len(b).to_bytes(4, "little") + b
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"N}" + text(attr) + value_ops
            + b"s\x86b.")


@pytest.mark.parametrize("module, name, attr, value_ops", [
    # _rebuild_tensor_v2(..., metadata=None): a default of {"neg": True} would negate every
    # tensor that torch.load(weights_only=True) reads later in the process
    ("torch._utils", "_rebuild_tensor_v2", "__defaults__",
     b"(}" + b"X\x03\x00\x00\x00negI01\ns" + b"t"),
    ("torch._utils", "_rebuild_parameter", "__defaults__", b"(I01\nt"),
    ("torch.storage", "_load_from_bytes", "__defaults__", b"(I01\nt"),
    ("copyreg", "_reconstructor", "__defaults__", b"(I01\nt"),
    ("torch_utils.persistence", "_reconstruct_persistent_obj", "__repr__",
     b"ctorch\nSize\n")])
def test_restricted_unpickler_never_sets_attributes_of_its_globals(module, name, attr,
                                                                   value_ops):
    """BUILD on an allowed global itself (not on an object it made) would change that function
    or class for the whole process; it is refused, naming the global."""
    import pyface.convert as pc

    targets = [torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter,
               pc._storage_from_bytes, pc._reconstructor]
    saved = [(f, f.__defaults__) for f in targets]
    saved_repr = pc.PersistentRecord.__dict__["__repr__"]
    try:
        with pytest.raises(pickle.UnpicklingError,
                           match=f"refusing to set the state of global {module}.{name}"):
            RestrictedUnpickler(__import__("io").BytesIO(
                _build_on_global(module, name, attr, value_ops))).load()
        assert all(f.__defaults__ is d for f, d in saved)
        assert pc.PersistentRecord.__dict__["__repr__"] is saved_repr
        t = torch.ones(2)
        out = RestrictedUnpickler(__import__("io").BytesIO(pickle.dumps(t, protocol=4))).load()
        assert torch.equal(out, t)
    finally:       # never leave a poisoned torch behind for the other tests
        for f, d in saved:
            f.__defaults__ = d
        pc.PersistentRecord.__repr__ = saved_repr


def test_restricted_unpickler_keeps_plain_data():
    data = {"a": [1, 2.5, "x", None, (True,)], "b": collections.OrderedDict(k=torch.arange(3)),
            "c": {1, 2}}
    out = RestrictedUnpickler(__import__("io").BytesIO(pickle.dumps(data))).load()
    assert out["a"] == data["a"] and out["c"] == {1, 2}
    assert torch.equal(out["b"]["k"], torch.arange(3))


# ------------------------------------------------------------------------------------------
# an EG3D-structured network pickle, built here
# ------------------------------------------------------------------------------------------

MARKER_ENV = "PYFACE_TEST_MARKER"


class _OSGDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(FullyConnectedLayer(8, 16, lr_multiplier=1), nn.Softplus(),
                                 FullyConnectedLayer(16, 9))


class TriPlaneGenerator(nn.Module):
    pass


def _eg3d_pickle(path, pers, EasyDict, marker, rk_loop=False):
    """Write an EG3D-like pickle: persistent classes carry a module_src that would create
    ``marker`` if it were executed; ``rk_loop``: its rendering_kwargs contain themselves."""
    src = f"open({str(marker)!r}, 'w').write('pwned')\n"

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, nn.Module) and not type(obj).__module__.startswith("torch.nn"):
                state = {"_parameters": collections.OrderedDict(obj._parameters),
                         "_buffers": collections.OrderedDict(obj._buffers),
                         "_non_persistent_buffers_set": set(obj._non_persistent_buffers_set),
                         "_modules": collections.OrderedDict(obj._modules),
                         "training": obj.training,
                         # EG3D's persistence pickles the instance __dict__
                         "_init_kwargs": getattr(obj, "_init_kwargs", EasyDict())}
                meta = dict(type="class", version=4, module_src=src,
                            class_name=f"training.networks.{type(obj).__name__}", state=state)
                return pers._reconstruct_persistent_obj, (meta,)
            return NotImplemented

    torch.manual_seed(0)
    cfg = TriplaneBackboneConfig(
        mapping=MappingConfig(z_dim=16, c_dim=25, w_dim=32, num_layers=2),
        synthesis=SynthesisConfig(w_dim=32, img_resolution=16, img_channels=24, channel_base=128,
                                  channel_max=32),
        plane_channels=8)
    G = TriPlaneGenerator()
    G.backbone = TriplaneBackbone(cfg)
    G.superresolution = SuperResolution(scale=2, channels=8, w_dim=32)
    G.decoder = _OSGDecoder()
    with torch.no_grad():
        G.backbone.mapping.w_avg.normal_()
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    G._init_kwargs = EasyDict(z_dim=16, c_dim=25, w_dim=32, img_resolution=128,
                              rendering_kwargs=EasyDict(box_warp=1, depth_resolution=48,
                                                        superresolution_module="x.Hybrid2X"))
    if rk_loop:
        G._init_kwargs["rendering_kwargs"]["options"] = [G._init_kwargs["rendering_kwargs"]]
    with open(path, "wb") as f:
        Pickler(f, protocol=4).dump({"G": G, "G_ema": G, "D": None,
                                     "training_set_kwargs": EasyDict(resolution=128),
                                     "augment_pipe": None})
    return G


def test_eg3d_pickle_converts_and_loads_without_running_its_code(tmp_path, eg3d_modules):
    pers, EasyDict = eg3d_modules
    marker = tmp_path / "pwned"
    G = _eg3d_pickle(tmp_path / "net.pkl", pers, EasyDict, marker)
    out = convert_eg3d(str(tmp_path / "net.pkl"), str(tmp_path / "eg3d"))
    assert not marker.exists()
    backbone, sr, decoder, rk = load_eg3d(out)
    assert rk == {"box_warp": 1, "depth_resolution": 48, "superresolution_module": "x.Hybrid2X"}
    assert backbone.num_ws == G.backbone.num_ws == 6
    z, c = torch.randn(2, 16), torch.randn(2, 25)
    with torch.no_grad():
        p_ref, ws_ref = G.backbone(z, c, truncation_psi=0.7, truncation_cutoff=4,
                                   noise_mode="const")
        p, ws = backbone(z, c, truncation_psi=0.7, truncation_cutoff=4, noise_mode="const")
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0)
        rgb, feat = torch.randn(2, 3, 64, 64), torch.randn(2, 8, 64, 64)
        torch.testing.assert_close(sr(rgb, feat, ws), G.superresolution(rgb, feat, ws_ref),
                                   rtol=0, atol=0)
    # the decoder loads into pyface.nn.render.OSGDecoder (EG3D names) and matches
    feats = torch.randn(2, 3, 5, 8)
    ref = G.decoder.net(feats.mean(1))
    dec = decoder(feats)
    torch.testing.assert_close(dec["sigma"], ref[..., :1], rtol=0, atol=0)
    torch.testing.assert_close(dec["rgb"], torch.sigmoid(ref[..., 1:]) * 1.002 - 0.001)
    meta = ckpt.read_meta(out)
    assert meta["kind"] == "eg3d" and meta["config"]["backbone"]["synthesis"]["channel_base"] == 128


def test_eg3d_pickle_whose_module_tree_loops_is_a_clear_error(tmp_path, monkeypatch):
    """A network record among its own sub-modules (a damaged or crafted pickle) is refused
    naming the path, not a RecursionError; a sub-module registered twice is no loop."""
    import copyreg
    import types

    mod = types.ModuleType("training.networks")

    class Block:
        pass

    Block.__module__, Block.__qualname__ = "training.networks", "Block"
    mod.Block = Block
    monkeypatch.setitem(sys.modules, "training", types.ModuleType("training"))
    monkeypatch.setitem(sys.modules, "training.networks", mod)

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, Block):
                return copyreg.__newobj__, (Block,), obj.__dict__
            return NotImplemented

    def block(**children):
        b = Block()
        b._parameters = {"w": torch.ones(1)}
        b._buffers, b._modules = {}, collections.OrderedDict(children)
        return b

    shared = block()
    net = block(a=block(x=shared), b=shared)
    path = tmp_path / "dag.pkl"
    with open(path, "wb") as f:
        Pickler(f, protocol=4).dump(net)
    from pyface.convert import module_state_dict
    assert sorted(module_state_dict(restricted_load(str(path)))) == ["a.w", "a.x.w", "b.w", "w"]
    net._modules["a"]._modules["loop"] = net
    with open(path, "wb") as f:
        Pickler(f, protocol=4).dump({"G_ema": net})
    with pytest.raises(ConversionError, match=r"a\.loop: the network record contains itself"):
        convert_eg3d(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_eg3d_rendering_kwargs_in_a_loop_are_a_clear_error(tmp_path, eg3d_modules):
    pers, EasyDict = eg3d_modules
    _eg3d_pickle(tmp_path / "net.pkl", pers, EasyDict, tmp_path / "pwned", rk_loop=True)
    with pytest.raises(ConversionError, match="rendering_kwargs contain themselves"):
        convert_eg3d(str(tmp_path / "net.pkl"), str(tmp_path / "eg3d"))
    assert not (tmp_path / "eg3d").exists()


def test_eg3d_shape_mismatch_is_precise(tmp_path, eg3d_modules):
    pers, EasyDict = eg3d_modules
    G = _eg3d_pickle(tmp_path / "net.pkl", pers, EasyDict, tmp_path / "m")
    G.backbone.synthesis.b8.conv0.register_parameter(
        "weight", nn.Parameter(torch.zeros(16, 32, 1, 1)))
    # re-pickle the edited network
    G2 = G
    with open(tmp_path / "bad.pkl", "wb") as f:
        data = {"G_ema": G2}

        class P(pickle.Pickler):
            def reducer_override(self, obj):
                if isinstance(obj, nn.Module) and not type(obj).__module__.startswith("torch.nn"):
                    meta = dict(type="class", version=4, module_src="", class_name="x",
                                state={"_parameters": obj._parameters, "_buffers": obj._buffers,
                                       "_modules": obj._modules})
                    return pers._reconstruct_persistent_obj, (meta,)
                return NotImplemented
        P(f).dump(data)
    with pytest.raises(ckpt.CheckpointError,
                       match=r"shape mismatches: synthesis\.b8\.conv0\.weight: checkpoint "
                             r"\(16, 32, 1, 1\) vs model \(16, 32, 3, 3\)"):
        convert_eg3d(str(tmp_path / "bad.pkl"), str(tmp_path / "out"))
    with pytest.raises(ConversionError, match=r"expected a dict with 'G_ema'"):
        (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
        convert_eg3d(str(tmp_path / "list.pkl"), str(tmp_path / "out"))


# ------------------------------------------------------------------------------------------
# state-dict converters
# ------------------------------------------------------------------------------------------

def test_vgg19_convert_and_use(tmp_path):
    from pyface.nn.vgg import VGG19, PerceptualLoss

    torch.manual_seed(0)
    ref = VGG19()
    sd = {k: v for k, v in ref.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(4, 4)        # torchvision files carry a classifier
    torch.save(sd, tmp_path / "vgg19.pth")
    out = convert_vgg19(str(tmp_path / "vgg19.pth"), str(tmp_path / "vgg"))
    loss = PerceptualLoss(weights=out, layers=["relu1_1", "relu2_1"])
    torch.testing.assert_close(loss.vgg.features[0].weight, ref.features[0].weight)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert loss(x, x).item() == 0
    del sd["features.34.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys: features\.34\.bias"):
        convert_vgg19(str(tmp_path / "bad.pth"), str(tmp_path / "vgg2"))


def test_arcface_convert_infers_arch(tmp_path):
    from pyface.nn.arcface import IdentityLoss, IResNet

    net = IResNet("r18")
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    out = convert_arcface(str(tmp_path / "r18.pth"), str(tmp_path / "arc"))
    assert ckpt.read_meta(out)["config"] == {"arch": "r18"}
    IdentityLoss(arch="r18", weights=out)
    sd = net.state_dict()
    sd["fc.weight"] = torch.zeros(512, 10)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"fc\.weight: checkpoint \(512, 10\) vs "
                                                   r"model \(512, 25088\)"):
        convert_arcface(str(tmp_path / "bad.pth"), str(tmp_path / "arc2"))


def test_gfpgan_convert_checks_structure(tmp_path):
    from pyface.nn.gfpgan import GFPGANv1Clean

    sd = GFPGANv1Clean(out_size=16, narrow=1 / 32, num_style_feat=8, num_mlp=1).state_dict()
    torch.save({"params_ema": sd, "params": sd}, tmp_path / "gfp.pth")
    out = convert_gfpgan(str(tmp_path / "gfp.pth"), str(tmp_path / "gfp"))
    cfg = ckpt.read_meta(out)["config"]
    assert (cfg["out_size"], cfg["num_style_feat"], cfg["num_mlp"]) == (16, 8, 1)
    torch.save({"params_ema": {"toRGB.0.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match="not a GFPGANv1-clean state dict; missing"):
        convert_gfpgan(str(tmp_path / "bad.pth"), str(tmp_path / "gfp2"))
    sd = dict(sd, **{"toRGB.0.weight": torch.zeros(3, 5, 1, 1)})
    torch.save({"params_ema": sd}, tmp_path / "bad2.pth")
    with pytest.raises(ConversionError, match=r"toRGB.0.weight: checkpoint \(3, 5, 1, 1\)"):
        convert_gfpgan(str(tmp_path / "bad2.pth"), str(tmp_path / "gfp3"))


def test_torch_load_is_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ckpt.CheckpointError, match="weights_only=True"):
        convert_vgg19(str(tmp_path / "evil.pth"), str(tmp_path / "o"))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# SegFormer vs HuggingFace transformers
#
# Transcribed from transformers' SegFormer (models/segformer): the module tree and therefore the
# state-dict names and shapes, and the forward semantics, written here as an independent
# functional model. Nothing in this block uses pyface's SegFormer code.
# ------------------------------------------------------------------------------------------

def _hf_segformer_shapes(c: dict, *, head=True, num_labels=0, image_labels=0) -> dict:
    """Names and shapes of a transformers SegFormer state dict for config.json ``c``:
    ``SegformerForSemanticSegmentation`` (head=True), ``SegformerForImageClassification``
    (head=False, image_labels > 0) or ``SegformerModel`` (neither; no ``segformer.`` prefix)."""
    n = c["num_encoder_blocks"]
    pre = "segformer.encoder." if (head or image_labels) else "encoder."
    out = {}
    cin = c["num_channels"]
    for i in range(n):
        h, p = c["hidden_sizes"][i], c["patch_sizes"][i]
        e = f"{pre}patch_embeddings.{i}."
        out[e + "proj.weight"], out[e + "proj.bias"] = (h, cin, p, p), (h,)
        out[e + "layer_norm.weight"] = out[e + "layer_norm.bias"] = (h,)
        m = int(h * c["mlp_ratios"][i])
        for j in range(c["depths"][i]):
            b = f"{pre}block.{i}.{j}."
            for ln in ("layer_norm_1", "layer_norm_2"):
                out[b + ln + ".weight"] = out[b + ln + ".bias"] = (h,)
            for lin in ("query", "key", "value"):
                out[f"{b}attention.self.{lin}.weight"] = (h, h)
                out[f"{b}attention.self.{lin}.bias"] = (h,)
            sr = c["sr_ratios"][i]
            if sr > 1:
                out[b + "attention.self.sr.weight"] = (h, h, sr, sr)
                out[b + "attention.self.sr.bias"] = (h,)
                out[b + "attention.self.layer_norm.weight"] = (h,)
                out[b + "attention.self.layer_norm.bias"] = (h,)
            out[b + "attention.output.dense.weight"] = (h, h)
            out[b + "attention.output.dense.bias"] = (h,)
            out[b + "mlp.dense1.weight"], out[b + "mlp.dense1.bias"] = (m, h), (m,)
            out[b + "mlp.dwconv.dwconv.weight"] = (m, 1, 3, 3)
            out[b + "mlp.dwconv.dwconv.bias"] = (m,)
            out[b + "mlp.dense2.weight"], out[b + "mlp.dense2.bias"] = (h, m), (h,)
        out[f"{pre}layer_norm.{i}.weight"] = out[f"{pre}layer_norm.{i}.bias"] = (h,)
        cin = h
    D = c["decoder_hidden_size"]
    if head:
        for i in range(n):
            out[f"decode_head.linear_c.{i}.proj.weight"] = (D, c["hidden_sizes"][i])
            out[f"decode_head.linear_c.{i}.proj.bias"] = (D,)
        out["decode_head.linear_fuse.weight"] = (D, n * D, 1, 1)
        for k in ("weight", "bias", "running_mean", "running_var"):
            out["decode_head.batch_norm." + k] = (D,)
        out["decode_head.batch_norm.num_batches_tracked"] = ()
        out["decode_head.classifier.weight"] = (num_labels, D, 1, 1)
        out["decode_head.classifier.bias"] = (num_labels,)
    if image_labels:
        out["classifier.weight"] = (image_labels, c["hidden_sizes"][-1])
        out["classifier.bias"] = (image_labels,)
    return out


def _hf_random_state(shapes: dict, seed=0) -> dict:
    """Random weights, float32 values held in float64 (modules load them exactly, then run in
    float64 so that 1e-10 tolerances separate semantics from rounding)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shp in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
            continue
        if k.endswith("running_var"):
            v = torch.rand(shp, generator=g) + 0.5
        elif "norm" in k and k.endswith(".weight"):
            v = 1 + 0.2 * torch.randn(shp, generator=g)
        else:
            v = 0.3 * torch.randn(shp, generator=g)
        out[k] = v.double()
    return out


_HF_ACT = {"gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2 ** 0.5)),
           "gelu_new": lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5
                                                           * (x + 0.044715 * x ** 3)))}


def _hf_segformer_forward(sd: dict, c: dict, x: torch.Tensor, *, stop_at=None):
    """transformers' SegFormer forward (eval) from the documented semantics: every LayerNorm eps
    1e-5 (config.layer_norm_eps is not used), scores / sqrt(head_dim), Mix-FFN
    dense1 -> depthwise 3x3 -> act -> dense2, pre-norm residual blocks, per-stage norm; head:
    per-stage linear, bilinear (align_corners=False) to stage 1's size, concat in reverse order,
    1x1 fuse without bias, BatchNorm (eps 1e-5) + ReLU, classifier. ``stop_at``: "encoder",
    "fuse" (before BatchNorm) or "features" (before the classifier)."""
    ln = lambda t, p: torch.nn.functional.layer_norm(t, t.shape[-1:], sd[p + ".weight"],  # noqa
                                                     sd[p + ".bias"], 1e-5)
    lin = lambda t, p: t @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa
    F_ = torch.nn.functional
    pre = "segformer.encoder." if "segformer.encoder.patch_embeddings.0.proj.weight" in sd \
        else "encoder."
    B = x.shape[0]
    maps = []
    for i in range(c["num_encoder_blocks"]):
        p, s = c["patch_sizes"][i], c["strides"][i]
        e = f"{pre}patch_embeddings.{i}."
        y = F_.conv2d(x, sd[e + "proj.weight"], sd[e + "proj.bias"], stride=s, padding=p // 2)
        h, w = y.shape[-2:]
        t = ln(y.flatten(2).transpose(1, 2), e + "layer_norm")
        heads, sr = c["num_attention_heads"][i], c["sr_ratios"][i]
        for j in range(c["depths"][i]):
            b = f"{pre}block.{i}.{j}."
            a_in = ln(t, b + "layer_norm_1")
            C = a_in.shape[-1]
            kv = a_in
            if sr > 1:
                kv = F_.conv2d(a_in.transpose(1, 2).reshape(B, C, h, w),
                               sd[b + "attention.self.sr.weight"], sd[b + "attention.self.sr.bias"],
                               stride=sr)
                kv = ln(kv.flatten(2).transpose(1, 2), b + "attention.self.layer_norm")
            hd = C // heads
            split = lambda z: z.reshape(B, -1, heads, hd).permute(0, 2, 1, 3)  # noqa
            q = split(lin(a_in, b + "attention.self.query"))
            k = split(lin(kv, b + "attention.self.key"))
            v = split(lin(kv, b + "attention.self.value"))
            att = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, dim=-1) @ v
            att = att.permute(0, 2, 1, 3).reshape(B, -1, C)
            t = t + lin(att, b + "attention.output.dense")
            m_in = lin(ln(t, b + "layer_norm_2"), b + "mlp.dense1")
            M = m_in.shape[-1]
            m_in = F_.conv2d(m_in.transpose(1, 2).reshape(B, M, h, w),
                             sd[b + "mlp.dwconv.dwconv.weight"], sd[b + "mlp.dwconv.dwconv.bias"],
                             padding=1, groups=M).flatten(2).transpose(1, 2)
            t = t + lin(_HF_ACT[c["hidden_act"]](m_in), b + "mlp.dense2")
        t = ln(t, f"{pre}layer_norm.{i}")
        x = t.transpose(1, 2).reshape(B, -1, h, w)
        maps.append(x)
    if stop_at == "encoder":
        return maps
    ups = []
    for i, f in enumerate(maps):
        y = lin(f.flatten(2).transpose(1, 2), f"decode_head.linear_c.{i}.proj")
        y = y.transpose(1, 2).reshape(B, -1, *f.shape[-2:])
        ups.append(F_.interpolate(y, size=maps[0].shape[-2:], mode="bilinear", align_corners=False))
    y = F_.conv2d(torch.cat(ups[::-1], 1), sd["decode_head.linear_fuse.weight"])
    if stop_at == "fuse":
        return y
    bn = "decode_head.batch_norm."
    y = torch.relu(F_.batch_norm(y, sd[bn + "running_mean"], sd[bn + "running_var"],
                                 sd[bn + "weight"], sd[bn + "bias"], False, 0.0, 1e-5))
    if stop_at == "features":
        return y
    return F_.conv2d(y, sd["decode_head.classifier.weight"], sd["decode_head.classifier.bias"])


# the shape of nvidia/segformer-b0-finetuned-ade-512-512's config.json (layer_norm_eps as released)
_B0 = {"num_channels": 3, "num_encoder_blocks": 4, "hidden_sizes": [32, 64, 160, 256],
       "depths": [2, 2, 2, 2], "num_attention_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1],
       "patch_sizes": [7, 3, 3, 3], "strides": [4, 2, 2, 2], "mlp_ratios": [4, 4, 4, 4],
       "hidden_act": "gelu", "layer_norm_eps": 1e-6, "decoder_hidden_size": 256,
       "drop_path_rate": 0.1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
       "classifier_dropout_prob": 0.1, "reshape_last_stage": True}
# a tiny config with what the real ones do not exercise: uneven per-stage MLP ratios, tanh GELU
_TINY = {**_B0, "hidden_sizes": [8, 16, 24, 32], "depths": [1, 2, 1, 1],
         "num_attention_heads": [1, 2, 3, 4], "sr_ratios": [4, 2, 1, 1],
         "mlp_ratios": [4, 2, 3, 1.5], "hidden_act": "gelu_new", "decoder_hidden_size": 12}


def _hf_folder(d, c, state, name="model.safetensors"):
    import json

    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / name))
    else:
        torch.save(state, d / name)
    (d / "config.json").write_text(json.dumps(c))
    return str(d)


def test_segformer_b0_keys_match_transformers():
    from pyface.nn.segformer import SegFormer, config_from_hf, mit_config

    shapes = _hf_segformer_shapes(_B0, num_labels=150)
    # spot checks of the transcription against the released segformer-b0 (ADE20k) layout
    assert shapes["segformer.encoder.patch_embeddings.0.proj.weight"] == (32, 3, 7, 7)
    assert shapes["segformer.encoder.block.0.1.attention.self.sr.weight"] == (32, 32, 8, 8)
    assert shapes["segformer.encoder.block.3.1.mlp.dwconv.dwconv.weight"] == (1024, 1, 3, 3)
    assert "segformer.encoder.block.3.0.attention.self.sr.weight" not in shapes
    assert shapes["decode_head.linear_fuse.weight"] == (256, 1024, 1, 1)
    assert shapes["decode_head.classifier.weight"] == (150, 256, 1, 1)
    with torch.device("meta"):
        ours = SegFormer(mit_config("b0"), num_labels=150).state_dict()
    theirs = {k.removeprefix("segformer."): v for k, v in shapes.items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == theirs


def test_segformer_matches_transformers_forward(tmp_path):
    from pyface.nn.segformer import config_from_hf, load_segformer

    sd = _hf_random_state(_hf_segformer_shapes(_TINY, num_labels=5))
    d = _hf_folder(tmp_path / "hf", _TINY, sd)
    cfg = config_from_hf(d)
    assert cfg.layer_norm_eps == 1e-5 and cfg.mlp_ratios == [4, 2, 3, 1.5]
    assert cfg.hidden_act == "gelu_new" and cfg.drop_path_rate == 0.1
    model = load_segformer(d).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = _hf_segformer_forward(sd, _TINY, x)
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)
    # what the test would catch: the released layer_norm_eps (1e-6) or the exact GELU
    for wrong in ({"layer_norm_eps": 1e-6}, {"hidden_act": "gelu"}):
        m = load_segformer(d, **wrong).double().eval()
        assert (m(x) - want).abs().max() > 1e-8, wrong
    # training mode: drop path and dropout are active, eval is deterministic
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), model(x))


def test_config_from_hf_honours_or_refuses(tmp_path):
    import json

    from pyface.nn.segformer import MixTransformer, config_from_hf

    three = {**_TINY, "num_encoder_blocks": 3}
    for k in ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes",
              "strides", "mlp_ratios"):
        three[k] = three[k][:3]
    (tmp_path / "config.json").write_text(json.dumps(three))
    cfg = config_from_hf(str(tmp_path))
    assert cfg.num_stages == 3
    assert len(MixTransformer(cfg)(torch.randn(1, 3, 16, 16))) == 3
    cfg = config_from_hf(str(tmp_path), in_channels=6, hidden_act="gelu", head_norm=False)
    assert (cfg.in_channels, cfg.hidden_act, cfg.head_norm) == (6, "gelu", False)
    with pytest.raises(TypeError, match="unknown MiTConfig fields"):
        config_from_hf(str(tmp_path), num_channels=6)
    (tmp_path / "config.json").write_text(json.dumps({**three, "num_encoder_blocks": 4}))
    with pytest.raises(ValueError, match="num_encoder_blocks = 4"):
        config_from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**three, "hidden_act": "mish"}))
    with pytest.raises(ValueError, match="hidden_act 'mish' is not supported"):
        config_from_hf(str(tmp_path))


def test_convert_segformer_segmentation(tmp_path):
    from pyface.convert import ConversionWarning
    from pyface.nn.segformer import SegFormer, config_from_hf, load_hf_segformer, load_segformer

    sd = _hf_random_state(_hf_segformer_shapes(_TINY, num_labels=5))
    d = _hf_folder(tmp_path / "hf", {**_TINY, "id2label": {str(i): f"c{i}" for i in range(5)}},
                   sd, name="pytorch_model.bin")
    with pytest.warns(ConversionWarning, match=r"dropped the segmentation classifier .*5 labels"):
        out = convert_segformer(d, str(tmp_path / "seg"))
    meta = ckpt.read_meta(out)
    assert meta["extra"]["dropped"] == ["decode_head.classifier.weight",
                                        "decode_head.classifier.bias"]
    tensors, _ = ckpt.load_folder(out)
    assert not any("classifier" in k for k in tensors)
    # the folder reads back: config and weights
    cfg = config_from_hf(out)
    assert cfg == config_from_hf(d)
    model = SegFormer(cfg).double().eval()
    assert load_hf_segformer(model, out) == []
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(model(x), _hf_segformer_forward(sd, _TINY, x, stop_at="features"))
    # keep_classifier keeps the logits and the labels
    out2 = convert_segformer(d, str(tmp_path / "seg2"), keep_classifier=True)
    assert ckpt.read_meta(out2)["extra"]["id2label"]["4"] == "c4"
    m2 = load_segformer(out2).double().eval()
    torch.testing.assert_close(m2(x), _hf_segformer_forward(sd, _TINY, x))
    # GOHA's head: no BatchNorm / ReLU; the file's batch_norm is dropped
    m3 = load_segformer(d, head_norm=False, num_labels=0).double().eval()
    assert m3.decode_head.batch_norm is None
    torch.testing.assert_close(m3(x), _hf_segformer_forward(sd, _TINY, x, stop_at="fuse"))


@pytest.mark.parametrize("layout", ["image_classification", "model"])
def test_convert_segformer_encoder_only(tmp_path, layout):
    from pyface.convert import ConversionWarning
    from pyface.nn.segformer import MixTransformer, SegFormer, load_hf_segformer, load_segformer

    shapes = _hf_segformer_shapes(_TINY, head=False,
                                  image_labels=10 if layout == "image_classification" else 0)
    sd = _hf_random_state(shapes)
    d = _hf_folder(tmp_path / "hf", _TINY, sd)
    with pytest.warns(ConversionWarning) as rec:
        out = convert_segformer(d, str(tmp_path / "seg"))
    assert any("encoder-only checkpoint" in str(w.message) for w in rec)
    tensors, meta = ckpt.load_folder(out)
    assert all(k.startswith("encoder.") for k in tensors)   # no random decode head saved
    assert meta["extra"]["decode_head"] is False
    if layout == "image_classification":
        assert sorted(meta["extra"]["dropped"]) == ["classifier.bias", "classifier.weight"]
        assert any("image-classification head" in str(w.message) for w in rec)
    enc = load_segformer(out).double().eval()
    assert isinstance(enc, MixTransformer)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    for a, b in zip(enc(x), _hf_segformer_forward(sd, _TINY, x, stop_at="encoder")):
        torch.testing.assert_close(a, b)
    # a full SegFormer may load it; the head stays at its initialisation and is reported
    left = load_hf_segformer(SegFormer(enc.cfg), out)
    assert left and all(k.startswith("decode_head.") for k in left)
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        load_hf_segformer(SegFormer(enc.cfg), out, allow_missing_head=False)


def test_segformer_six_channel_stem(tmp_path):
    from pyface.nn.segformer import STEM_KEYS, MixTransformer, SegFormer, config_from_hf, \
        load_hf_segformer

    sd = _hf_random_state(_hf_segformer_shapes(_TINY, num_labels=5))
    d = _hf_folder(tmp_path / "hf", _TINY, sd)
    cfg6 = config_from_hf(d, in_channels=6)
    with pytest.raises(ckpt.CheckpointError, match=r"patch_embeddings.0.proj.weight.*skip="):
        load_hf_segformer(SegFormer(cfg6), d)
    torch.manual_seed(0)
    model = SegFormer(cfg6).double()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    left = load_hf_segformer(model, d, skip=STEM_KEYS)
    assert sorted(left) == sorted(STEM_KEYS)
    own = model.state_dict()
    for k, v in own.items():
        if k in STEM_KEYS:
            assert torch.equal(v, fresh[k])      # the stem is the fresh one
        elif "classifier" not in k:
            torch.testing.assert_close(v, sd.get("segformer." + k, sd.get(k)).to(v), msg=k)
    # replace: a stem widened from the pretrained one reproduces the 3-channel model on x ‖ x
    w = sd["segformer.encoder.patch_embeddings.0.proj.weight"]
    model = SegFormer(cfg6).double().eval()
    assert load_hf_segformer(model, d, replace={STEM_KEYS[0]: torch.cat([w, w], 1) / 2}) == []
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(model(torch.cat([x, x], 1)),
                               _hf_segformer_forward(sd, _TINY, x, stop_at="features"))
    enc = MixTransformer(cfg6)
    assert sorted(load_hf_segformer(enc, d, skip=["patch_embeddings.0.proj.*"])) == \
        ["patch_embeddings.0.proj.bias", "patch_embeddings.0.proj.weight"]
    with pytest.raises(ValueError, match="matches no key"):
        load_hf_segformer(SegFormer(cfg6), d, skip=["encoder.stem.*"])
    with pytest.raises(ValueError, match="expected shape"):
        load_hf_segformer(SegFormer(cfg6), d, replace={STEM_KEYS[0]: w})


# ------------------------------------------------------------------------------------------
# face-vid2vid / LivePortrait dense motion
#
# Transcribed from the face-vid2vid reimplementation's DenseMotionNetwork / Hourglass (the same
# module tree in LivePortrait): names, shapes and the forward, independent of pyface.nn.motion.
# ------------------------------------------------------------------------------------------

def _fv2v_dense_motion_shapes(num_kp=15, feature_channel=32, compress=4, block_expansion=32,
                              num_blocks=5, max_features=1024, reshape_depth=16,
                              occlusion=True, prefix="dense_motion_network.") -> dict:
    def bn(p, c):
        return {p + "weight": (c,), p + "bias": (c,), p + "running_mean": (c,),
                p + "running_var": (c,), p + "num_batches_tracked": ()}

    out = {}
    in_features = (num_kp + 1) * (compress + 1)
    width = lambda i: min(max_features, block_expansion * 2 ** i)  # noqa
    for i in range(num_blocks):      # Encoder: DownBlock3d(conv 3x3x3, norm, avg pool (1, 2, 2))
        cin = in_features if i == 0 else width(i)
        p = f"{prefix}hourglass.encoder.down_blocks.{i}."
        out[p + "conv.weight"], out[p + "conv.bias"] = (width(i + 1), cin, 3, 3, 3), (width(i + 1),)
        out.update(bn(p + "norm.", width(i + 1)))
    for n, i in enumerate(reversed(range(num_blocks))):     # Decoder: UpBlock3d, deepest first
        cin = (1 if i == num_blocks - 1 else 2) * width(i + 1)
        p = f"{prefix}hourglass.decoder.up_blocks.{n}."
        out[p + "conv.weight"], out[p + "conv.bias"] = (width(i), cin, 3, 3, 3), (width(i),)
        out.update(bn(p + "norm.", width(i)))
    of = block_expansion + in_features
    out[prefix + "hourglass.decoder.conv.weight"] = (of, of, 3, 3, 3)
    out[prefix + "hourglass.decoder.conv.bias"] = (of,)
    out.update(bn(prefix + "hourglass.decoder.norm.", of))
    out[prefix + "mask.weight"] = (num_kp + 1, of, 7, 7, 7)
    out[prefix + "mask.bias"] = (num_kp + 1,)
    out[prefix + "compress.weight"] = (compress, feature_channel, 1, 1, 1)
    out[prefix + "compress.bias"] = (compress,)
    out.update(bn(prefix + "norm.", compress))
    if occlusion:
        out[prefix + "occlusion.weight"] = (1, of * reshape_depth, 7, 7)
        out[prefix + "occlusion.bias"] = (1,)
    return out


def _fv2v_dense_motion_forward(sd, feature, kp_driving, kp_source, num_blocks):
    """face-vid2vid's DenseMotionNetwork.forward(feature, kp_driving, kp_source) (eval mode)."""
    F_ = torch.nn.functional

    def bn(x, p):
        return F_.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"],
                             sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5)

    x = F_.relu(bn(F_.conv3d(feature, sd["compress.weight"], sd["compress.bias"]), "norm"))
    B, C, D, H, W = x.shape
    K = kp_source.shape[1]
    lin = lambda n: 2 * torch.arange(n, dtype=x.dtype) / (n - 1) - 1  # noqa
    z, y, xx = torch.meshgrid(lin(D), lin(H), lin(W), indexing="ij")
    grid = torch.stack([xx, y, z], -1)                                   # (D, H, W, 3): x, y, z
    sparse = grid - kp_driving.view(B, K, 1, 1, 1, 3) + kp_source.view(B, K, 1, 1, 1, 3)
    sparse = torch.cat([grid.expand(B, 1, D, H, W, 3), sparse], 1)    # (B, K+1, D, H, W, 3)
    rep = x.unsqueeze(1).expand(B, K + 1, C, D, H, W).reshape(B * (K + 1), C, D, H, W)
    deformed = F_.grid_sample(rep, sparse.reshape(B * (K + 1), D, H, W, 3),
                              align_corners=False).view(B, K + 1, C, D, H, W)
    gauss = lambda kp: torch.exp(-0.5 * ((grid - kp.view(B, K, 1, 1, 1, 3)) ** 2).sum(-1)  # noqa
                                 / 0.01)
    heat = torch.cat([torch.zeros(B, 1, D, H, W, dtype=x.dtype),
                      gauss(kp_driving) - gauss(kp_source)], 1).unsqueeze(2)
    outs = [torch.cat([heat, deformed], 2).view(B, -1, D, H, W)]
    for i in range(num_blocks):
        p = f"hourglass.encoder.down_blocks.{i}"
        o = F_.conv3d(outs[-1], sd[p + ".conv.weight"], sd[p + ".conv.bias"], padding=1)
        outs.append(F_.avg_pool3d(F_.relu(bn(o, p + ".norm")), (1, 2, 2)))
    out = outs.pop()
    for i in range(num_blocks):
        p = f"hourglass.decoder.up_blocks.{i}"
        o = F_.conv3d(F_.interpolate(out, scale_factor=(1, 2, 2)), sd[p + ".conv.weight"],
                      sd[p + ".conv.bias"], padding=1)
        out = torch.cat([F_.relu(bn(o, p + ".norm")), outs.pop()], 1)
    pred = F_.relu(bn(F_.conv3d(out, sd["hourglass.decoder.conv.weight"],
                                sd["hourglass.decoder.conv.bias"], padding=1),
                      "hourglass.decoder.norm"))
    mask = torch.softmax(F_.conv3d(pred, sd["mask.weight"], sd["mask.bias"], padding=3), 1)
    deformation = (sparse.permute(0, 1, 5, 2, 3, 4) * mask.unsqueeze(2)).sum(1)
    occ = torch.sigmoid(F_.conv2d(pred.reshape(B, -1, H, W), sd["occlusion.weight"],
                                  sd["occlusion.bias"], padding=3))
    return {"mask": mask, "deformation": deformation.permute(0, 2, 3, 4, 1),
            "occlusion_map": occ}


_SMALL_DM = dict(num_kp=3, feature_channel=6, compress=2, block_expansion=4, num_blocks=2,
                 max_features=8, reshape_depth=4)


def test_dense_motion_keys_match_face_vid2vid():
    from pyface.convert import rename_dense_motion_key
    from pyface.nn import DenseMotion

    shapes = _fv2v_dense_motion_shapes()      # vox-256: K = 15, 5 blocks, 1024 max, depth 16
    assert shapes["dense_motion_network.hourglass.encoder.down_blocks.0.conv.weight"] == \
        (64, 80, 3, 3, 3)
    assert shapes["dense_motion_network.hourglass.decoder.up_blocks.0.conv.weight"] == \
        (512, 1024, 3, 3, 3)
    assert shapes["dense_motion_network.hourglass.decoder.up_blocks.4.conv.weight"] == \
        (32, 128, 3, 3, 3)
    assert shapes["dense_motion_network.hourglass.decoder.conv.weight"] == (112, 112, 3, 3, 3)
    assert shapes["dense_motion_network.mask.weight"] == (16, 112, 7, 7, 7)
    assert shapes["dense_motion_network.occlusion.weight"] == (1, 1792, 7, 7)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in DenseMotion().state_dict().items()}
    assert {rename_dense_motion_key(k.removeprefix("dense_motion_network.")): v
            for k, v in shapes.items()} == ours
    assert rename_dense_motion_key("hourglass.decoder.up_blocks.3.norm.running_var") == \
        "hourglass.up.3.norm.running_var"
    assert rename_dense_motion_key("hourglass.decoder.norm.bias") == "hourglass.norm.bias"
    assert rename_dense_motion_key("compress.weight") == "compress.weight"


@pytest.mark.parametrize("layout", ["face-vid2vid", "liveportrait", "bare"])
def test_convert_dense_motion(tmp_path, layout):
    import math

    from pyface.convert import ConversionWarning, convert_dense_motion, load_dense_motion
    from pyface.nn import FACE_VID2VID_PI

    shapes = _fv2v_dense_motion_shapes(**_SMALL_DM)
    sd = _hf_random_state(shapes, seed=3)
    if layout == "liveportrait":     # old files lack BatchNorm counters; fill them with 0
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        sd.update({"third.conv.weight": torch.zeros(2, 2, 3, 3), "fourth.weight": torch.zeros(1)})
        blob = sd
    elif layout == "face-vid2vid":
        blob = {"generator": {**sd, "first.conv.weight": torch.zeros(2, 3, 7, 7)},
                "kp_detector": {"x": torch.zeros(1)}, "epoch": 3}
    else:
        blob = {k.removeprefix("dense_motion_network."): v for k, v in sd.items()}
    torch.save(blob, tmp_path / "ckpt.pth")
    if layout == "bare":
        with pytest.warns(ConversionWarning, match="does not tell face-vid2vid from LivePortrait"):
            out = convert_dense_motion(str(tmp_path / "ckpt.pth"), str(tmp_path / "dm"))
    else:
        out = convert_dense_motion(str(tmp_path / "ckpt.pth"), str(tmp_path / "dm"))
    model, extra = load_dense_motion(out)
    assert extra["layout"] == ("liveportrait" if layout == "liveportrait" else "face-vid2vid")
    assert extra["pi"] == (math.pi if layout == "liveportrait" else FACE_VID2VID_PI)
    c = model.config
    assert (c.num_kp, c.feature_channel, c.compress, c.block_expansion, c.num_blocks,
            c.reshape_depth) == (3, 6, 2, 4, 2, 4)
    model = model.double().eval()
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 6, 4, 8, 8, generator=g, dtype=torch.float64)
    kp_s = torch.rand(2, 3, 3, generator=g, dtype=torch.float64) * 1.6 - 0.8
    kp_d = torch.rand(2, 3, 3, generator=g, dtype=torch.float64) * 1.6 - 0.8
    up = {k.removeprefix("dense_motion_network."): v for k, v in sd.items()}
    want = _fv2v_dense_motion_forward(up, feature, kp_d, kp_s, num_blocks=2)  # upstream order
    got = model(feature, kp_source=kp_s, kp_driving=kp_d, return_deformation=True)
    for key in ("mask", "deformation", "occlusion_map"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-9, msg=key)


def test_convert_dense_motion_errors(tmp_path):
    from pyface.convert import convert_dense_motion

    sd = _hf_random_state(_fv2v_dense_motion_shapes(**_SMALL_DM))
    del sd["dense_motion_network.hourglass.decoder.up_blocks.1.conv.bias"]
    torch.save({"generator": sd}, tmp_path / "a.pth")
    with pytest.raises(ConversionError, match=r"missing keys: hourglass.up.1.conv.bias"):
        convert_dense_motion(str(tmp_path / "a.pth"), str(tmp_path / "o"))
    torch.save({"generator": {"first.conv.weight": torch.zeros(1)}}, tmp_path / "b.pth")
    with pytest.raises(ConversionError, match="no hourglass down blocks"):
        convert_dense_motion(str(tmp_path / "b.pth"), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="layout: expected"):
        convert_dense_motion(str(tmp_path / "b.pth"), str(tmp_path / "o"), layout="fomm")


def test_cli_convert(tmp_path, eg3d_modules, capsys):
    from pyface.cli import main

    pers, EasyDict = eg3d_modules
    _eg3d_pickle(tmp_path / "net.pkl", pers, EasyDict, tmp_path / "m")
    assert main(["convert", "eg3d", str(tmp_path / "net.pkl"), str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "tensors.safetensors").is_file()
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Evil(tmp_path / "x")))
    assert main(["convert", "eg3d", str(tmp_path / "evil.pkl"), str(tmp_path / "o2")]) == 1
    assert "refusing to load global posix.system" in capsys.readouterr().err


def test_cli_convert_segformer_and_dense_motion(tmp_path, capsys):
    from pyface.cli import main

    sd = _hf_random_state(_hf_segformer_shapes(_TINY, num_labels=5))
    d = _hf_folder(tmp_path / "hf", _TINY, sd)
    assert main(["convert", "segformer", d, str(tmp_path / "seg")]) == 0
    cap = capsys.readouterr()
    assert "note:" in cap.err and "decode_head.classifier (5 labels)" in cap.err
    assert cap.out.strip() == str(tmp_path / "seg")
    assert main(["convert", "segformer", "--keep-classifier", d, str(tmp_path / "seg2")]) == 0
    assert ckpt.read_meta(str(tmp_path / "seg2"))["extra"]["num_labels"] == 5
    torch.save(_hf_random_state(_fv2v_dense_motion_shapes(**_SMALL_DM)), tmp_path / "w.pth")
    assert main(["convert", "dense-motion", "--layout", "liveportrait", str(tmp_path / "w.pth"),
                 str(tmp_path / "dm")]) == 0
    assert ckpt.read_meta(str(tmp_path / "dm"))["extra"]["layout"] == "liveportrait"
    torch.save({"generator": {}}, tmp_path / "empty.pth")
    assert main(["convert", "dense-motion", str(tmp_path / "empty.pth"), str(tmp_path / "x")]) == 1
    assert "no hourglass down blocks" in capsys.readouterr().err


def test_cli_convert_refuses_an_out_that_is_not_its_own_and_explains_wrong_inputs(tmp_path,
                                                                                   capsys):
    """OUT: a folder of other files, a file, or a path below a file is refused before anything is
    read (nothing in it changes); an earlier weights folder is replaced. Wrong SRC kinds (a
    folder, a .pth given to eg3d, a file given to segformer, garbage) are one-line messages."""
    from pyface.cli import main
    from pyface.nn.vgg import VGG19

    torch.save({k: torch.zeros_like(v) for k, v in VGG19().state_dict().items()},
               tmp_path / "vgg.pth")
    user = tmp_path / "weights"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    src = str(tmp_path / "vgg.pth")
    # an OUT that cannot be one: exit code 2 (README: exit codes)
    assert main(["convert", "vgg19", src, str(user)]) == 2
    assert "weights: the folder holds other files" in capsys.readouterr().err
    assert os.listdir(user) == ["notes.txt"]
    assert main(["convert", "vgg19", src, src]) == 2
    assert "vgg.pth: the same path as OUT" in capsys.readouterr().err
    assert main(["convert", "vgg19", src, os.path.join(src, "out")]) == 2
    assert "vgg.pth is a file" in capsys.readouterr().err
    assert main(["convert", "vgg19", src, str(tmp_path / "v")]) == 0
    assert main(["convert", "vgg19", src, str(tmp_path / "v")]) == 0      # replaces its own folder
    assert ckpt.read_meta(str(tmp_path / "v"))["kind"] == "vgg19"
    assert sorted(os.listdir(tmp_path)) == ["v", "vgg.pth", "weights"]    # no temporaries
    capsys.readouterr()
    (tmp_path / "junk.pkl").write_text("hello")
    for fmt_, bad, msg in [("eg3d", src, "a torch.save archive (.pth), not an EG3D network "
                                         "pickle"),
                           ("eg3d", str(user), "a folder; expected an EG3D network pickle"),
                           ("eg3d", str(tmp_path / "junk.pkl"), "not an EG3D network pickle"),
                           ("segformer", src, "a file; expected a HuggingFace SegFormer folder"),
                           ("vgg19", str(user), "a folder without meta.json; expected a weights "
                                                "file")]:
        assert main(["convert", fmt_, bad, str(tmp_path / "o")]) == 1, (fmt_, bad)
        err = capsys.readouterr().err
        assert err.startswith(f"pyface convert {fmt_}: ") and msg in err, err
        assert not (tmp_path / "o").exists()
