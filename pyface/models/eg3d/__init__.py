"""EG3D (Chan et al., "Efficient Geometry-aware 3D Generative Adversarial Networks", CVPR 2022)
as a pyface model: the generator with released-weight loading, and ``pyface train eg3d``.

Reproduces the semantics of NVlabs/eg3d (NVIDIA Source Code License, non-commercial); the code
is pyface's own. See docs/models/eg3d.md.
"""
from pyface.models.eg3d.config import EG3DConfig, EG3DDiscriminatorConfig, EG3DGeneratorConfig
from pyface.models.eg3d.generator import EG3DGenerator

__all__ = ["EG3DConfig", "EG3DDiscriminatorConfig", "EG3DGenerator", "EG3DGeneratorConfig"]
