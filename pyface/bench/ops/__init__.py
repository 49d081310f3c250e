"""Benchmark cases, one module per op family. Each module defines
``cases(device: torch.device, size: str) -> list[BenchCase]`` with ``size`` in ("small", "full");
``pyface bench`` discovers them."""
