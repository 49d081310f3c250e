"""The model guides (docs/models/<model>.md) agree with the models' code.

What is checked (nothing is trained, no data is made, networks are built on the meta device):

* Config keys: every code span of a guide that names a key ``model.X``, ``data.X`` or
  ``train.X`` (``model.sr_residual``, ``model.eye_roi_bug=true``,
  ``--set model.gpc_reg_prob=0.8``; not a file such as ``model.py``) is a key of the config of
  the guide's model or of one of its stage models (GUIDE_MODELS), and a value written after
  ``=`` converts to the key's type: the config is built as ``pyface train MODEL --set
  KEY=VALUE`` builds it (``data.name=X``: X is a registered dataset). A value that is a
  placeholder (upper case, ``<...>``, empty, or one of PLACEHOLDER_VALUES) is not checked.
  EG3D's guide writes the generator's keys from the generator
  (``generator.sr_image_raw_alias=true``, ``render.chunk_points``): RELATIVE maps those
  prefixes to ``model.generator.`` and ``model.generator.render.``.
* Preset values: each entry of PRESET_ROWS quotes a row (or part of a row) of a guide's preset
  table, or a sentence of a guide or of docs/train.md that states a preset's value; the quote
  must be in the page (whitespace runs count as one space) and the values it states must be the
  preset's (None: the recipe's), as ``pyface train MODEL --preset P --print-config`` resolves
  them (``model.*``, ``data.*``, ``train.*``).
* Pipelines: docs/train.md's list of each model's ``generate`` controls and the signatures and
  defaults the guides give for ``encode_source`` / ``generate`` are the pipelines' own.
* Acceptance tables: every number in the result column of a guide's "Where the acceptance
  stands" is written in its measurement record (docs/models/<model>-measured.md), and so is
  every number of the model's row in the README's models table.
* Network sizes: the counts a guide quotes (Export3D's parameters, MMFA's table, OTAvatar's
  controller, the W+ layers of OTAvatar's tiny EG3D generator) equal those of the networks
  built from the presets.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from test_docs_commands import ParseError, _key_exists, check_sets, is_placeholder

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ROOT / "docs" / "models"

# guide -> the registered models whose config keys it may name (the model and its stages)
GUIDE_MODELS = {
    "eg3d": ("eg3d",),
    "otavatar": ("otavatar", "eg3d"),
    "goha": ("goha", "goha_s1_gan", "goha_s1"),
    "export3d": ("export3d", "export3d_clebs"),
    "mmfa": ("mmfa", "mmfa_vae"),
}
# a guide's key prefix written from inside the model config -> the full prefix
RELATIVE = {
    "eg3d": {"generator.": "model.generator.", "render.": "model.generator.render.",
             "discriminator.": "model.discriminator."},
}
# values in the guides that stand for any value (Export3D's `model.expr_planes=k`)
PLACEHOLDER_VALUES = {"", "k", "...", "…"}
KEY_SPAN = re.compile(r"`(?:--set )?((?:model|data|train|generator|render|discriminator)"
                      r"(?:\.[A-Za-z_]\w*)+)(?:=([^`\s]*))?`")


def guide_text(name: str) -> str:
    """A guide by model name (``goha``), or another page by its path (``docs/train.md``)."""
    path = ROOT / name if name.endswith(".md") else GUIDES / f"{name}.md"
    return path.read_text(encoding="utf-8")


def flat(text: str) -> str:
    return " ".join(text.split())


def key_spans(name: str) -> list[tuple[str, str | None]]:
    """(full key, value or None) of the key spans of a guide."""
    out = []
    for m in KEY_SPAN.finditer(guide_text(name)):
        key, value = m.group(1), m.group(2)
        if value is None and re.search(r"\.(py|md|yaml|json)$", key):
            continue                    # a file (`model.py`), not a key
        for short, full in RELATIVE.get(name, {}).items():
            if key.startswith(short):
                key = full + key[len(short):]
        if not key.startswith(("model.", "data.", "train.")):
            continue
        out.append((key, value))
    return sorted(set(out), key=lambda kv: (kv[0], kv[1] or ""))


def check_key(name: str, key: str, value: str | None) -> None:
    """ParseError unless ``key`` (and ``value``) is accepted by one of the guide's models."""
    from pyface.train.registry import model_class

    errors = []
    for model in GUIDE_MODELS[name]:
        if not _key_exists(model_class(model), key):
            errors.append(f"{model}: no such key")
            continue
        if value is None or value in PLACEHOLDER_VALUES or is_placeholder(value):
            return
        v = value.strip("\"'")
        if key == "data.name":          # a dataset needs its own options: its name alone
            from pyface.train.registry import dataset_names

            if v in dataset_names():
                return
            errors.append(f"no dataset {v!r} ({', '.join(dataset_names())})")
            continue
        try:
            check_sets(model, None, [f"{key}={v}"])
            return
        except ParseError as exc:
            errors.append(str(exc))
    raise ParseError(f"`{key}{'' if value is None else '=' + value}`: " + "; ".join(errors))


@pytest.mark.parametrize("name", sorted(GUIDE_MODELS))
def test_guide_config_keys_exist(name):
    spans = key_spans(name)
    assert spans, f"docs/models/{name}.md: no config key found (the pattern is stale)"
    bad = []
    for key, value in spans:
        try:
            check_key(name, key, value)
        except ParseError as exc:
            bad.append(str(exc))
    assert not bad, f"docs/models/{name}.md:\n" + "\n".join(bad)


def test_key_check_refuses_a_wrong_key_and_value():
    with pytest.raises(ParseError, match="no such key"):
        check_key("goha", "model.sr_residuals", None)
    with pytest.raises(ParseError):
        check_key("goha", "model.sr_residual", "maybe")
    check_key("eg3d", "model.generator.render.chunk_points", None)
    check_key("otavatar", "model.background", "data")      # the key of its EG3D stage


# --------------------------------------------------------------------------------------------
# preset tables
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def preset_config(model: str, preset: str) -> dict:
    from pyface.train.config import build_experiment, experiment_to_dict
    from pyface.train.registry import model_class

    cls = model_class(model)
    cfg = build_experiment(model, cls.Config, defaults=getattr(cls, "recipe", {}), preset=preset)
    d = experiment_to_dict(cfg)
    return {"model": d["model_config"], "data": d["data"], "train": d["train"]}


def lookup(cfg: dict, key: str):
    value = cfg
    for part in key.split("."):
        value = value[part]
    return value


T, G, F = "tiny", "gpu-short", "full"

