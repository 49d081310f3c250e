"""Export3D (Ki et al., ECCV 2024): one-shot 3D-aware portrait animation with a conditional
tri-plane generator and a contrastively pre-trained, appearance-free expression code (CLeBS).

* ``export3d_clebs`` (:class:`CLeBS`): stage 1, contrastive pre-training of f_e.
* ``export3d`` (:class:`Export3D`): stage 2, the generator; :class:`Export3DPipeline`.

See docs/models/export3d.md.
"""
from pyface.models.export3d.clebs import CLeBS, CLeBSConfig, ExpressionEncoder, ImageEncoder
from pyface.models.export3d.generator import GeneratorConfig, TriplaneGenerator
from pyface.models.export3d.model import Export3D, Export3DConfig
from pyface.models.export3d.pipeline import Export3DPipeline

__all__ = ["CLeBS", "CLeBSConfig", "ExpressionEncoder", "ImageEncoder", "GeneratorConfig",
           "TriplaneGenerator", "Export3D", "Export3DConfig", "Export3DPipeline"]
