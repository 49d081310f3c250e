"""3D-flow warping under pytest-benchmark: fwd and fwd+bwd of every available provider
(reference, torch.compile of it, and the pyface backends) at the small shapes.

    pytest bench/test_bench_warp.py --benchmark-only [--bench-device cuda]
"""
import pytest
import torch

from bench.conftest import op_step, run_benchmark
from pyface.bench.ops import warp

OPS = ["warp_by_keypoints", "motion_field_input", "warp_volume", "keypoint_flow"]
_compiled = {}


def _case(op, device):
    case = next(c for c in warp.cases(device, "small") if c.op == op)
    providers = dict(case.providers)
    if op not in _compiled:
        _compiled[op] = torch.compile(providers["reference"], dynamic=False)
    providers["compile"] = _compiled[op]
    return case, providers


@pytest.mark.parametrize("provider", ["reference", "compile", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", OPS)
def test_warp(benchmark, bench_device, op, provider, mode):
    case, providers = _case(op, bench_device)
    if provider not in providers:
        pytest.skip(f"{provider} is not available on {bench_device}")
    fn = providers[provider]
    inputs = case.make_inputs(bench_device, 0)
    benchmark.extra_info.update(case.params)
    step = op_step(mode, fn, inputs, lambda out: out.square().sum(), inputs)
    run_benchmark(benchmark, step, bench_device)