# (guide, a quote of its preset table or recipe text, {(model, preset): {key: value}})
PRESET_ROWS = [
    ("eg3d", "| z / w | 32 | 256 | 512 |",
     {("eg3d", p): {"model.generator.z_dim": v, "model.generator.w_dim": v}
      for p, v in ((T, 32), (G, 256), (F, 512))}),
    ("eg3d", "| planes | 3 x 8 x 32^2 (widths 512/r, max 32) | 3 x 32 x 128^2 (16384/r, max 256) | "
             "3 x 32 x 256^2 (32768/r, max 512) |",
     {("eg3d", p): {"model.generator.plane_channels": c, "model.generator.backbone_resolution": r,
                    "model.generator.channel_base": b, "model.generator.channel_max": m}
      for p, c, r, b, m in ((T, 8, 32, 512, 32), (G, 32, 128, 16384, 256),
                            (F, 32, 256, 32768, 512))}),
    ("eg3d", "| rendering | 16^2, 12 + 12 samples, white_back | 64^2, 32 + 32, white_back | 64^2 "
             "-> 128^2 (fade 1000 kimg from 25000 kimg), 48 + 48 |",
     {("eg3d", T): {"model.neural_rendering_resolution_initial": 16,
                    "model.neural_rendering_resolution_final": None,
                    "model.generator.render.depth_resolution": 12,
                    "model.generator.render.depth_resolution_importance": 12,
                    "model.generator.render.white_back": True},
      ("eg3d", G): {"model.neural_rendering_resolution_initial": 64,
                    "model.neural_rendering_resolution_final": None,
                    "model.generator.render.depth_resolution": 32,
                    "model.generator.render.depth_resolution_importance": 32,
                    "model.generator.render.white_back": True},
      ("eg3d", F): {"model.neural_rendering_resolution_initial": 64,
                    "model.neural_rendering_resolution_final": 128,
                    "model.neural_rendering_resolution_fade_kimg": 1000.0,
                    "model.neural_rendering_resolution_fade_start_kimg": 25000.0,
                    "model.generator.render.depth_resolution": 48,
                    "model.generator.render.depth_resolution_importance": 48,
                    "model.generator.render.white_back": False}}),
    ("eg3d", "| SR | hybrid2x at 16 -> 32, widths 32 / 16 | hybrid2x 64 -> 128 | hybrid8xdc 128 -> "
             "512 |",
     {("eg3d", T): {"model.generator.sr_variant": "hybrid2x", "model.generator.img_resolution": 32,
                    "model.generator.sr_input_resolution": 16,
                    "model.generator.sr_block_channels": [32, 16]},
      ("eg3d", G): {"model.generator.sr_variant": "hybrid2x",
                    "model.generator.img_resolution": 128,
                    "model.generator.neural_rendering_resolution": 64},
      ("eg3d", F): {"model.generator.sr_variant": "hybrid8xdc",
                    "model.generator.img_resolution": 512}}),
    ("eg3d", "| D | widths 512/r, max 64, c-mapping 2 | 16384/r, max 256 | 32768/r, max 512 |",
     {("eg3d", p): {"model.discriminator.channel_base": b, "model.discriminator.channel_max": m,
                    "model.discriminator.mapping_layers": k}
      for p, b, m, k in ((T, 512, 64, 2), (G, 16384, 256, 8), (F, 32768, 512, 8))}),
    ("eg3d", "| batch, steps | 8, 400 | 16, 6000 | 32, 843750 (27000 kimg) |",
     {("eg3d", p): {"train.batch_size": b, "train.steps": s}
      for p, b, s in ((T, 8, 400), (G, 16, 6000), (F, 32, 843750))}),
    ("eg3d", "| D blur | sigma 0.625 (10 x 32 / 512) fading over 1 kimg | 2.5 (10 x 128 / 512) "
             "over 10 kimg | 10 over 200 kimg |",
     {("eg3d", p): {"model.blur_init_sigma": s, "model.blur_fade_kimg": k}
      for p, s, k in ((T, 0.625, 1.0), (G, 2.5, 10.0), (F, 10.0, None))}),
    ("eg3d", "| gpc fade | 2 kimg | 20 kimg | 1000 kimg |",
     {("eg3d", p): {"model.gpc_reg_fade_kimg": k} for p, k in ((T, 2.0), (G, 20.0), (F, 1000.0))}),
    ("eg3d", '| ray chunks (fused, recomputed) | 16384 samples, `recompute="decoder"` | 131072 | '
             '131072 |',
     {("eg3d", p): {"model.generator.render.chunk_points": c, "model.generator.render.recompute": r}
      for p, c, r in ((T, 16384, "decoder"), (G, 131072, True), (F, 131072, True))}),
    ("eg3d", "| EMA half-life | 0.5 kimg | 5 kimg | 10 kimg |",
     {("eg3d", p): {"train.ema.half_life_kimg": h} for p, h in ((T, 0.5), (G, 5.0), (F, 10.0))}),
    ("eg3d", "| generator cameras (`gen_c_per_phase`) | one permutation per step (false) | "
             "per phase (true) | per phase (true) |",
     {("eg3d", p): {"model.gen_c_per_phase": v} for p, v in ((T, False), (G, True), (F, True))}),
    ("eg3d", "| generator cameras from (`gen_c_source`) | the batch's labels (`batch`) | the "
             "whole dataset's labels (`dataset`) | the whole dataset's labels (`dataset`) |",
     {("eg3d", p): {"model.gen_c_source": v}
      for p, v in ((T, "batch"), (G, "dataset"), (F, "dataset"))}),
    ("otavatar", "| data | `motion_windows` 32², radius 6 | 128², radius 13 | 512², radius 13 |",
     {("otavatar", p): {"data.name": "motion_windows", "data.resolution": r,
                        "data.options.radius": w}
      for p, r, w in ((T, 32, 6), (G, 128, 13), (F, 512, 13))}),
    ("otavatar", "| controller | window 13, width 64, k3, 2 layers dil 2, 8 directions | full | "
                 "full |",
     {("otavatar", T): {"model.controller.window": 13, "model.controller.descriptor": 64,
                        "model.controller.first_kernel": 3, "model.controller.layers": 2,
                        "model.controller.dilation": 2, "model.controller.directions": 8}}
     | {("otavatar", p): {"model.controller.window": 27, "model.controller.descriptor": 256,
                          "model.controller.first_kernel": 7, "model.controller.layers": 3,
                          "model.controller.dilation": 3, "model.controller.directions": 20}
        for p in (G, F)}),
    ("otavatar", "| batch, steps | 2, 150 | 4, 600 | 24, 2000 (the paper: 4 GPUs x 6) |",
     {("otavatar", p): {"train.batch_size": b, "train.steps": s}
      for p, b, s in ((T, 2, 150), (G, 4, 600), (F, 24, 2000))}),
    ("otavatar", "| frames per item (one inverted w) | 4 | 2 | 2 |",
     {("otavatar", p): {"data.options.frames_per_item": k} for p, k in ((T, 4), (G, 2), (F, 2))}),
    ("otavatar", "| inversion | 16 iterations (last 2 controller), w lr 0.1 | 30 (last 5) | 100 "
                 "(last 10), lr 0.01 |",
     {("otavatar", p): {"model.invert_iters": i, "model.invert_controller_iters": c,
                        "model.invert_lr": lr}
      for p, i, c, lr in ((T, 16, 2, 0.1), (G, 30, 5, 0.01), (F, 100, 10, 0.01))}),
    ("otavatar", "| refinement lr | controller 1e-3 (wd 0.01), generator 1e-3 | 1e-3 (wd 1), 1e-4 "
                 "| 1e-3 (wd 1), 1e-4 |",
     {("otavatar", p): {"model.controller_lr": 1e-3, "model.controller_wd": wd,
                        "model.generator_lr": g}
      for p, wd, g in ((T, 0.01, 1e-3), (G, 1.0, 1e-4), (F, 1.0, 1e-4))}),
    ("otavatar", "| `center_motion` | on | off | off (the reference) |",
     {("otavatar", p): {"model.center_motion": v} for p, v in ((T, True), (G, False), (F, False))}),
    ("otavatar", '| renderer (`model.render`) | `recompute="decoder"`, 65536-sample chunks | '
                 "the generator's | the generator's |",
     {("otavatar", T): {"model.render": {"recompute": "decoder", "chunk_points": 65536}},
      ("otavatar", G): {"model.render": {}}, ("otavatar", F): {"model.render": {}}}),
    ("otavatar", "| inversion loss over an item's frames (`inversion_frames`) | mean | sum | sum "
                 "(the reference) |",
     {("otavatar", p): {"model.inversion_frames": v}
      for p, v in ((T, "mean"), (G, "sum"), (F, "sum"))}),
    ("otavatar", "| inversion density terms' decoder (`inversion_density_decoder`) | ema (unused: "
                 "no inversion density terms) | trained | trained (the reference) |",
     {("otavatar", T): {"model.inversion_density_decoder": "ema",
                        "model.inversion_density": False},
      ("otavatar", G): {"model.inversion_density_decoder": "trained",
                        "model.inversion_density": True},
      ("otavatar", F): {"model.inversion_density_decoder": "trained",
                        "model.inversion_density": True}}),
    ("otavatar", "| controller lr in the inversion (`inversion_controller_lr`) | fixed: 1e-3 | "
                 "reference: 1e-3 x 100 / 30 = 3.3e-3 | reference: 1e-3 x 100 / 100 = 1e-3 (the "
                 "reference) |",
     {("otavatar", p): {"model.inversion_controller_lr": v, "model.controller_lr": 1e-3,
                        "model.invert_iters": n}
      for p, v, n in ((T, "fixed", 16), (G, "reference", 30), (F, "reference", 100))}),
    ("otavatar", "| density points | 500 | 2000 | 2000 |",
     {("otavatar", p): {"model.density_points": n} for p, n in ((T, 500), (G, 2000), (F, 2000))}),
    ("otavatar", "| pipeline | 30 w iterations, PTI 100 at 3e-3 | 100 w iterations | 100 w "
                 "iterations (W+ and PTI optional) |",
     {("otavatar", T): {"model.invert_steps": 30, "model.pti_steps": 100, "model.pti_lr": 3e-3},
      ("otavatar", G): {"model.invert_steps": 100, "model.pti_steps": 0},
      ("otavatar", F): {"model.invert_steps": 100, "model.pti_steps": 0}}),
    ("otavatar", "| EMA | 0.95 per batch | 0.95 | 0.95 |",
     {("otavatar", p): {"train.ema.decay": 0.95} for p in (T, G, F)}),
    ("goha", "R 64, `encoder=tiny`, D 32, C 16, W 32, planes 32², lift 16² with 12 + 12 samples, "
             "render 32² with 12 + 12 (fused renderer in chunks of 8192 samples, "
             '`render_recompute="decoder"`), eye dilation 3² × 1, decoder 32 hidden / 8 features, '
             "`plane_gain` 10, `plane_field` 0.35 with `flip_plane_rows`",
     {(m, T): {"model.resolution": 64, "model.encoder": "tiny", "model.encoder_width": 32,
               "model.plane_channels": 16, "model.embed_width": 32, "model.lift_resolution": 16,
               "model.lift_samples": 12, "model.render_resolution": 32,
               "model.depth_samples": 12, "model.depth_samples_importance": 12,
               "model.render_chunk_points": 8192, "model.render_recompute": "decoder",
               "model.eye_dilation": 3, "model.eye_dilation_iters": 1,
               "model.decoder_hidden": 32, "model.decoder_features": 8,
               "model.plane_gain": 10.0, "model.plane_field": 0.35,
               "model.flip_plane_rows": True}
      for m in ("goha_s1", "goha_s1_gan", "goha")}),
    ("goha", "`model.render_chunk_points` (None: the op's 131072; tiny 8192)",
     {(m, p): {"model.render_chunk_points": n}
      for m in ("goha_s1", "goha_s1_gan", "goha") for p, n in ((T, 8192), (F, None))}),
    ("goha", "lr 1e-3 (s1_gan 1e-4), betas (0.9, 0.99), TV 0.05, `mask_weight` 1, `neutral_weight` "
             "3, `mouth_weight` 0.25 (s1 and s1_gan); cano only to step 125, expression from 125, "
             "appearance from 250; SR and D at 1/32 width (SR style 32), s2 `sr_residual`",
     {("goha_s1", T): {"model.lr": 1e-3}, ("goha_s1_gan", T): {"model.lr": 1e-4}}
     | {(m, T): {"model.betas": [0.9, 0.99], "model.tv_weight": 0.05, "model.mask_weight": 1.0,
                 "model.neutral_weight": 3.0, "model.mouth_weight": 0.25,
                 "model.canonical_until": 125, "model.expression_from": 125,
                 "model.appearance_from": 250, "model.sr_narrow": 1 / 32,
                 "model.disc_narrow": 1 / 32, "model.sr_style_features": 32,
                 "model.sr_residual": m == "goha"}
        for m in ("goha_s1", "goha_s1_gan", "goha")}),
    ("goha", "`pairs`, 64², one loader worker; the built-in set with 64 identities × 2 videos × 6 "
             "frames at 3.125 fps",
     {(m, T): {"data.name": "pairs", "data.resolution": 64, "train.num_workers": 1,
               "data.options.synth.identities": 64,
               "data.options.synth.videos_per_identity": 2,
               "data.options.synth.frames": 6, "data.options.synth.fps": 3.125}
      for m in ("goha_s1", "goha_s1_gan", "goha")}),
    ("goha", "1500 / 60 / 60 steps, batch 2 (s1: lr × 0.1 from step 1400, `train.lr_schedule` "
             "`step`, size 1400, γ 0.1; s2: D lr 5e-3)",
     {("goha_s1", T): {"train.steps": 1500, "train.batch_size": 2,
                       "train.lr_schedule.kind": "step", "train.lr_schedule.step_size": 1400,
                       "train.lr_schedule.gamma": 0.1},
      ("goha_s1_gan", T): {"train.steps": 60, "train.batch_size": 2},
      ("goha", T): {"train.steps": 60, "train.batch_size": 2, "model.lr_d": 5e-3}}),
    ("goha", "R 256, MiT-b0, D 256, C 32, planes 128², lift 64² (24 + 24), render 128² (24 + 24), "
             "lr 2e-4, `mask_weight` 1; cano to 1000, expression from 1000, appearance from 2000; "
             "SR and D at 1/4 width (style 128)",
     {(m, G): {"model.resolution": 256, "model.encoder": "b0", "model.encoder_width": 256,
               "model.plane_channels": 32, "model.lift_resolution": 64,
               "model.lift_samples": 24, "model.render_resolution": 128,
               "model.depth_samples": 24, "model.depth_samples_importance": 24,
               "model.lr": 2e-4, "model.mask_weight": 1.0, "model.canonical_until": 1000,
               "model.expression_from": 1000, "model.appearance_from": 2000,
               "model.sr_narrow": 0.25, "model.disc_narrow": 0.25,
               "model.sr_style_features": 128}
      for m in ("goha_s1", "goha_s1_gan", "goha")}),
    ("goha", "GOHA's training options (`cano_terms` mean with `neutral_weight` 3, `gan_in_coarse` "
             "false, `d_fakes` tar, `sr_raw_terms` true, `r1_inputs` input, `s2_disc_init` "
             "gfpgan, `lift_grad` true, `tar_lift_expression` driving)",
     {(m, p): {"model.cano_terms": "mean", "model.neutral_weight": 3.0,
               "model.gan_in_coarse": False, "model.d_fakes": "tar",
               "model.sr_raw_terms": True, "model.r1_inputs": "input",
               "model.s2_disc_init": "gfpgan", "model.lift_grad": True,
               "model.tar_lift_expression": "driving"}
      for m in ("goha_s1", "goha_s1_gan", "goha") for p in (G, F)}),
    ("goha", "GOHA's inference (`infer_lift_expression` driving, `sr_noise` random)",
     {(m, p): {"model.infer_lift_expression": "driving", "model.sr_noise": "random"}
      for m in ("goha_s1", "goha_s1_gan", "goha") for p in (G, F)}),
    ("goha", "| `pairs`, 256² | 3000 / 500 / 500, batch 8",
     {("goha_s1", G): {"data.resolution": 256, "train.steps": 3000, "train.batch_size": 8},
      ("goha_s1_gan", G): {"data.resolution": 256, "train.steps": 500, "train.batch_size": 8},
      ("goha", G): {"data.resolution": 256, "train.steps": 500, "train.batch_size": 8}}),
    ("goha", "| `pairs`, 512² | 695k / 55k / 75k, batch 8 |",
     {("goha_s1", F): {"data.resolution": 512, "train.steps": 695_000, "train.batch_size": 8,
                       "model.resolution": 512, "model.render_resolution": 224,
                       "model.depth_samples": 48, "model.lift_resolution": 128},
      ("goha_s1_gan", F): {"data.resolution": 512, "train.steps": 55_000, "train.batch_size": 8},
      ("goha", F): {"data.resolution": 512, "train.steps": 75_000, "train.batch_size": 8}}),
    ("export3d", "| `tiny` | 64², n 10, d 64, linear f_e started at the Fisher directions "
                 "(`fe_init: fisher`), `whiten`, `w_invariance` 1, f_I input augmentation 0.1, N 8 "
                 "frames, min gap 3, batch 8 clips, 1600 steps; its own synthetic set: 128 "
                 "identities x 2 videos x 32 frames (`exp_leak` 0.5, no cross-identity or "
                 "multi-view sets)",
     {("export3d_clebs", T): {"model.resolution": 64, "model.n": 10, "model.dim": 64,
                              "model.hidden": [], "model.fe_init": "fisher", "model.whiten": True,
                              "model.w_invariance": 1.0, "model.augment": 0.1,
                              "data.options.frames": 8, "data.options.min_gap": 3,
                              "train.batch_size": 8, "train.steps": 1600,
                              "data.options.synth.identities": 128,
                              "data.options.synth.videos_per_identity": 2,
                              "data.options.synth.frames": 32,
                              "data.options.synth.exp_leak": 0.5,
                              "data.options.synth.cross": False,
                              "data.options.synth.multiview": False}}),
    ("export3d", "| 64², raw 16², tri-plane 3x16x32², 12+12 samples, 2 blocks of 64, batch 4, 2400 "
                 "steps, `cond_norm`, `expr_planes` 10 with `expr_init: basis`, `sr_source`, "
                 "`sr_guide`, `sr_cond`, `raw_background`, `augment` 0.2, `w_mask` 10, `w_density` "
                 "0, no GAN, render chunks of 8192 samples |",
     {("export3d", T): {"model.resolution": 64, "model.plane_channels": 16,
                        "model.depth_samples": 12, "model.importance_samples": 12,
                        "model.vit_depth": 2, "model.vit_dim": 64, "train.batch_size": 4,
                        "train.steps": 2400, "model.cond_norm": True, "model.expr_planes": 10,
                        "model.expr_init": "basis", "model.sr_source": True,
                        "model.sr_guide": True, "model.sr_cond": True,
                        "model.raw_background": True, "model.augment": 0.2,
                        "model.w_mask": 10.0, "model.w_density": 0.0, "model.w_gan": 0.0,
                        "model.render_chunk_points": 8192}}),
    ("export3d", "| `gpu-short` | 128², n 10, d 256, batch 16 clips, 1500 steps; synthetic 16 "
                 "identities x 4 videos x 64 frames | 256², raw 64², tri-plane 3x32x128², 24+24 "
                 "samples, 4 blocks of 256, batch 8, bf16, 3000 steps |",
     {("export3d_clebs", G): {"model.resolution": 128, "model.n": 10, "model.dim": 256,
                              "train.batch_size": 16, "train.steps": 1500,
                              "data.options.synth.identities": 16,
                              "data.options.synth.videos_per_identity": 4,
                              "data.options.synth.frames": 64},
      ("export3d", G): {"model.resolution": 256, "model.plane_channels": 32,
                        "model.depth_samples": 24, "model.importance_samples": 24,
                        "model.vit_depth": 4, "model.vit_dim": 256, "train.batch_size": 8,
                        "train.precision": "bf16", "train.steps": 3000}}),
    ("export3d", "| `full` | 224², ResNet-50, n 10, d 512, 16 videos x 16 frames, 20k steps | "
                 "512², raw 128², 48+48 samples, 8 blocks of 512, batch 8, 200k steps |",
     {("export3d_clebs", F): {"model.resolution": 224, "model.image_depths": [3, 4, 6, 3],
                              "model.n": 10, "model.dim": 512, "train.batch_size": 16,
                              "data.options.frames": 16, "train.steps": 20_000},
      ("export3d", F): {"model.resolution": 512, "model.depth_samples": 48,
                        "model.importance_samples": 48, "model.vit_depth": 8,
                        "model.vit_dim": 512, "train.batch_size": 8, "train.steps": 200_000}}),
    ("export3d", "Optimiser AdamW, weight decay 0.01 [D]; lr 1e-3 (tiny) / 5e-4 (gpu-short) / 1e-4 "
                 "(full) [D].",
     {("export3d_clebs", p): {"model.weight_decay": 0.01, "model.lr": lr}
      for p, lr in ((T, 1e-3), (G, 5e-4), (F, 1e-4))}),
    ("export3d", "Optimiser: Adam, betas (0.9, 0.99) and lr 1e-3 at tiny, 5e-4 at gpu-short; (0, "
                 "0.99) and 1e-4 at full (GOHA's, the spec) [D]. Engine EMA of `generator`, "
                 "`cond`, `decoder`, `sr` (decay 0.99 at tiny, 0.995 gpu-short, half-life 10 kimg "
                 "full)",
     {("export3d", T): {"model.betas": [0.9, 0.99], "model.lr": 1e-3, "train.ema.decay": 0.99},
      ("export3d", G): {"model.betas": [0.9, 0.99], "model.lr": 5e-4, "train.ema.decay": 0.995},
      ("export3d", F): {"model.betas": [0.0, 0.99], "model.lr": 1e-4,
                        "train.ema.half_life_kimg": 10.0,
                        "train.ema.modules": ["generator", "cond", "decoder", "sr"]}}),
    ("eg3d", "| `Greg` | G | `g_reg_interval` 4 |",
     {("eg3d", p): {"model.g_reg_interval": 4, "model.density_reg": 0.25, "model.reg_type": "l1",
                    "model.d_reg_interval": 16, "model.gpc_reg_prob": 0.5,
                    "model.g_lr": 0.0025, "model.d_lr": 0.002, "model.betas": [0.0, 0.99]}
      for p in (T, G, F)}),
    ("otavatar", "| VGG19 perceptual relu1_1..relu5_1 (L1) + Gram on the first scale | 1, Gram x "
                 "250 |",
     {("otavatar", p): {"model.w_perceptual": 1.0, "model.style_weight": 250.0,
                        "model.w_smooth_l1": 1.0, "model.w_mouth": 10.0, "model.w_eyes": 10.0,
                        "model.w_identity": 1.0, "model.w_monotonic": 1.0, "model.w_tv": 0.25,
                        "model.tv_sigma": 0.004} for p in (T, G, F)}),
    ("export3d", "| density L1 regulariser (EG3D, `density_l1_regularizer`, corrected axes) every "
                 "4 steps, scaled by 4 | 0.25 (0 in `tiny`) | [D] (EG3D); `gpu-short` / `full` "
                 "in its own lazy phase `Greg` (`density_phase`, below) |",
     {("export3d", p): {"model.w_l1": 1.0, "model.w_l1_raw": 1.0, "model.w_perceptual": 1.0,
                        "model.w_roi": 1.0, "model.w_roi_raw": 0.0, "model.density_every": 4,
                        "model.density_phase": p != T,
                        "model.w_density": 0.0 if p == T else 0.25, "model.w_identity": 0.1,
                        "model.w_mask": 10.0 if p == T else 0.0,
                        "model.w_gan": 0.025 if p == F else 0.0, "model.gan_start": 10_000,
                        "model.r1_gamma": 10.0, "model.r1_every": 16, "model.d_lr": 1e-4,
                        "model.augment": 0.2 if p == T else 0.0}
      for p in (T, G, F)}),
    ("mmfa", "| equivariance | `w_equivariance` 10 (`tiny`: 20) |",
     {("mmfa", p): {"model.w_rec": 10.0, "model.w_perceptual": 0.0,
                    "model.w_equivariance": 20.0 if p == T else 10.0, "model.w_prior": 10.0,
                    "model.w_landmark": 10.0, "model.landmark_weights": [1.0, 2.0, 2.0],
                    "model.w_delta": 0.5 if p == T else 5.0, "model.w_exp_consistency": 1.0,
                    "model.w_canonical": 10.0, "model.w_mouth": 0.0, "model.mouth_margin": 4.0,
                    "model.w_mouth_motion": 0.0, "model.mouth_motion_sigma": 0.2,
                    "model.w_blend_bound": 0.0, "model.blend_bound": 3.0,
                    "model.sigma_affine": 0.05, "model.sigma_tps": 0.005}
      for p in (T, G, F)}),
    ("mmfa", "| deformation L1 | `w_delta` 5 (`tiny`: 0.5) |", {}),
    ("mmfa", "* VAE: `pyface.nn.GaussianMLPVAE`, latent 32 (`tiny`: 8), hidden (256, 256) (`tiny`: "
             "(64, 64)),",
     {("mmfa_vae", p): {"model.latent": z, "model.hidden": h, "model.standardize": True}
      for p, z, h in ((T, 8, [64, 64]), (G, 32, [256, 256]), (F, 32, [256, 256]))}),
    ("mmfa", "* Losses: MSE 1 (in standardised units), KL 1e-3 with a linear warm-up over "
             "`kl_warmup` steps, and LSGAN 0.1 against the feature discriminator.",
     {("mmfa_vae", p): {"model.w_rec": 1.0, "model.w_kl": 1e-3, "model.w_adv": 0.1}
      for p in (T, G, F)}),
    ("mmfa", "* Phases: `VAE`, then `Dfeat`. Adam, lr 1e-4 (`tiny`: 1e-3, `gpu-short`: 5e-4), for "
             "both.",
     {("mmfa_vae", p): {"model.lr": lr, "model.lr_d": lr}
      for p, lr in ((T, 1e-3), (G, 5e-4), (F, 1e-4))}),
    ("mmfa", "| `tiny` | spec (a): 64², K = 10, volume 16 × 8 × 16², DenseMotion(16, 3 blocks, max "
             "128, depth 8), keypoint detector at 16² with 3 blocks, exp_dim 32, L1 pyramid only, "
             "no GAN, source blend, `w_delta` 0.5, expression-landmark term as a squared error "
             "with `exp_detach`, placement term 10, equivariance 20",
     {("mmfa", T): {"model.resolution": 64, "model.num_kp": 10, "model.app_channels": 16,
                    "model.app_depth": 8, "model.dm_block_expansion": 16, "model.dm_blocks": 3,
                    "model.dm_max_features": 128, "model.kp_depth": 8,
                    "model.kp_scale_factor": 0.25, "model.kp_blocks": 3, "model.exp_dim": 32,
                    "model.w_perceptual": 0.0, "model.w_gan": 0.0, "model.source_blend": True,
                    "model.w_delta": 0.5, "model.exp_landmark_loss": "mse",
                    "model.exp_detach": True, "model.w_placement": 10.0,
                    "model.w_equivariance": 20.0}}),
    ("mmfa", "(all presets: landmark term 10, expression-landmark term 10, prior depth −0.33) | "
             "64², zoom 0.2 | 800 steps, batch 4, lr 1e-3 cosine |",
     {("mmfa", p): {"model.w_landmark": 10.0, "model.w_exp_landmark": 10.0,
                    "model.kp_prior_depth": -0.33} for p in (T, G, F)}
     | {("mmfa", T): {"model.w_landmark": 10.0, "data.resolution": 64,
                      "data.options.synth.zoom": 0.2, "train.steps": 800,
                      "train.batch_size": 4, "model.lr": 1e-3,
                      "train.lr_schedule.kind": "cosine"}}),
    ("mmfa", "| `gpu-short` | full networks, source blend, GAN + feature matching, lr 4e-4 for G "
             "and D, the paper's training options (`perceptual_outputs` all, "
             "`exp_consistency_warp` affine, `bn_batches` separate) "
             "| 256² | 2,500 steps, batch 16, bf16",
     {("mmfa", G): {"model.num_kp": 15, "model.source_blend": True, "model.w_gan": 1.0,
                    "model.w_fm": 10.0, "model.lr": 4e-4, "model.lr_d": 4e-4,
                    "data.resolution": 256,
                    "train.steps": 2500, "train.batch_size": 16, "train.precision": "bf16",
                    "model.perceptual_outputs": "all", "model.exp_consistency_warp": "affine",
                    "model.bn_batches": "separate"}}),
    ("mmfa", "| `full` | full networks, GAN + feature matching, the paper's training options (as "
             "`gpu-short`) | 256² | 100,000 steps, batch 16, lr 2e-4, ×0.1 at 60 % |",
     {("mmfa", F): {"model.num_kp": 15, "model.source_blend": False, "model.w_gan": 1.0,
                    "model.w_fm": 10.0, "data.resolution": 256, "train.steps": 100_000,
                    "train.batch_size": 16, "model.lr": 2e-4, "train.lr_schedule.kind": "step",
                    "train.lr_schedule.step_size": 60_000, "train.lr_schedule.gamma": 0.1,
                    "model.perceptual_outputs": "all", "model.exp_consistency_warp": "affine",
                    "model.bn_batches": "separate", "model.lr_d": 2e-4}}),
    ("mmfa", "| `model.perceptual_outputs` | `final`: the VGG19 pyramid (1, ½, ¼, ⅛) on the final "
             "output only |",
     {("mmfa", T): {"model.perceptual_outputs": "final", "model.exp_consistency_warp":
                    "affine_tps", "model.bn_batches": "joint"},
      ("mmfa", None): {"model.perceptual_outputs": "final", "model.exp_consistency_warp":
                       "affine_tps", "model.bn_batches": "joint"}}),
    ("mmfa", "`gpu-short` raises both to 4e-4 (`lr`, `lr_d`): G and D share one lr",
     {("mmfa", G): {"model.lr": 4e-4, "model.lr_d": 4e-4}}),
    ("mmfa", "No weight decay, no gradient clipping (`train.grad_clip` unset) and no EMA of the "
             "weights, in every preset.",
     {("mmfa", p): {"train.grad_clip": None, "train.ema.modules": []} for p in (T, G, F)}),
    ("mmfa", "Optimisers: Adam, betas (0.5, 0.999), lr 2e-4 for G and D (`tiny`: 1e-3). `full` "
             "uses step decay ×0.1 at 60 %; `tiny` and `gpu-short` use cosine decay with warm-up.",
     {("mmfa", p): {"model.betas": [0.5, 0.999], "model.lr_d": 2e-4} for p in (T, F)}
     | {("mmfa", p): {"train.lr_schedule.kind": "cosine"} for p in (T, G)}),
]


