# Provenance: the transcription below reproduces the checkpoint key layout and the controller's
# forward semantics of OTAvatar (theEricMa/OTAvatar, commit c8c484f, CC BY-NC-SA 4.0), written
# from its documented behaviour; no upstream code is copied.
"""``pyface convert otavatar``: OTAvatar's released checkpoint against a hand transcription of
its layout (``net_Warp_ema`` / ``net_G_ema`` and the trained copies, ``module.`` prefixes, the
weight-tied MLP stored five times under ``mapping_Refine.{0,2,4,6,8}``).

The transcription below is written from the documented layout of theEricMa/OTAvatar (the key
names of its VideoCodeBook controller: ``mapping_3DMM.first.0`` Conv1d(70, 256, 7),
``mapping_3DMM.encoder{0,1,2}.1`` Conv1d(256, 256, 3, dilation 3), ``mapping_Refine`` =
[Linear(256, 256), LeakyReLU(0.1)] x 5 with ONE Linear instance, then Linear(256, 300) at index
10, ``direction.weight`` (512, 20)); nothing here uses pyface's controller code to build it. The
generator entry uses EG3D's names (tested against EG3D's structure in test_model_eg3d.py), with
tiny channels and w_dim 512 / 14 W+ layers, as in the release.
"""
from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.nn.functional as F

from pyface.checkpoint import CheckpointError, load_weights
from pyface.convert import ConversionError, ConversionWarning, convert_otavatar
from pyface.models.eg3d import EG3DGenerator, EG3DGeneratorConfig
from pyface.models.otavatar.convert import load_controller
from pyface.nn import MotionController


def release_controller_keys(coeff=70, d=256, k=7, layers=3, mlp=5, n=20, num_ws=14,
                            w_dim=512) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the release's controller state dict (without ``module.``)."""
    S = {"mapping_3DMM.first.0.weight": (d, coeff, k), "mapping_3DMM.first.0.bias": (d,)}
    for i in range(layers):
        S[f"mapping_3DMM.encoder{i}.1.weight"] = (d, d, 3)
        S[f"mapping_3DMM.encoder{i}.1.bias"] = (d,)
    for j in range(mlp):                       # the same Linear, saved once per appearance
        S[f"mapping_Refine.{2 * j}.weight"] = (d, d)
        S[f"mapping_Refine.{2 * j}.bias"] = (d,)
    S[f"mapping_Refine.{2 * mlp}.weight"] = ((num_ws + 1) * n, d)
    S[f"mapping_Refine.{2 * mlp}.bias"] = ((num_ws + 1) * n,)
    S["direction.weight"] = (w_dim, n)
    return S


TIED = ("mapping_Refine.2.", "mapping_Refine.4.", "mapping_Refine.6.", "mapping_Refine.8.")


def release_controller(seed: int) -> dict[str, torch.Tensor]:
    """Random tensors in the release layout; the tied copies share one storage, as a
    ``torch.save`` of the module's state dict stores them."""
    g = torch.Generator().manual_seed(seed)
    S = {}
    for k, shape in release_controller_keys().items():
        if k.startswith(TIED):
            S[k] = S["mapping_Refine.0." + k.split(".")[-1]]
        else:
            S[k] = torch.randn(shape, generator=g) * 0.05
    return S


def tiny_generator_state() -> dict[str, torch.Tensor]:
    """EG3D-named generator weights: w_dim 512 and 14 W+ layers (backbone 256^2) as in the
    release, tiny channels, no super-resolution."""
    torch.manual_seed(0)
    G = EG3DGenerator(EG3DGeneratorConfig(channel_base=1024, channel_max=8, plane_channels=4,
                                          decoder_hidden=8, decoder_features=6, sr_variant=None,
                                          img_resolution=64, neural_rendering_resolution=64))
    assert G.backbone.num_ws == 14
    return {k: v for k, v in G.state_dict().items() if k != "rendering_resolution"}


def write_release(path, *, prefix=True, warp=None, gen="tiny", extra=None) -> dict:
    ema = release_controller(0) if warp is None else warp
    trained = release_controller(1)
    G = tiny_generator_state() if gen == "tiny" else gen
    p = "module." if prefix else ""
    ck = {"net_Warp": {p + k: v for k, v in trained.items()},
          "net_Warp_ema": {p + k: v for k, v in ema.items()},
          "net_G": None if G is None else {p + k: v + 1 for k, v in G.items()},
          "net_G_ema": None if G is None else {p + k: v for k, v in G.items()},
          "opt_Warp": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
          "current_epoch": 3, "current_iteration": 2000}
    ck.update(extra or {})
    torch.save(ck, path)
    return {"ema": ema, "trained": trained, "G": G}


