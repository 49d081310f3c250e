"""GOHA (one-shot 3D head avatar: canonical, expression and appearance tri-planes), stage s1.
See docs/models/goha.md."""
from pyface.models.goha.config import GOHAConfig
from pyface.models.goha.model import GOHA, GOHAPipeline, bfm224_label, mode_of
from pyface.models.goha.networks import Embed2Plane, IDUpsampler

__all__ = ["GOHA", "GOHAConfig", "GOHAPipeline", "Embed2Plane", "IDUpsampler", "bfm224_label",
           "mode_of"]
