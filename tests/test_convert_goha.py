"""`pyface convert goha`: GOHA's released stage-2 checkpoint (NVlabs/GOHA) -> pyface's GOHA s2.

The release layout below is transcribed from GOHA's module tree (src/models/model_s2.py: the
three HF SegFormer-b0 nets with their decode heads' BatchNorm and classifier replaced by
identities and fresh 3- / 6-channel stems, the two Embed2Plane stacks, the appearance and
(unused) expression IDUpsamplers, EG3D's OSGDecoder(32 -> 64 -> 33), the buffers, the frozen
BiSeNet, GFPGANv1Clean inside GFPUpsampler; train_s2.py's checkpoint dict and its 6-channel
BasicSR discriminator), reusing the transcriptions of the HF SegFormer, GFPGANv1.3, BiSeNet and
net_d layouts of the other converter tests. Nothing here is generated from pyface's modules
except the small end-to-end file, whose names are renamed back to GOHA's by hand.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import pyface.models
from pyface.checkpoint import CheckpointError
from pyface.convert import ConversionWarning, convert_goha
from pyface.models.goha import convert as gc
from test_convert import _B0, _Evil, _hf_segformer_shapes
from test_nn_goha_parts import _bisenet_79999_layout, _gfpgan_net_d_layout, _gfpgan_v13_layout


def _idupsampler(prefix: str, cin: int, width: int = 128, cout: int = 32) -> dict:
    keys = {}
    for p in ("xy", "xz", "zy"):
        keys[f"{prefix}.up_{p}.0.weight"] = (cin, width, 4, 4)      # ConvTranspose2d(cin, 128)
        keys[f"{prefix}.up_{p}.0.bias"] = (width,)
        keys[f"{prefix}.up_{p}.2.weight"] = (cout, width, 3, 3)
        keys[f"{prefix}.up_{p}.2.bias"] = (cout,)
        keys[f"{prefix}.skip_{p}.weight"] = (cout, cin, 1, 1)
        keys[f"{prefix}.skip_{p}.bias"] = (cout,)
    return keys


def goha_release_layout() -> tuple[dict, dict]:
    """(model_state_dict, discriminator_dict) names and shapes of checkpoint825000.ckpt."""
    model: dict[str, tuple[int, ...]] = {}
    seg = _hf_segformer_shapes(_B0, head=True, num_labels=150)
    for net, stem_in in (("template_net", 3), ("expr_net", 3), ("id_net", 6)):
        for k, shape in seg.items():
            if k.startswith(("decode_head.batch_norm.", "decode_head.classifier.")):
                continue                                    # nn.Identity in GOHA
            if k == "segformer.encoder.patch_embeddings.0.proj.weight":
                shape = (32, stem_in, 7, 7)
            model[f"{net}.{k}"] = shape
    for net in ("embedding2neutral", "embedding2expr"):
        for i, (cout, cin, k) in zip((0, 2, 6, 8), ((256, 256, 3), (128, 256, 3), (128, 128, 3),
                                                      (96, 128, 3))):
            model[f"{net}.up_layers.{i}.weight"] = (cout, cin, k, k)
            model[f"{net}.up_layers.{i}.bias"] = (cout,)
        model[f"{net}.up_layers.4.weight"] = (128, 128, 4, 4)  # ConvTranspose2d(128, 128, 4, 2, 1)
        model[f"{net}.up_layers.4.bias"] = (128,)
    model.update(_idupsampler("id_upsampler", 256))
    model.update(_idupsampler("expr_upsampler", 96))
    model.update({"cano_pose": (1, 25), "cano_exemplar": (1, 3, 512, 512),
                  "image_mean": (1, 3, 1, 1), "image_std": (1, 3, 1, 1), "uv": (1, 128 * 128, 2),
                  "decoder.net.0.weight": (64, 32), "decoder.net.0.bias": (64,),
                  "decoder.net.2.weight": (33, 64), "decoder.net.2.bias": (33,)})
    model.update({"face_parsing_net." + k: v for k, v in _bisenet_79999_layout().items()})
    model.update({"neural_layers.gfpgan." + k: v for k, v in _gfpgan_v13_layout().items()})
    return model, _gfpgan_net_d_layout(in_channels=6)


def _meta(layout: dict) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in layout.items()}


def test_transcribed_release_maps_onto_goha_s2():
    model_l, disc_l = goha_release_layout()
    model, disc = _meta(model_l), _meta(disc_l)
    cfg = gc.release_config(model, disc, "release")
    assert cfg == {"resolution": 512, "encoder": "b0", "encoder_width": 256,
                   "plane_channels": 32, "embed_width": 128, "decoder_hidden": 64,
                   "decoder_features": 32, "share_upsampler_weights": True,
                   "render_resolution": 224, "sr_narrow": 1.0, "sr_style_features": 512,
                   "disc_narrow": 1.0, "infer_lift_expression": "driving",
                   "sr_noise": "random"}
    state, dropped = gc.release_to_pyface(model, disc, "release")
    gc.check_against_model(state, cfg, "release", fill_discriminator=False)   # every key, shape
    n_bisenet = len(_bisenet_79999_layout())
    assert {p: len(v) for p, v in dropped.items()} == {
        "expr_upsampler.": 18, "face_parsing_net.": n_bisenet, "cano_pose": 1,
        "cano_exemplar": 1, "image_mean": 1, "image_std": 1, "uv": 1}
    assert state["encoder_appearance.encoder.patch_embeddings.0.proj.weight"].shape == \
        (32, 6, 7, 7)
    assert state["discriminator.conv_body.0.0.weight"].shape == (32, 6, 1, 1)
    assert len(state) == len(model_l) - sum(map(len, dropped.values())) + len(disc_l)


def test_release_layout_errors_name_the_key():
    model_l, disc_l = goha_release_layout()
    model = _meta(model_l)
    extra = {**model, "mystery.weight": torch.empty(3, device="meta")}
    with pytest.raises(gc.GOHAConversionError, match="mystery.weight"):
        gc.release_to_pyface(extra, None, "r")
    no_sr = {k: v for k, v in model.items() if not k.startswith("neural_layers.")}
    with pytest.raises(gc.GOHAConversionError, match="stage-1"):
        gc.release_config(no_sr, None, "r")
    wrong = dict(model)
    wrong["decoder.net.2.weight"] = torch.empty(33, 48, device="meta")
    state, _ = gc.release_to_pyface(wrong, _meta(disc_l), "r")
    with pytest.raises(gc.GOHAConversionError, match="decoder.net.2.weight"):
        gc.check_against_model(state, gc.release_config(model, None, "r"), "r",
                               fill_discriminator=False)
    with pytest.raises(gc.GOHAConversionError, match="model_state_dict"):
        gc.release_entries({"iter": 1}, "r")


# pyface -> GOHA names for the small end-to-end file (the inverse of the converter's table,
# written out here)
_TO_GOHA = (("encoder_canonical.decode_head.", "template_net.decode_head."),
            ("encoder_canonical.", "template_net.segformer."),
            ("encoder_expression.decode_head.", "expr_net.decode_head."),
            ("encoder_expression.", "expr_net.segformer."),
            ("encoder_appearance.decode_head.", "id_net.decode_head."),
            ("encoder_appearance.", "id_net.segformer."),
            ("embed_canonical.net.", "embedding2neutral.up_layers."),
            ("embed_expression.net.", "embedding2expr.up_layers."),
            ("upsampler.", "id_upsampler."), ("decoder.", "decoder."),
            ("sr.", "neural_layers.gfpgan."))


def test_convert_goha_file_loads_as_the_goha_pipeline(tmp_path):
    """A small release file (tiny MiT, 64^2 SR) converts, reports what it drops and loads
    strictly as `pyface.models.load("goha", OUT)` with the file's tensors."""
    from pyface.models.goha import GOHASR
    from test_model_goha import tiny_config

    torch.manual_seed(3)
    src = GOHASR(tiny_config(encoder_width=32, share_upsampler_weights=True))
    model, disc = {}, {}
    for k, v in src.state_dict().items():
        if k.startswith("discriminator."):
            disc[k[len("discriminator."):]] = v.clone()
            continue
        pre = next(p for p in _TO_GOHA if k.startswith(p[0]))
        model[pre[1] + k[len(pre[0]):]] = v.clone()
    model.update({"expr_upsampler.skip_xy.weight": torch.zeros(16, 96, 1, 1),
                  "face_parsing_net.cp.resnet.conv1.weight": torch.zeros(64, 3, 7, 7),
                  "uv": torch.zeros(1, 16, 2), "cano_pose": torch.zeros(1, 25)})
    path = tmp_path / "checkpoint825000.ckpt"
    torch.save({"iter": 825000, "model_state_dict": model, "discriminator_dict": disc}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        out = convert_goha(str(path), str(tmp_path / "goha"), render_resolution=32)
    notes = " ".join(str(w.message) for w in caught if w.category is ConversionWarning)
    assert "expr_upsampler" in notes and "face_parsing_net" in notes
    pipe = pyface.models.load("goha", out, device="cpu")
    assert type(pipe.model) is GOHASR and pipe.resolution == 64
    assert pipe.model.cfg.encoder == "tiny" and pipe.model.cfg.share_upsampler_weights
    assert pipe.model.cfg.infer_lift_expression == "driving"     # GOHA's inference
    assert pipe.model.cfg.sr_noise == "random"
    for k, v in src.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[k], v), k


def test_convert_goha_never_unpickles_objects(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model_state_dict": {"x": _Evil(marker)}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert_goha(str(tmp_path / "evil.ckpt"), str(tmp_path / "o"))
    assert not marker.exists()
