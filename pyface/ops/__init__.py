"""Public functional API of pyface's fused ops.

Every op validates its arguments, picks a backend (``backend=None``: the default for the tensors'
device from the table in ``pyface._opspecs``; see ``python -m pyface.info``) and is
differentiable. The pure-PyTorch reference
twin of each op lives in :mod:`pyface.ops.reference`.

Code that calls ``torch.ops.pyface.*`` directly calls :func:`load_library` first (the functions
here load it on first use).
"""
from pyface._backend import load_library
from pyface.ops.raster import (BFMCamera, points_to_triplane, project_points, rasterize_mesh,
                               splat_points)
from pyface.ops.render import (
    mip_composite,
    ray_bundle,
    render_triplane,
    sample_importance,
    sample_stratified,
)
from pyface.ops.triplane import triplane_sample
from pyface.ops.warp import keypoint_flow, motion_field_input, warp_by_keypoints, warp_volume

__all__ = ["load_library", "triplane_sample", "rasterize_mesh", "project_points", "BFMCamera",
           "splat_points", "points_to_triplane", "ray_bundle", "sample_stratified", "mip_composite",
           "sample_importance", "render_triplane", "warp_volume", "keypoint_flow",
           "warp_by_keypoints", "motion_field_input"]