def reference_coefficients(S: dict[str, torch.Tensor], motion: torch.Tensor) -> torch.Tensor:
    """OTAvatar's controller written from its documented computation on the release tensors:
    motion (B, 70, 27) -> alpha (B, 14, 20)."""
    lrelu = lambda t: F.leaky_relu(t, 0.1)  # noqa: E731
    x = F.conv1d(motion, S["mapping_3DMM.first.0.weight"], S["mapping_3DMM.first.0.bias"])
    for i in range(3):
        y = F.conv1d(lrelu(x), S[f"mapping_3DMM.encoder{i}.1.weight"],
                     S[f"mapping_3DMM.encoder{i}.1.bias"], dilation=3)
        x = y + x[:, :, 3:-3]
    f = x.mean(dim=2)
    h = f
    for j in range(5):
        lin = f"mapping_Refine.{2 * j}"
        h = lrelu(F.linear(h, S[f"{lin}.weight"], S[f"{lin}.bias"]))
    out = F.linear(lrelu(f + h), S["mapping_Refine.10.weight"], S["mapping_Refine.10.bias"])
    rows = out.view(motion.shape[0], 15, 20)
    return rows[:, :1] + rows[:, 1:]


def test_transcription_is_the_869420_parameter_controller():
    keys = release_controller_keys()
    unique = sum(torch.Size(s).numel() for k, s in keys.items() if not k.startswith(TIED))
    assert unique == 869_420
    own = {k: tuple(v.shape) for k, v in MotionController().state_dict().items()}
    assert len(own) == len(keys) - 2 * len(TIED)


