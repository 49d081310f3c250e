"""Trainable modules built on pyface's fused ops."""
from pyface.nn.motion import (DenseMotion, DenseMotionConfig, Hourglass3d, KeypointTransformConfig,
                              euler_to_rotation, headpose_to_degrees, transform_keypoints)