PRESET_ROWS += [
    ("docs/train.md", "CLeBS's video whitening statistics (`whiten`, on in `tiny`;",
     {("export3d_clebs", T): {"model.whiten": True},
      ("export3d_clebs", G): {"model.whiten": False},
      ("export3d_clebs", F): {"model.whiten": False}}),
    ("docs/train.md", "Its recipe: 600 steps, batch 8, 32x32 images, cosine schedule with warm-up, "
                      "EMA of encoder and decoder.",
     {("example", None): {"train.steps": 600, "train.batch_size": 8, "data.resolution": 32,
                          "train.lr_schedule.kind": "cosine", "train.lr_schedule.warmup_steps": 20,
                          "train.ema.modules": ["encoder", "decoder"]}}),
    ("docs/train.md", "The example model has `tiny`: 300 steps, 8 plane channels, 16/16 "
                      "encoder/decoder width",
     {("example", T): {"train.steps": 300, "model.plane_channels": 8,
                       "model.encoder_channels": 16, "model.hidden": 16}}),
]


def _row_id(row) -> str:
    return f"{row[0]}:{row[1][:40]}"


def check_row(guide: str, quote: str, values: dict) -> list[str]:
    """What is wrong with one PRESET_ROWS entry (empty: nothing)."""
    bad = []
    if flat(quote) not in flat(guide_text(guide)):
        page = guide if guide.endswith(".md") else f"docs/models/{guide}.md"
        bad.append(f"{page} does not say {quote!r}")
    for (model, preset), keys in values.items():
        cfg = preset_config(model, preset)
        for key, want in keys.items():
            got = lookup(cfg, key)
            if got != want:
                bad.append(f"{model} --preset {preset}: {key} = {got!r}, the guide says {want!r}")
    return bad


