"""GOHA's data-side renders (pyface.models.goha.data): the per-sample transform gives the same
pseudo-renders, region masks and neutral render as the model step, every mode's loss is the
same with and without them, the engine applies the transform in the loader, bad input."""
from __future__ import annotations

import pickle

import pytest
import torch

from pyface.models.goha import GOHA
from pyface.models.goha.data import DRIVING_KEYS, SOURCE_KEYS, GOHARenders
from pyface.train import Trainer
from pyface.train.engine import MappedDataset

from test_model_goha import (FAST, data_root, experiment, frame,  # noqa: F401 (fixture)
                             random_coeffs, tiny_config)


def _items(B=2):
    src, drv = frame(random_coeffs(B, seed=6)), frame(random_coeffs(B, seed=7))
    items = [{"source": {k: v[i] for k, v in src.items()},
              "driving": {k: v[i] for k, v in drv.items()}} for i in range(B)]
    return items, {"source": src, "driving": drv}


def _stack(items):
    return torch.utils.data.default_collate(items)


def test_transform_matches_the_model_step_renders():
    cfg = tiny_config()
    m = GOHA(cfg)
    items, batch = _items()
    done = _stack([GOHARenders(cfg)(it) for it in items])
    R, r = cfg.resolution, cfg.render_resolution
    sides = {"R": R, "r": r}
    for role, keys in (("source", SOURCE_KEYS), ("driving", DRIVING_KEYS)):
        for k, (ch, s) in keys.items():
            assert done[role][k].shape == (2, ch, sides[s], sides[s]), (role, k)
    sc, dc = batch["source"]["coeffs"], batch["driving"]["coeffs"]
    sk, dk = batch["source"]["camera"], batch["driving"]["camera"]
    want = {
        ("source", "goha_region_mask"): m.region_mask(sc, sk, R),
        ("source", "goha_regions_neutral"): m.region_mask(sc, sk, R, neutral=True),
        ("source", "goha_pseudo"): m.pseudo_render(sc, sc[:, 80:144]),
        ("driving", "goha_pseudo"): m.pseudo_render(sc, dc[:, 80:144]),
        ("driving", "goha_target_regions"): m.region_mask(dc, dk, r),
        ("driving", "goha_neutral"): m.neutral_render(dc, dk, r)[0],
        ("driving", "goha_neutral_mask"): m.neutral_render(dc, dk, r)[1],
        ("driving", "goha_mouth"): m.mouth_mask(dc, dk, r),
    }
    for (role, k), w in want.items():
        torch.testing.assert_close(done[role][k], w, atol=1e-5, rtol=1e-5, msg=f"{role}.{k}")
    # the masks are not trivially empty, and the two pseudo-renders differ (the expressions)
    assert done["source"]["goha_region_mask"].sum() > 0
    # the mouth + lips lie inside the driving frame's masked regions, and are a part of them
    mouth, regions = done["driving"]["goha_mouth"], done["driving"]["goha_target_regions"]
    assert 0 < mouth.sum() < regions.sum() and (mouth * (1 - regions)).sum() == 0
    assert (done["source"]["goha_pseudo"] - done["driving"]["goha_pseudo"]).abs().max() > 0.05
    # the transform leaves the frames' own tensors as they were
    for role in ("source", "driving"):
        for k, v in batch[role].items():
            torch.testing.assert_close(done[role][k], v)


@pytest.mark.parametrize("mode", ["cano", "coarse", "src", "tar"])
def test_losses_equal_with_data_side_renders(mode):
    cfg = tiny_config(canonical_until=0, expression_from=0, appearance_from=0,
                      mouth_weight=0.5)
    torch.manual_seed(0)
    m = GOHA(cfg)
    items, batch = _items()
    done = _stack([m.data_transform()(it) for it in items])
    torch.manual_seed(1)
    a, la, oa = m.s1_losses(batch, 0, mode)
    torch.manual_seed(1)
    b, lb, ob = m.s1_losses(done, 0, mode)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ob, oa, atol=1e-5, rtol=1e-5)
    assert la.keys() == lb.keys()


def test_engine_applies_the_transform_and_the_flag(tmp_path, data_root):  # noqa: F811
    tr = Trainer(experiment(tmp_path / "on", data_root, "train.steps=1"))
    assert isinstance(tr.dataset, MappedDataset)
    item = tr.dataset[0]
    assert "goha_pseudo" in item["driving"] and "goha_region_mask" in item["source"]
    assert len(tr.dataset) == len(tr.dataset.dataset)
    # picklable for the loader's worker processes (the morphable model is rebuilt there)
    again = pickle.loads(pickle.dumps(tr.dataset))
    torch.testing.assert_close(again[0]["driving"]["goha_neutral"], item["driving"]["goha_neutral"])
    tr.fit()
    off = Trainer(experiment(tmp_path / "off", data_root, "train.steps=1",
                             "model.data_renders=false"))
    assert not isinstance(off.dataset, MappedDataset)
    # on in tiny; off by default (GOHA's scale: the step renders on the accelerator)
    assert tiny_config().data_renders and not GOHA.Config().data_renders


def test_bad_input():
    cfg = tiny_config()
    t = GOHARenders(cfg)
    items, batch = _items(1)
    with pytest.raises(KeyError, match="item\\['driving'\\]"):
        t({"source": items[0]["source"]})
    bad = {"source": dict(items[0]["source"], coeffs=torch.zeros(80)),
           "driving": items[0]["driving"]}
    with pytest.raises(ValueError, match=r"item\['source'\]\['coeffs'\]: expected shape \(257,\)"):
        t(bad)
    # renders made for another config are refused by the model, naming the key
    done = _stack([t(items[0])])
    done["driving"]["goha_pseudo"] = done["driving"]["goha_pseudo"][..., :32, :32]
    with pytest.raises(ValueError, match="goha_pseudo.*another config"):
        GOHA(tiny_config(canonical_until=0, expression_from=0)).s1_losses(done, 0, "coarse")
