"""pytest-benchmark suite of the rasterization family (the cases of ``pyface bench raster``).

Run: ``pytest bench/test_bench_raster.py --benchmark-only`` (forward passes; ``pyface bench
raster`` also times the backward and measures peak memory). Measurements, never assertions.
"""
import pytest
import torch

from pyface.bench.ops.raster import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = "full" if DEVICE.type == "cuda" else "small"
PARAMS = [(c, name) for c in cases(DEVICE, SIZE) for name in c.providers]


@pytest.mark.parametrize("case,provider", PARAMS,
                         ids=[f"{c.op}-{c.shape}-{p}" for c, p in PARAMS])
def test_forward(benchmark, case, provider):
    inputs = case.make_inputs(DEVICE, 0)
    fn = case.providers[provider]

    def run():
        with torch.no_grad():
            fn(*inputs)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(case.params)
    benchmark.pedantic(run, rounds=3 if provider == "reference" else 10, warmup_rounds=1)