@pytest.mark.parametrize("row", PRESET_ROWS, ids=_row_id)
def test_guide_preset_rows_match_the_presets(row):
    bad = check_row(*row)
    assert not bad, "\n".join(bad)


def test_preset_row_check_fails_on_a_wrong_value_or_quote():
    guide, quote, values = PRESET_ROWS[0]
    wrong = {k: {key: v + 1 for key, v in keys.items()} for k, keys in values.items()}
    assert check_row(guide, quote, wrong)
    assert check_row(guide, quote.replace("256", "265"), values)
    assert not check_row(guide, quote, values)


# --------------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------------

def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _millions(text: str, count: int) -> bool:
    """``text`` ("1.09") is ``count`` in millions, rounded as written."""
    decimals = len(text.partition(".")[2])
    return round(count / 1e6, decimals) == float(text)


def test_export3d_parameter_counts():
    from pyface.models.export3d.clebs import CLeBS, CLeBSConfig
    from pyface.models.export3d.model import Export3D, Export3DConfig

    text = flat(guide_text("export3d"))
    m = re.search(r"Parameters \(`e2e`, generator \+ condition \+ decoder \+ SR;[^)]*\): "
                  r"tiny ([\d.]+) M \(([\d.]+) M of them the expression planes\), gpu-short "
                  r"([\d.]+) M, full ([\d.]+) M; CLeBS f_e ([\d.]+) M \(tiny: linear\) / "
                  r"([\d.]+) M, f_I ([\d.]+) M \(tiny\) / ([\d.]+) M \(gpu-short\) / "
                  r"([\d.]+) M \(full, ResNet-50\)", text)
    assert m, "docs/models/export3d.md: the sentence of parameter counts is not found"
    tiny, planes, gpu, full, fe_tiny, fe, fi_tiny, fi_gpu, fi_full = m.groups()
    with torch.device("meta"):
        g, c = {}, {}
        for p in (T, G, F):
            cfg = dict(preset_config("export3d", p)["model"], cond="e2e")
            net = Export3D(Export3DConfig(**cfg))
            g[p] = sum(_count(getattr(net, k)) for k in ("generator", "cond", "decoder", "sr"))
            if p == T:
                g["planes"] = (sum(_count(mod) for name, mod in net.generator.named_children()
                                   if "expr" in name)
                               + sum(v.numel() for name, v in net.generator.named_parameters(
                                     recurse=False) if "expr" in name))
            c[p] = CLeBS(CLeBSConfig(**preset_config("export3d_clebs", p)["model"]))
    wrong = [f"{what}: the guide says {said} M, the model has {n / 1e6:.4f} M"
             for what, said, n in (
                 ("tiny", tiny, g[T]), ("tiny expression planes", planes, g["planes"]),
                 ("gpu-short", gpu, g[G]), ("full", full, g[F]),
                 ("f_e tiny", fe_tiny, _count(c[T].expr)), ("f_e full", fe, _count(c[F].expr)),
                 ("f_I tiny", fi_tiny, _count(c[T].image_encoder)),
                 ("f_I gpu-short", fi_gpu, _count(c[G].image_encoder)),
                 ("f_I full", fi_full, _count(c[F].image_encoder)))
             if not _millions(said, n)]
    assert not wrong, "docs/models/export3d.md: " + "; ".join(wrong)