def test_convert_strips_prefixes_and_loads_strictly(tmp_path):
    src = tmp_path / "otavatar.pt"
    ref = write_release(src)
    out = convert_otavatar(str(src), str(tmp_path / "out"))
    tensors, meta = load_weights(out, kind="otavatar")
    assert not any(".module." in k or k.startswith("module.") for k in tensors)
    assert meta["extra"]["entries"] == {"controller": "net_Warp_ema", "generator": "net_G_ema"}
    assert sorted(meta["extra"]["ignored_entries"]) == ["current_epoch", "current_iteration",
                                                        "net_G", "net_Warp", "opt_Warp"]

    C = load_controller(out)            # strict
    S = ref["ema"]
    assert C.cfg.tie_mlp and len(C.mlp) == 1
    assert torch.equal(C.mlp[0].weight, S["mapping_Refine.0.weight"])
    assert torch.equal(C.out.bias, S["mapping_Refine.10.bias"])
    assert torch.equal(C.codebook.weight, S["direction.weight"])
    assert sum(p.numel() for p in C.parameters()) == 869_420
    motion = torch.randn(2, 70, 27, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(C.coefficients(motion), reference_coefficients(S, motion),
                                   rtol=1e-5, atol=1e-6)

    G = EG3DGenerator.from_converted(out)  # the generator part, EG3D names, strict
    own = G.state_dict()
    for k, v in ref["G"].items():
        assert torch.equal(own[k], v), k
    assert meta["config"]["generator"]["c_scale"] == 1.0
    assert meta["config"]["generator"]["render"]["depth_resolution"] == 48


def test_no_ema_selects_the_trained_entries(tmp_path):
    src = tmp_path / "otavatar.pt"
    ref = write_release(src)
    out = convert_otavatar(str(src), str(tmp_path / "out"), ema=False)
    C = load_controller(out)
    assert torch.equal(C.first.weight, ref["trained"]["mapping_3DMM.first.0.weight"])
    G = EG3DGenerator.from_converted(out)
    k = "backbone.mapping.fc0.weight"
    assert torch.equal(G.state_dict()[k], ref["G"][k] + 1)


def test_unprefixed_file_converts_the_same(tmp_path):
    write_release(tmp_path / "a.pt", prefix=True)
    write_release(tmp_path / "b.pt", prefix=False)
    ta, _ = load_weights(convert_otavatar(str(tmp_path / "a.pt"), str(tmp_path / "oa")))
    tb, _ = load_weights(convert_otavatar(str(tmp_path / "b.pt"), str(tmp_path / "ob")))
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("key", ["mapping_Refine.6.weight", "mapping_Refine.2.bias"])
def test_differing_tied_copy_is_refused(tmp_path, key):
    S = dict(release_controller(0))
    S[key] = S[key].clone()
    S[key].view(-1)[0] += 1e-4
    write_release(tmp_path / "bad.pt", warp=S)
    ref = key.replace(key.split(".")[1], "0")
    with pytest.raises(ConversionError, match=rf"{key} differs from {ref}.*refusing"):
        convert_otavatar(str(tmp_path / "bad.pt"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_mixed_prefixes_and_foreign_keys_are_refused(tmp_path):
    S = release_controller(0)
    write_release(tmp_path / "a.pt", prefix=False,
                  extra={"net_Warp_ema": {("module." + k if "first" in k else k): v
                                          for k, v in S.items()}})
    with pytest.raises(ConversionError, match="some keys carry the 'module.' prefix"):
        convert_otavatar(str(tmp_path / "a.pt"), str(tmp_path / "o"))
    write_release(tmp_path / "b.pt", warp={**S, "norm.weight": torch.ones(256)})
    with pytest.raises(ConversionError, match="norm.weight"):
        convert_otavatar(str(tmp_path / "b.pt"), str(tmp_path / "o"))
    torch.save({"net_Warp": S}, tmp_path / "d.pt")
    with pytest.raises(ConversionError, match="expected key 'net_Warp_ema'.*--no-ema"):
        convert_otavatar(str(tmp_path / "d.pt"), str(tmp_path / "o"))
    write_release(tmp_path / "c.pt", extra={"net_Warp_ema": None})
    with pytest.raises(ConversionError, match="'net_Warp_ema': expected a state dict"):
        convert_otavatar(str(tmp_path / "c.pt"), str(tmp_path / "o"))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_file_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"net_Warp_ema": release_controller(0), "hook": _Evil(marker)},
               tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert_otavatar(str(tmp_path / "evil.pt"), str(tmp_path / "out"))
    assert not marker.exists()
    assert not os.path.exists(tmp_path / "out")


def test_release_without_generator_converts_the_controller(tmp_path):
    write_release(tmp_path / "c.pt", gen=None)
    with pytest.warns(ConversionWarning, match="controller only"):
        out = convert_otavatar(str(tmp_path / "c.pt"), str(tmp_path / "out"))
    assert sum(p.numel() for p in load_controller(out).parameters()) == 869_420
    with pytest.raises(CheckpointError, match="no 'generator' config"):
        EG3DGenerator.from_converted(out)


def test_cli_is_registered(tmp_path, capsys):
    from pyface import convert as conv

    write_release(tmp_path / "r.pt")
    parser = argparse.ArgumentParser()
    conv.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["convert", "otavatar", str(tmp_path / "r.pt"), str(tmp_path / "o"),
                              "--no-ema"])
    assert args.func(args) == 0
    assert load_weights(str(tmp_path / "o"))[1]["extra"]["entries"]["controller"] == "net_Warp"
    S = release_controller(0)
    S["mapping_Refine.8.weight"] = S["mapping_Refine.8.weight"] + 1
    write_release(tmp_path / "bad.pt", warp=S)
    args = parser.parse_args(["convert", "otavatar", str(tmp_path / "bad.pt"), str(tmp_path / "x")])
    assert args.func(args) == 1
    assert "mapping_Refine.8.weight differs" in capsys.readouterr().err


def test_pose_free_controller_converts_and_scaling_variant_is_refused(tmp_path):
    # if_use_pose=False: 64 coefficients per frame, read from the first conv's shape
    g = torch.Generator().manual_seed(2)
    S = {k: torch.randn(s, generator=g) for k, s in release_controller_keys(coeff=64).items()}
    for k in list(S):
        if k.startswith(TIED):
            S[k] = S["mapping_Refine.0." + k.split(".")[-1]]
    write_release(tmp_path / "p.pt", warp=S)
    C = load_controller(convert_otavatar(str(tmp_path / "p.pt"), str(tmp_path / "o")))
    assert C.cfg.in_channels == 64
    # if_plus_scaling: (28 + 2) x 20 output rows
    S = {k: torch.zeros(s) for k, s in release_controller_keys(num_ws=29).items()}
    write_release(tmp_path / "s.pt", warp=S)
    with pytest.raises(ConversionError, match=r"expected 300 rows.*if_plus_scaling"):
        convert_otavatar(str(tmp_path / "s.pt"), str(tmp_path / "o2"))
