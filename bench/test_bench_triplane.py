"""Tri-plane sampling under pytest-benchmark: fwd and fwd+bwd of every available provider
(reference, torch.compile of it, and the pyface backends) at the small shape.

    pytest bench/test_bench_triplane.py --benchmark-only [--bench-device cuda]
"""
import pytest
import torch

from bench.conftest import op_step, run_benchmark
from pyface.bench.ops import triplane

pytestmark = pytest.mark.benchmark(group="triplane_sample")


def _providers(device):
    case = triplane.cases(device, "small")[0]
    providers = dict(case.providers)
    providers["compile"] = torch.compile(providers["reference"], dynamic=False)
    return case, providers


@pytest.mark.parametrize("provider", ["reference", "compile", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_triplane_sample(benchmark, bench_device, provider, mode):
    case, providers = _providers(bench_device)
    if provider not in providers:
        pytest.skip(f"{provider} is not available on {bench_device}")
    fn = providers[provider]
    planes, points = case.make_inputs(bench_device, 0)
    benchmark.extra_info.update(case.params)
    step = op_step(mode, fn, (planes, points), lambda out: out.sum(), (planes, points))
    run_benchmark(benchmark, step, bench_device)
