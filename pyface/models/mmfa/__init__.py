"""MMFA (Li et al. 2026): unsupervised 3D keypoints with a scaled-orthographic transform, an
expression codec and a multi-scale warping generator on the fused 3D-flow ops.

``pyface train mmfa --preset tiny``; ``pyface.models.load("mmfa", run)``. See docs/models/mmfa.md.
"""
from .model import MMFA, MMFAConfig
from .motion import (deep3d_to_keypoint_degrees, deep3d_to_keypoint_rotation,
                     keypoint_rotation_from_degrees, pose_keypoints)
from .pipeline import MMFAPipeline

__all__ = ["MMFA", "MMFAConfig", "MMFAPipeline", "deep3d_to_keypoint_rotation",
           "deep3d_to_keypoint_degrees", "keypoint_rotation_from_degrees", "pose_keypoints"]
