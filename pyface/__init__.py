"""pyface: fused tri-plane / volume-rendering / rasterization / 3D-warp kernels and trainable
3D-aware portrait-animation models.

``import pyface`` is cheap and side-effect free: it compiles nothing and imports neither the
compiled extension nor Triton. Those load on the first op call (see ``python -m pyface.info``).
"""
import importlib as _importlib

__version__ = "0.1.0"

_SUBMODULES = ("ops", "nn", "info", "testing")
__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"pyface.{name}")
    raise AttributeError(f"module 'pyface' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
