"""Pure-PyTorch reference twins of every pyface op.

They define the semantics (each mirrors the public code it replaces, quirks included), run on any
device, are what the tests compare every kernel against, and are the ``backend="reference"`` path.
"""
from pyface.ops.reference.raster import (points_to_triplane_reference, rasterize_mesh_reference,
                                         splat_points_reference)
from pyface.ops.reference.triplane import triplane_sample_reference

__all__ = ["triplane_sample_reference", "rasterize_mesh_reference", "splat_points_reference",
           "points_to_triplane_reference"]