def test_mmfa_parameter_table():
    from pyface.models.mmfa.model import MMFA, MMFAConfig

    text = guide_text("mmfa")
    columns = ("appearance", "kp_detector", "pose_encoder", "exp_encoder", "exp_decoder",
               "dense_motion", "decoder")
    rows = {}
    for preset in (T, F):
        m = re.search(rf"^\| {preset} \| ([^\n]*)\|$", text, re.M)
        assert m, f"docs/models/mmfa.md: no row {preset!r} in the parameter table"
        rows[preset] = [c.strip() for c in m.group(1).split("|")]
    wrong = []
    for preset, cells in rows.items():
        with torch.device("meta"):
            net = MMFA(MMFAConfig(**preset_config("mmfa", preset)["model"]))
        counts = [_count(getattr(net, c)) for c in columns]
        counts.append(sum(counts))
        disc = getattr(net, "discriminator", None)
        counts.append("(off)" if disc is None else _count(disc))
        written = [c if c == "(off)" else int(c.replace(",", "")) for c in cells]
        if written != counts:
            wrong.append(f"{preset}: the guide says {written}, the model has {counts}")
        head = _count(net.exp_landmark_head)
        if f"{head:,} in `{preset}`" not in text:
            wrong.append(f"{preset}: the expression-landmark head has {head:,} parameters")
    assert not wrong, "docs/models/mmfa.md: " + "; ".join(wrong)


