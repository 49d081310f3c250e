"""Import the reference packages the metric tests compare against (lpips, pytorch_fid).

Both import torchvision. A torchvision wheel built for a different torch flavour (for example the
CUDA wheel beside a CPU-only torch) fails in its top-level ``__init__`` while registering its
compiled operators, although its model definitions are plain Python. When that happens, this
helper registers a bare ``torchvision`` package object pointing at the installed files, so that
``torchvision.models`` (pure Python) still loads; the compiled operators are not needed here.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types


def _torchvision() -> None:
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - any failure of the compiled part
        for name in [n for n in sys.modules if n == "torchvision" or
                     n.startswith("torchvision.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError("torchvision is not installed (pip install -e .[test])")
    pkg = types.ModuleType("torchvision")
    pkg.__path__ = [os.path.dirname(spec.origin)]
    pkg.__file__ = spec.origin
    pkg.__version__ = "unknown"
    sys.modules["torchvision"] = pkg


def reference(name: str):
    """Import ``name`` (lpips, pytorch_fid.inception, torchvision.models ...)."""
    _torchvision()
    return importlib.import_module(name)
