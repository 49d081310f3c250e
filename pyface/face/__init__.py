"""Face toolkit: camera conventions (:mod:`~pyface.face.cameras`), the Deep3DFaceRecon coefficient
layout (:mod:`~pyface.face.coeffs`), the morphable model with its built-in procedural head
(:mod:`~pyface.face.morphable`) and the single mesh-rendering entry point
(:mod:`~pyface.face.render`). See docs/face.md."""
from pyface.face import cameras, coeffs
from pyface.face.coeffs import Coeffs, merge_coeffs, motion_window, split_coeffs
from pyface.face.morphable import MorphableModel, Render
from pyface.face.render import RasterOutput, render_mesh

__all__ = ["cameras", "coeffs", "Coeffs", "merge_coeffs", "split_coeffs", "motion_window",
           "MorphableModel", "Render", "RasterOutput", "render_mesh"]
