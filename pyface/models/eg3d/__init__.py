"""EG3D (Chan et al., "Efficient Geometry-aware 3D Generative Adversarial Networks", CVPR 2022)
as a pyface model: the generator with released-weight loading, and ``pyface train eg3d``.

Reproduces the semantics of NVlabs/eg3d (NVIDIA Source Code License, non-commercial); the code
is pyface's own. See docs/models/eg3d.md.
"""
import importlib

# names resolve on first use, so that `pyface --help` (which lists `pyface invert`) imports no
# network code
_LAZY = {"EG3DConfig": "pyface.models.eg3d.config",
         "EG3DDiscriminatorConfig": "pyface.models.eg3d.config",
         "EG3DGeneratorConfig": "pyface.models.eg3d.config",
         "EG3DGenerator": "pyface.models.eg3d.generator"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyface.models.eg3d' has no attribute {name!r}")


def load_pipeline(path: str, *, device=None, ema: bool = True):
    """``pyface.models.load("eg3d", path)``: a converted EG3D folder, a training checkpoint or
    a run folder -> :class:`~pyface.models.eg3d.pipeline.EG3DPipeline` (EMA generator)."""
    from pyface.models.eg3d.pipeline import EG3DPipeline

    return EG3DPipeline.from_checkpoint(path, device=device, ema=ema)


__all__ = ["EG3DConfig", "EG3DDiscriminatorConfig", "EG3DGenerator", "EG3DGeneratorConfig",
           "load_pipeline"]
