"""Synthetic engine and loaders under pytest-benchmark (CPU):

    pytest bench/test_bench_data.py --benchmark-only

End-to-end targets (a 4 x 2 x 32 dataset at 256^2, the pair loader with 2 workers) are measured
by ``pyface data bench``.
"""
import pytest
import torch

from bench.conftest import run_benchmark
from pyface.data import synthetic as S
from pyface.data.datasets import PairDataset
from pyface.face import MorphableModel

pytestmark = pytest.mark.benchmark(group="data")


@pytest.fixture(scope="module")
def model():
    return MorphableModel.builtin()


@pytest.fixture
def one_thread():
    """The targets are per CPU core: time with one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("resolution", [256, 512])
def test_render_frame(benchmark, model, resolution, one_thread):
    """One talking-head frame of the built-in head (render + shading + compositing)."""
    exp, ang, tr, gam = S.sample_motion(model, 0, 0, 0, frames=1, fps=25.0)
    idc, tex, bg = S.sample_identity(model, 0, 0, resolution)
    benchmark.extra_info.update(resolution=resolution, threads=torch.get_num_threads())
    with torch.no_grad():
        run_benchmark(benchmark, lambda: S.render_video(model, idc, tex, bg, exp, ang, tr, gam,
                                                        resolution, batch=1), torch.device("cpu"))


def test_pair_item(benchmark, tmp_path_factory, one_thread):
    """One source/driving pair (two PNG frames, two masks) at 256^2, in-process."""
    root = str(tmp_path_factory.mktemp("bench") / "ds")
    S.generate(root, S.SynthConfig(identities=2, videos_per_identity=1, frames=8, resolution=256,
                                   workers=1, cross=False), progress=False)
    ds = PairDataset(root)
    it = iter(range(10**9))
    run_benchmark(benchmark, lambda: ds[next(it) % len(ds)], torch.device("cpu"))
