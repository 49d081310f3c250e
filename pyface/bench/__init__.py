"""Benchmark harness: fwd / bwd / fwd+bwd time (median and spread) and peak memory of every
backend of an op against its PyTorch reference and ``torch.compile`` of the reference.

Benchmarks are measurements, never tests: ``pyface bench`` and ``pytest bench/`` run them, and
results are written as JSON (with device and version metadata) under ``bench/results/``.
"""
from pyface.bench.harness import BenchCase, Measurement, environment, run_case

__all__ = ["BenchCase", "Measurement", "environment", "run_case"]
