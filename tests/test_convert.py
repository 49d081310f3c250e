"""Converters: the restricted unpickler refuses code and never runs embedded sources; EG3D-
structured pickles, torchvision VGG19, insightface ArcFace, GFPGAN and HF SegFormer files convert
and load; mismatches give precise errors."""
from __future__ import annotations

import collections
import os
import pickle
import sys
import types

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


@pytest.fixture
def eg3d_modules(monkeypatch):
    """Stand-ins for EG3D's torch_utils.persistence and dnnlib.util, so that the test pickle
    references exactly the globals an official one does."""
    tu, pers = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dn, dnu = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):  # what EG3D would run (exec of module_src)
        raise AssertionError("must never be called by pyface")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    pers._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    dnu.EasyDict = EasyDict
    tu.persistence, dn.util = pers, dnu
    for name, mod in [("torch_utils", tu), ("torch_utils.persistence", pers), ("dnnlib", dn),
                      ("dnnlib.util", dnu)]:
        monkeypatch.setitem(sys.modules, name, mod)
    return pers, EasyDict


class _OSGDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(FullyConnectedLayer(8, 16, lr_multiplier=1), nn.Softplus(),
                                 FullyConnectedLayer(16, 9))


class TriPlaneGenerator(nn.Module):
    pass


def _eg3d_pickle(path, pers, EasyDict, marker):
    """Write an EG3D-like pickle: persistent classes carry a module_src that would create
    ``marker`` if it were executed."""
    src = f"open({str(marker)!r}, 'w').write('pwned')\n"

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, nn.Module) and not type(obj).__module__.startswith("torch.nn"):
                state = {"_parameters": collections.OrderedDict(obj._parameters),
                         "_buffers": collections.OrderedDict(obj._buffers),
                         "_non_persistent_buffers_set": set(obj._non_persistent_buffers_set),
                         "_modules": collections.OrderedDict(obj._modules),
                         "training": obj.training,
                         "init_kwargs": getattr(obj, "_init_kwargs", EasyDict())}
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
    keys = ["conv_body_first.weight", "final_linear.weight", "stylegan_decoder.style_mlp.1.weight",
            "stylegan_decoder.to_rgbs.0.weight", "conv_body_down.0.conv1.weight",
            "conv_body_down.1.conv1.weight", "conv_body_up.0.conv1.weight",
            "condition_scale.0.0.weight", "condition_shift.0.0.weight", "toRGB.0.weight"]
    sd = {k: torch.zeros(4, 3, 1, 1) if k == "conv_body_first.weight" else torch.zeros(8, 4)
          for k in keys}
    torch.save({"params_ema": sd, "params": sd}, tmp_path / "gfp.pth")
    out = convert_gfpgan(str(tmp_path / "gfp.pth"), str(tmp_path / "gfp"))
    assert ckpt.read_meta(out)["config"]["num_down"] == 2
    torch.save({"params_ema": {"toRGB.0.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match="not a GFPGANv1-clean state dict; missing"):
        convert_gfpgan(str(tmp_path / "bad.pth"), str(tmp_path / "gfp2"))


def test_torch_load_is_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ckpt.CheckpointError, match="weights_only=True"):
        convert_vgg19(str(tmp_path / "evil.pth"), str(tmp_path / "o"))
    assert not marker.exists()


def test_segformer_hf_folder(tmp_path):
    import json

    from pyface.nn.segformer import SegFormer, load_hf_segformer, mit_config
    from safetensors.torch import save_file

    cfg = mit_config("b0", decoder_hidden_size=16, depths=[1, 1, 1, 1])
    ref = SegFormer(cfg, num_labels=5)
    hf = {"segformer." + k if k.startswith("encoder.") else k: v.contiguous()
          for k, v in ref.state_dict().items() if "num_batches_tracked" not in k}
    d = tmp_path / "hf"
    d.mkdir()
    save_file(hf, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "num_channels": 3, "hidden_sizes": cfg.hidden_sizes, "depths": cfg.depths,
        "num_attention_heads": cfg.num_heads, "sr_ratios": cfg.sr_ratios,
        "patch_sizes": cfg.patch_sizes, "strides": cfg.strides, "mlp_ratios": [4, 4, 4, 4],
        "decoder_hidden_size": 16}))
    out = convert_segformer(str(d), str(tmp_path / "seg"))
    assert ckpt.read_meta(out)["kind"] == "segformer"
    # conditioned encoder: pretrained weights load, the zero-initialised ada layers stay
    cond = SegFormer(mit_config("b0", decoder_hidden_size=16, depths=[1, 1, 1, 1], cond_dim=4))
    left = load_hf_segformer(cond, str(d))
    assert left and all(".ada." in k or "num_batches" in k for k in left)
    x = torch.randn(1, 3, 32, 32)
    ref.decode_head.classifier = None
    cond.eval(), ref.eval()
    torch.testing.assert_close(cond(x, torch.randn(1, 4)), ref(x))
    (d / "model.safetensors").unlink()
    save_file({k: v for k, v in hf.items() if "query" not in k}, str(d / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="SegFormer weights do not fit .*query"):
        load_hf_segformer(SegFormer(cfg), str(d))


def test_cli_convert(tmp_path, eg3d_modules, capsys):
    from pyface.cli import main

    pers, EasyDict = eg3d_modules
    _eg3d_pickle(tmp_path / "net.pkl", pers, EasyDict, tmp_path / "m")
    assert main(["convert", "eg3d", str(tmp_path / "net.pkl"), str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "tensors.safetensors").is_file()
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Evil(tmp_path / "x")))
    assert main(["convert", "eg3d", str(tmp_path / "evil.pkl"), str(tmp_path / "o2")]) == 1
    assert "refusing to load global posix.system" in capsys.readouterr().err
