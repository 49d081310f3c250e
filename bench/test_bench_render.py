"""Ray marching / volume rendering under pytest-benchmark: fwd and fwd+bwd of every available
provider (reference, torch.compile of it, the pyface backends) at the small shapes.

    pytest bench/test_bench_render.py --benchmark-only [--bench-device cuda]
"""
import pytest
import torch

from bench.conftest import op_step, run_benchmark
from pyface.bench.ops import render

pytestmark = pytest.mark.benchmark(group="render")

OPS = ("mip_composite", "sample_importance", "render_triplane")
PROVIDERS = ("reference", "compile", "cpu", "cuda", "unfused", "fused", "triton")


def _case(device, op):
    case = next(c for c in render.cases(device, "small") if c.op == op)
    providers = dict(case.providers)
    providers["compile"] = torch.compile(providers["reference"], dynamic=False)
    return case, providers


def _outputs(out):
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [o for o in outs if o.requires_grad]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_render(benchmark, bench_device, op, provider, mode):
    case, providers = _case(bench_device, op)
    if provider not in providers:
        pytest.skip(f"{provider} is not available for {op} on {bench_device}")
    fn = providers[provider]
    inputs = case.make_inputs(bench_device, 0)
    leaves = [x for x in inputs if x.requires_grad]
    if mode == "fwd+bwd" and not leaves:
        pytest.skip(f"{op} has no gradient")
    benchmark.extra_info.update(case.params)
    step = op_step(mode, fn, inputs, lambda out: [o.sum() for o in _outputs(out)], leaves,
                   allow_unused=True)
    run_benchmark(benchmark, step, bench_device)
