"""Pure-PyTorch reference twins of every pyface op.

They define the semantics (each mirrors the public code it replaces, quirks included), run on any
device, are what the tests compare every kernel against, and are the ``backend="reference"`` path.
"""
from pyface.ops.reference.raster import (points_to_triplane_reference, rasterize_mesh_reference,
                                         splat_points_reference)
from pyface.ops.reference.render import (
    mip_composite_reference,
    ray_bundle_reference,
    render_triplane_reference,
    sample_importance_reference,
    sample_stratified_reference,
)
from pyface.ops.reference.triplane import triplane_sample_reference
from pyface.ops.reference.warp import (keypoint_flow_reference, motion_field_input_reference,
                                       warp_by_keypoints_reference, warp_volume_reference)

__all__ = ["triplane_sample_reference", "rasterize_mesh_reference", "splat_points_reference",
           "points_to_triplane_reference", "ray_bundle_reference", "sample_stratified_reference",
           "mip_composite_reference", "sample_importance_reference", "render_triplane_reference",
           "warp_volume_reference", "keypoint_flow_reference", "warp_by_keypoints_reference",
           "motion_field_input_reference"]