def test_otavatar_controller_parameter_counts():
    from pyface.nn import MotionController, MotionControllerConfig

    text = flat(guide_text("otavatar"))
    tied = _count(MotionController())
    untied = _count(MotionController(MotionControllerConfig(tie_mlp=False)))
    said = (f"The full-size controller has {tied:,} parameters (`MotionController()`; "
            f"`tie_mlp=False`: {untied:,}).")
    assert said in text, f"docs/models/otavatar.md: expected {said!r}"
    assert f"({tied:,} unique parameters)" in text


def test_otavatar_tiny_generator_sizes():
    """The sizes the OTAvatar guide gives for the generator of its `tiny` EG3D stage."""
    from pyface.models.eg3d import EG3DGenerator
    from pyface.models.eg3d.config import EG3DGeneratorConfig
    from pyface.train.config import from_dict

    gen = preset_config("eg3d", T)["model"]["generator"]
    with torch.device("meta"):
        G = EG3DGenerator(from_dict(EG3DGeneratorConfig, gen))
    r = gen["neural_rendering_resolution"]
    said = (f"works on the `eg3d --preset tiny` generator: w {gen['w_dim']}, {G.num_ws} W+ layers, "
            f"planes 3 x {gen['plane_channels']} x {gen['backbone_resolution']}², render {r}² "
            f"with {gen['render']['depth_resolution']} + "
            f"{gen['render']['depth_resolution_importance']} samples, {gen['sr_variant']} "
            f"super-resolution to {gen['img_resolution']}²")
    assert said in flat(guide_text("otavatar")), f"docs/models/otavatar.md: expected {said!r}"


