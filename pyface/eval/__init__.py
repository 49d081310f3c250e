"""Evaluation of reenactment pipelines (``pyface eval``; see docs/eval.md).

* :mod:`pyface.eval.metrics`: per-pair image metrics by name (psnr, ssim), each with its protocol;
* :mod:`pyface.eval.evaluate`: :func:`evaluate` runs a pipeline over
  :func:`pyface.data.reenactment_pairs` and :class:`CopySource` is the copy-source baseline;
* :mod:`pyface.eval.warp_baseline`: :class:`WarpBaseline`, the thin-plate-spline warp baseline;
* :mod:`pyface.eval.lpips`, :mod:`pyface.eval.fid`, :mod:`pyface.eval.identity`: LPIPS, FID / KID
  and CSIM with user-supplied weights (:mod:`pyface.eval.weights`);
* :mod:`pyface.eval.motion`: akd, aed / apd (pyface's 3DMM fit) and aed_id (ArcFace identity
  distance); :mod:`pyface.eval.landmarks`: the landmark detector interface and pyface's MediaPipe
  detector (the ``prepare`` extra);
* :mod:`pyface.eval.cli`: the command, its JSON report, tables and PNG sheets;
  :mod:`pyface.eval.distributed`: the command under torchrun (the ranks share the pairs,
  :func:`pyface.eval.evaluate.merge_results` joins their results on rank 0).
"""
import importlib as _importlib

_LAZY = {"evaluate": "pyface.eval.evaluate", "CopySource": "pyface.eval.evaluate",
         "EvalResult": "pyface.eval.evaluate", "run": "pyface.eval.cli",
         "data_hash": "pyface.eval.cli", "METRICS": "pyface.eval.metrics",
         "psnr": "pyface.eval.metrics", "ssim": "pyface.eval.metrics",
         "jitter": "pyface.eval.metrics", "load_networks": "pyface.eval.evaluate",
         "WarpBaseline": "pyface.eval.warp_baseline", "tps_warp": "pyface.eval.warp_baseline",
         "data_kind": "pyface.eval.evaluate", "akd": "pyface.eval.motion",
         "aed": "pyface.eval.motion", "apd": "pyface.eval.motion",
         "identity_distance": "pyface.eval.motion", "get_detector": "pyface.eval.landmarks",
         "MediaPipeDetector": "pyface.eval.landmarks",
         "merge_results": "pyface.eval.evaluate", "shard_groups": "pyface.eval.evaluate"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyface.eval' has no attribute {name!r}")


__all__ = sorted(_LAZY)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
