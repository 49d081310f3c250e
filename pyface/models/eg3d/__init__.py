"""EG3D (Chan et al., "Efficient Geometry-aware 3D Generative Adversarial Networks", CVPR 2022)
as a pyface model: the generator with released-weight loading, and ``pyface train eg3d``.

Reproduces the semantics of NVlabs/eg3d (NVIDIA Source Code License, non-commercial); the code
is pyface's own. See docs/models/eg3d.md.
"""
from pyface.models.eg3d.config import EG3DConfig, EG3DDiscriminatorConfig, EG3DGeneratorConfig
from pyface.models.eg3d.generator import EG3DGenerator


def load_pipeline(path: str, *, device=None, ema: bool = True):
    """``pyface.models.load("eg3d", path)``: a converted EG3D folder, a training checkpoint or
    a run folder -> :class:`~pyface.models.eg3d.pipeline.EG3DPipeline` (EMA generator)."""
    from pyface.models.eg3d.pipeline import EG3DPipeline

    return EG3DPipeline.from_checkpoint(path, device=device, ema=ema)


__all__ = ["EG3DConfig", "EG3DDiscriminatorConfig", "EG3DGenerator", "EG3DGeneratorConfig",
           "load_pipeline"]