def test_otavatar_tiny_stage_settings():
    """The OTAvatar guide's `tiny` EG3D stage: `model.background=data`, `train.steps=1200`
    (OTAvatar's `Stage.presets`), the stage model `eg3d` with the same preset otherwise."""
    from pyface.models.otavatar.model import OTAvatar

    (stage,) = OTAvatar.stages
    said = ("stage `eg3d --preset tiny` with the data's backgrounds and 1200 steps "
            "(`model.background=data`, `train.steps=1200`: OTAvatar's `Stage.presets`)")
    assert said in flat(guide_text("otavatar"))
    over = stage.presets["tiny"]
    assert (stage.model, stage.checkpoint_key) == ("eg3d", "generator")
    assert over["model"]["background"] == "data" and over["train"]["steps"] == 1200


# --------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------

def _options(model: str, method: str) -> list:
    """(name, default) of the keyword options of a pipeline method (after state and motion for
    ``generate``, after the source for ``encode_source``)."""
    import inspect

    from pyface.train.registry import model_class

    sig = inspect.signature(getattr(model_class(model).Pipeline, method))
    skip = 3 if method == "generate" else 2
    return [(n, p.default) for n, p in list(sig.parameters.items())[skip:]]


def test_train_md_lists_each_models_generate_controls():
    names = {m: [n for n, _ in _options(m, "generate") if n != "camera"]
             for m in ("example", "goha", "export3d", "mmfa", "eg3d", "otavatar")}
    assert names["eg3d"] == [] and names["otavatar"] == []
    join = lambda m: ", ".join(f"`{n}`" for n in names[m])          # noqa: E731
    said = (f"The controls of each model: the example's {join('example')}; GOHA's {join('goha')}; "
            f"Export3D's {join('export3d')}; MMFA's {join('mmfa')}; EG3D takes none.")
    assert said in flat(guide_text("docs/train.md")), f"docs/train.md: expected {said!r}"


