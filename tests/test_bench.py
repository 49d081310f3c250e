"""The benchmark harness measures what it says (no performance assertions here)."""
import json
import subprocess
import sys

import torch

from pyface.bench.harness import BenchCase, format_table, peak_memory_mb, run_case


def _case():
    def make_inputs(device, seed):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(64, 64, generator=gen).to(device).requires_grad_()]

    return BenchCase("square", "tiny", {"n": 64}, make_inputs,
                     {"reference": lambda x: x * x, "other": lambda x: x.pow(2)})


def test_run_case_reports_every_provider_and_mode():
    results = run_case(_case(), torch.device("cpu"), min_time=0.01, max_reps=5,
                       compile_reference=False)
    got = {(m.provider, m.mode) for m in results}
    assert got == {(p, m) for p in ("reference", "other") for m in ("fwd", "bwd", "fwd+bwd")}
    for m in results:
        assert m.error is None and m.reps >= 3 and 0 < m.p20_ms <= m.median_ms <= m.p80_ms
    table = format_table(results)
    assert "reference" in table and "other" in table and "1.00x" in table


def test_failing_provider_is_reported_not_raised():
    case = _case()
    case.providers["broken"] = lambda x: x @ torch.zeros(3, 3)
    results = run_case(case, torch.device("cpu"), providers=["broken"], min_time=0.01,
                       max_reps=3, compile_reference=False)
    assert len(results) == 1 and "RuntimeError" in results[0].error


def test_cpu_peak_memory_sees_allocations():
    n = 1 << 20  # 4 MiB of float32

    def alloc_two():
        a = torch.ones(n)
        b = torch.ones(n)
        return a.sum() + b.sum()

    def alloc_one_at_a_time():
        for _ in range(2):
            a = torch.ones(n)
            a.sum()
            del a

    assert 7.9 < peak_memory_mb(alloc_two, torch.device("cpu")) < 8.5
    assert 3.9 < peak_memory_mb(alloc_one_at_a_time, torch.device("cpu")) < 4.5


def test_cli_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pyface", "bench", "triplane", "--device", "cpu",
         "--providers", "cpu", "--no-compile", "--min-time", "0.01", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] == torch.__version__
    modes = {(r["provider"], r["mode"]) for r in data["results"]}
    assert ("cpu", "fwd+bwd") in modes and all(r["error"] is None for r in data["results"])
    assert "triplane_sample" in proc.stdout
