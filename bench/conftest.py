"""pytest-benchmark suite: ``pytest bench/ --benchmark-only`` (CPU by default;
``--bench-device cuda`` on a GPU). Measurements, never pass/fail performance assertions."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cpu", help="cpu or cuda")


@pytest.fixture
def bench_device(request):
    dev = torch.device(request.config.getoption("--bench-device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return dev


def op_step(mode, fn, inputs, loss, leaves, allow_unused=False):
    """The timed step of an op benchmark: ``fn(*inputs)`` without autograd (``mode="fwd"``), or
    ``fn(*inputs)`` and the gradient of ``loss(output)`` w.r.t. ``leaves`` (``"fwd+bwd"``)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(*inputs)
    else:
        def step():
            torch.autograd.grad(loss(fn(*inputs)), leaves, allow_unused=allow_unused)
    return step


def run_benchmark(benchmark, fn, device):
    """Times ``fn`` with pytest-benchmark, synchronising CUDA around every call."""
    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    call()  # warm-up (and compilation for torch.compile providers)
    benchmark.pedantic(call, rounds=10, iterations=1, warmup_rounds=1)
