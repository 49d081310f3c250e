"""The ``mixture`` dataset: components sampled by weight over one root, deterministic in
(seed, epoch, index), items that collate together, and its config errors."""
import collections

import numpy as np
import pytest
import torch

from pyface.data import format as fmt
from pyface.data import synthetic as S
from pyface.data.datasets import MixtureDataset, MultiViewDataset, PairDataset
from pyface.train import registry
from pyface.train.config import ConfigError, DataConfig, build_experiment, experiment_to_dict
from pyface.train.distributed import StepBatchSampler
from pyface.train.example import TriplaneAutoencoder

RES = 32
MIX = {"pairs": {"weight": 2}, "multiview": {"weight": 1}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """2 identities x 1 video x 6 frames at 32^2 with the second views."""
    out = str(tmp_path_factory.mktemp("mix") / "ds")
    S.generate(out, S.SynthConfig(identities=2, videos_per_identity=1, frames=6, resolution=RES,
                                  workers=1, cross=False, multiview=True), progress=False)
    return out


def mixture(root, components=None, **options):
    cfg = DataConfig(name="mixture", path=str(root), resolution=RES,
                     options={"components": components or MIX, **options})
    return registry.build_dataset(cfg)


def comps(ds) -> np.ndarray:
    return np.array([ds.locate(i)[0] for i in range(len(ds))])


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# proportions and layout


def test_weights_give_the_proportions(root):
    ds = mixture(root)
    assert isinstance(ds, MixtureDataset) and ds.names == ["pairs", "multiview"]
    n_pairs, n_mv = 12 * 8, 12                       # pairs repeats 8 times; 12 multiview frames
    assert list(ds.lengths) == [n_pairs, n_mv]
    # automatic length: the smallest in which pairs (2/3) covers all its items
    assert len(ds) == n_pairs * 3 // 2 and list(ds.counts) == [96, 48]
    c = comps(ds)
    assert np.bincount(c).tolist() == [96, 48]       # exact over an epoch
    for start in range(0, len(ds) - 12, 5):          # interleaved: any 12 in a row nearly 2 : 1
        assert abs(int((c[start:start + 12] == 1).sum()) - 4) <= 1
    # every item of every component is used; multiview's 12 items each 4 times
    inner = collections.defaultdict(list)
    for i in range(len(ds)):
        k, j = ds.locate(i)
        inner[k].append(j)
    assert sorted(set(inner[0])) == list(range(n_pairs))
    assert collections.Counter(inner[1]) == {j: 4 for j in range(n_mv)}
    # the component index is in every item; the engine's sampler draws 2 : 1 over an epoch
    assert int(ds[1]["component"]) == int(c[1])
    sampler = StepBatchSampler(len(ds), 4, seed=3)
    drawn = [int(c[i]) for s in range(len(ds) // 4) for i in sampler.batch_indices(s)]
    assert collections.Counter(drawn) == {0: 96, 1: 48}


def test_weights_5_to_1_explicit_length_and_zero_weight(root):
    ds = mixture(root, {"pairs": {"weight": 5}, "multiview": {"weight": 1},
                        "cross": {"dataset": "pairs", "weight": 0,
                                  "options": {"mode": "cross_identity"}}}, length=30)
    assert ds.names == ["pairs", "multiview"]        # weight 0: left out
    assert len(ds) == 30 and np.bincount(comps(ds)).tolist() == [25, 5]
    # fewer slots than items: distinct items, another draw in another epoch
    a = [ds.locate(i)[1] for i in range(30) if ds.locate(i)[0] == 0]
    assert len(set(a)) == 25
    ds.set_epoch(1)
    b = [ds.locate(i)[1] for i in range(30) if ds.locate(i)[0] == 0]
    assert len(set(b)) == 25 and a != b
    ds.set_epoch(0)
    assert [ds.locate(i)[1] for i in range(30) if ds.locate(i)[0] == 0] == a
    with pytest.raises(IndexError, match=r"index: expected 0 <= index < 30, got 30"):
        ds.locate(30)


# ----------------------------------------------------------------------------------------------
# determinism


def test_items_are_a_function_of_seed_epoch_index(root):
    a, b = mixture(root), mixture(root)
    idx = [0, 1, 2, 5, 40, 77, 143]
    for i in idx:
        assert same(a[i], b[i])
    # the components' own draws follow the epoch (pairs: the source frame; multiview: the swap)
    a.set_epoch(1)
    assert all(ds.epoch == 1 for ds in a.datasets)
    assert any(not same(a[i], b[i]) for i in idx)
    b.set_epoch(1)
    for i in idx:
        assert same(a[i], b[i])
    # another seed, other draws
    other = registry.build_dataset(DataConfig(name="mixture", path=str(root), resolution=RES,
                                              seed=1, options={"components": MIX}))
    assert any(not same(other[i], b[i]) for i in idx)


def test_workers_and_ranks_see_the_same_items(root):
    ds = mixture(root)

    def batches(workers, rank=0, world=1, steps=3):
        sampler = StepBatchSampler(len(ds), 4, rank=rank, world_size=world, seed=5, steps=steps)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        return list(loader)

    one = batches(0)
    for x, y in zip(one, batches(2)):
        assert same(x, y)
    r0, r1 = batches(0, 0, 2), batches(0, 1, 2)
    for x, a, b in zip(one, r0, r1):
        assert same(x, {k: torch.cat([a[k], b[k]]) if torch.is_tensor(a[k])
                        else {f: torch.cat([a[k][f], b[k][f]]) for f in a[k]} for k in a})


# ----------------------------------------------------------------------------------------------
# collation


def test_items_of_both_components_collate(root):
    ds = mixture(root)
    c = comps(ds)
    i_pairs, i_mv = int(np.nonzero(c == 0)[0][0]), int(np.nonzero(c == 1)[0][0])
    p, m = ds[i_pairs], ds[i_mv]
    assert p.keys() == m.keys() == {"source", "driving", "component"}
    assert p["source"].keys() == m["source"].keys()
    # `view` (multiview's) is filled with 0 in the pairs' frames: camera 0
    assert int(p["source"]["view"]) == int(p["driving"]["view"]) == 0
    assert {int(m["source"]["view"]), int(m["driving"]["view"])} == {0, 1}
    batch = torch.utils.data.default_collate([p, m])
    assert batch["source"]["image"].shape == (2, 3, RES, RES)
    assert batch["source"]["image"].dtype == torch.uint8
    assert batch["driving"]["view"].dtype == torch.int64 and batch["component"].tolist() == [0, 1]
    # the same items as the components give them
    pd, md = PairDataset, MultiViewDataset
    assert isinstance(ds.datasets[0], pd) and isinstance(ds.datasets[1], md)
    k, j = ds.locate(i_mv)
    assert same(ds.datasets[k][j]["driving"], m["driving"])
    assert ds.dropped_keys == []


def test_keys_not_in_every_component_are_dropped_or_filled():
    a = [{"x": torch.tensor(1.0), "extra": torch.tensor(3), "f": {"y": torch.zeros(2)}}] * 4
    b = [{"x": torch.tensor(2.0), "f": {"y": torch.ones(2), "view": torch.tensor(1)}}] * 2
    with pytest.warns(UserWarning, match=r"keys not in every component's items are dropped: extra"):
        ds = MixtureDataset({"a": a, "b": b}, {"a": 1, "b": 1})
    assert ds.dropped_keys == ["extra"] and len(ds) == 8
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        assert set(it) == {"x", "f", "component"} and set(it["f"]) == {"y", "view"}
        assert int(it["f"]["view"]) == (1 if int(it["component"]) == 1 else 0)
    torch.utils.data.default_collate(items)
    # a key with another shape in another component cannot collate: an error naming it
    c = [{"x": torch.zeros(3), "f": {"y": torch.ones(2)}}]
    with pytest.raises(fmt.DataError, match=r"key 'x' differs between components: a \(\) "
                                            r"torch.float32, c \(3,\) torch.float32"):
        MixtureDataset({"a": a, "c": c}, {"a": 1, "c": 1})
    d = [{"x": torch.tensor(1.0), "f": torch.zeros(2)}]
    with pytest.raises(fmt.DataError, match=r"key 'f' is a dict in some components"):
        MixtureDataset({"a": a, "d": d}, {"a": 1, "d": 1})


# ----------------------------------------------------------------------------------------------
# config


def test_config_from_set_and_round_trip(root):
    M = TriplaneAutoencoder
    sets = ["data.name=mixture", "data.options.components.pairs.weight=2",
            "data.options.components.pairs.options.min_gap=2",
            "data.options.components.multiview.weight=1",
            "data.options.synth.identities=3"]
    cfg = build_experiment("example", M.Config, defaults=M.recipe, overrides=sets)
    o = cfg.data.options
    assert isinstance(o, MixtureDataset.Options)
    pairs = o.components["pairs"]
    assert (pairs.dataset, pairs.weight, pairs.options.min_gap) == ("pairs", 2.0, 2)
    assert isinstance(o.components["multiview"].options, MultiViewDataset.Options)
    # every component reads the mixture's set
    assert pairs.options.synth.identities == o.components["multiview"].options.synth.identities == 3
    d = experiment_to_dict(cfg)["data"]
    again = build_experiment("example", M.Config, defaults={"data": d})
    assert again.data.options == o


@pytest.mark.parametrize("components, match", [
    ({}, r"data.options.components: expected at least one component"),
    ({"pairz": {"weight": 1}},
     r"data.options.components.pairz.dataset: unknown dataset 'pairz'; registered: .*mixture"),
    ({"a": {"dataset": "nope"}}, r"data.options.components.a.dataset: unknown dataset 'nope'"),
    ({"pairs": {"weight": -1}}, r"data.options.components.pairs.weight: expected a finite "
                                r"number >= 0, got -1.0"),
    ({"pairs": {"weight": "x"}}, r"data.options.components.pairs.weight: expected float, got 'x'"),
    ({"pairs": {"weight": 0}, "multiview": {"weight": 0}},
     r"data.options.components: every weight is 0; at least one must be > 0 \(got pairs 0, "
     r"multiview 0\)"),
    ({"pairs": {"wieght": 1}},
     r"data.options.components.pairs.wieght: unknown key for MixtureComponent"),
    ({"pairs": {"options": {"min_gapp": 1}}},
     r"data.options.components.pairs.options.min_gapp: unknown key for PairDataset.Options"),
    ({"pairs": {"options": {"synth": {"identities": 5}}}},
     r"data.options.components.pairs.options.synth: the components share the mixture's root; "
     r"set data.options.synth instead"),
    ({"m": {"dataset": "mixture"}},
     r"data.options.components.m.dataset: a mixture cannot be a component of a mixture"),
    ({"procedural": {"options": {"a": 1}}},
     r"data.options.components.procedural.options: dataset 'procedural' takes no options"),
])
def test_bad_config_names_the_field(components, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(name="mixture", options={"components": components})


def test_bad_constructor_input():
    a = [{"x": torch.tensor(1.0)}] * 2
    with pytest.raises(ValueError, match=r"components\['e'\]: empty dataset"):
        MixtureDataset({"a": a, "e": []}, {"a": 1, "e": 1})
    with pytest.raises(ValueError, match=r"weights\['a'\]: expected a finite weight >= 0, got -2"):
        MixtureDataset({"a": a}, {"a": -2})
    with pytest.raises(ValueError, match=r"weights: expected at least one > 0"):
        MixtureDataset({"a": a}, {"a": 0})
    with pytest.raises(ValueError, match=r"weights: expected one weight per component"):
        MixtureDataset({"a": a}, {"b": 1})
    with pytest.raises(ValueError, match=r"length: expected >= 0"):
        MixtureDataset({"a": a}, {"a": 1}, length=-1)
    with pytest.raises(ConfigError, match=r"data.options.length: expected >= 0"):
        DataConfig(name="mixture", options={"components": MIX, "length": -3})
