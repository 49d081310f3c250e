"""GOHA (one-shot 3D head avatar: canonical, expression and appearance tri-planes): stage s1
(:class:`GOHA`, ``goha_s1``), s1_gan (:class:`GOHAGAN`, ``goha_s1_gan``) and s2 with the
super-resolution (:class:`GOHASR`, ``goha``, the final model). See docs/models/goha.md."""
from pyface.models.goha.config import GOHAConfig
from pyface.models.goha.data import GOHARenders
from pyface.models.goha.model import GOHA, GOHAPipeline, bfm224_label, mode_of
from pyface.models.goha.networks import Embed2Plane, IDUpsampler
from pyface.models.goha.stages import GOHAGAN, GOHASR

__all__ = ["GOHA", "GOHAGAN", "GOHASR", "GOHAConfig", "GOHAPipeline", "GOHARenders", "Embed2Plane",
           "IDUpsampler", "bfm224_label", "mode_of"]
