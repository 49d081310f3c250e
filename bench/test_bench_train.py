"""Training engine under pytest-benchmark: one ``Trainer.train_step`` of the example model vs the
bare loop, and checkpoint save / load of EG3D's 29M-parameter backbone.

    pytest bench/test_bench_train.py --benchmark-only [--bench-device cuda]

(``python -m pyface.bench.train`` reports the overhead directly, interleaved.)
"""
import os

import pytest
import torch

from bench.conftest import run_benchmark

pytestmark = pytest.mark.benchmark(group="train")


@pytest.fixture
def trainer(tmp_path, bench_device):
    from pyface.train import Trainer, build_experiment
    from pyface.train.example import TriplaneAutoencoder as M

    cfg = build_experiment("example", M.Config, defaults=M.recipe, overrides=[
        f"train.run_dir={tmp_path}", "train.progress=false", "train.tensorboard=false",
        f"train.device={bench_device}"])
    return Trainer(cfg)


@pytest.mark.parametrize("loop", ["bare", "engine"])
def test_train_step(benchmark, trainer, bench_device, loop):
    batch = trainer.preview_batch(trainer.cfg.train.batch_size)
    model, opt = trainer.model, trainer.optimizers["main"]

    def bare():
        opt.zero_grad(set_to_none=True)
        model.step("main", batch, None)["loss"].backward()
        opt.step()

    run_benchmark(benchmark, bare if loop == "bare" else lambda: trainer.train_step(batch),
                  bench_device)


@pytest.fixture(scope="module")
def backbone_state():
    from pyface.nn.stylegan import TriplaneBackbone

    torch.manual_seed(0)
    return {f"model.{k}": v for k, v in TriplaneBackbone().state_dict().items()}


def test_checkpoint_save(benchmark, tmp_path, backbone_state):
    from pyface.checkpoint import save_folder

    path = os.path.join(tmp_path, "ckpt")
    run_benchmark(benchmark, lambda: save_folder(path, backbone_state, {"step": 0}),
                  torch.device("cpu"))


def test_checkpoint_load(benchmark, tmp_path, backbone_state):
    from pyface.checkpoint import load_folder, save_folder

    path = save_folder(os.path.join(tmp_path, "ckpt"), backbone_state, {"step": 0})
    run_benchmark(benchmark, lambda: load_folder(path), torch.device("cpu"))
