"""Public functional API of pyface's fused ops.

Every op validates its arguments, picks a backend (``backend=None``: the best available for the
tensors' device; see ``python -m pyface.info``) and is differentiable. The pure-PyTorch reference
twin of each op lives in :mod:`pyface.ops.reference`.
"""
from pyface.ops.triplane import triplane_sample
from pyface.ops.warp import keypoint_flow, motion_field_input, warp_by_keypoints, warp_volume

__all__ = ["triplane_sample", "warp_volume", "keypoint_flow", "warp_by_keypoints",
           "motion_field_input"]