def test_guides_state_the_pipelines_signatures():
    mmfa = ", ".join(f"{n}={d!r}".replace("'", '"') for n, d in _options("mmfa", "generate"))
    said = f"`generate(state, motion, *, {mmfa})`"
    assert said in flat(guide_text("mmfa")), f"docs/models/mmfa.md: expected {said!r}"
    eg3d = dict(_options("eg3d", "encode_source"))
    assert eg3d == {"space": "w+", "steps": None}
    assert '`encode_source({"image", "camera"}, steps=None, space="w+")`' in guide_text("eg3d")
    ota = [n for n, _ in _options("otavatar", "encode_source")]
    assert ota == ["steps", "space", "pti_steps", "pti_metric", "profile", "clip", "clamp",
                   "wplus_keep_intrinsics", "pti_mode"]
    assert ("options: `steps` (`invert_steps`), `space` (`\"w\"` / `\"w+\"`, else a "
            "`ValueError`), `pti_steps`, `pti_metric`, `profile`, `clip`, `clamp`, "
            "`wplus_keep_intrinsics`, `pti_mode`") in flat(guide_text("otavatar"))
    exp = dict(_options("export3d", "generate"))
    assert exp == {"camera": "driving", "lam_scale": None, "chunk": 16}
    goha = dict(_options("goha", "generate"))
    assert goha == {"expression": True, "appearance": True, "composite": True}
    assert "`generate(..., composite=True)` (default)" in flat(guide_text("goha"))


# --------------------------------------------------------------------------------------------
# acceptance tables
# --------------------------------------------------------------------------------------------

NUMBER = re.compile(r"(?<![\w.])[−+-]?\d+(?:[.,]\d+)*(?:x|×)?")


@pytest.mark.parametrize("name", ["otavatar", "goha", "export3d", "mmfa"])
def test_acceptance_numbers_are_in_the_measurement_record(name):
    """Every number in the result column of a guide's "Where the acceptance stands" table is
    written in its measurement record (docs/models/<name>-measured.md), sign and ``x`` aside:
    the guide quotes the record and does not compute or round numbers of its own."""
    record = guide_text(f"{name}-measured")
    section = guide_text(name).split("## Where the acceptance stands", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("|") and not r.startswith("|---")]
    assert len(rows) > 5, f"docs/models/{name}.md: the acceptance table is not found"
    missing = []
    for row in rows[1:]:
        result = re.sub(r"\]\([^)]*\)", "]", row.strip().strip("|").split("|")[-1])
        for n in NUMBER.findall(result):
            if n.lstrip("+-−").rstrip("x×") not in record:
                missing.append(f"{n} ({row.strip('|').split('|')[0].strip()[:50]})")
    assert not missing, f"docs/models/{name}.md: not in {name}-measured.md: " + ", ".join(missing)


RECORDS = {"eg3d": "eg3d", "otavatar": "otavatar-measured", "goha": "goha-measured",
           "export3d": "export3d-measured", "mmfa": "mmfa-measured"}


def test_readme_model_rows_quote_the_records():
    """Every number in the README's row of a model (its models table, outside code spans) is
    written in the model's measurement record (EG3D: its guide)."""
    readme = guide_text("README.md")
    table = readme.split("| model | status | presets |", 1)[1].split("\n\n", 1)[0]
    missing, seen = [], set()
    for row in table.splitlines():
        m = re.match(r"\| `(\w+)` \|", row)
        if not m or m.group(1) not in RECORDS:
            continue
        seen.add(m.group(1))
        record = guide_text(RECORDS[m.group(1)])
        text = re.sub(r"`[^`]*`", "", re.sub(r"\]\([^)]*\)", "]", row))
        missing += [f"{m.group(1)}: {n}" for n in NUMBER.findall(text)
                    if n.lstrip("+-−").rstrip("x×") not in record]
    assert seen == set(RECORDS), f"README.md: model rows not found: {set(RECORDS) - seen}"
    assert not missing, "README.md: not in the measurement records: " + ", ".join(missing)
