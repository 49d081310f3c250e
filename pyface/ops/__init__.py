"""Public functional API of pyface's fused ops.

Every op validates its arguments, picks a backend (``backend=None``: the best available for the
tensors' device; see ``python -m pyface.info``) and is differentiable. The pure-PyTorch reference
twin of each op lives in :mod:`pyface.ops.reference`.
"""
from pyface.ops.raster import (BFMCamera, points_to_triplane, project_points, rasterize_mesh,
                               splat_points)
from pyface.ops.triplane import triplane_sample

__all__ = ["triplane_sample", "rasterize_mesh", "project_points", "BFMCamera", "splat_points",
           "points_to_triplane"]
