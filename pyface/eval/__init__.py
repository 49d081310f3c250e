"""Evaluation of reenactment pipelines (``pyface eval``; see docs/eval.md).

* :mod:`pyface.eval.metrics`: per-pair image metrics by name (psnr, ssim), each with its protocol;
* :mod:`pyface.eval.evaluate`: :func:`evaluate` runs a pipeline over
  :func:`pyface.data.reenactment_pairs` and :class:`CopySource` is the copy-source baseline;
* :mod:`pyface.eval.cli`: the command, its JSON report, table and PNG sheet.
"""
from __future__ import annotations

import importlib

_LAZY = {"evaluate": "pyface.eval.evaluate", "CopySource": "pyface.eval.evaluate",
         "EvalResult": "pyface.eval.evaluate", "run": "pyface.eval.cli",
         "data_hash": "pyface.eval.cli", "METRICS": "pyface.eval.metrics",
         "psnr": "pyface.eval.metrics", "ssim": "pyface.eval.metrics"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyface.eval' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
