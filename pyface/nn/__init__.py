"""Trainable modules built on pyface's fused ops."""
from pyface.nn.motion import (DenseMotion, DenseMotionConfig, Hourglass3d, KeypointTransformConfig,
                              euler_to_rotation, headpose_to_degrees, transform_keypoints)
from pyface.nn.render import (  # noqa: F401
    FullyConnectedLayer,
    OSGDecoder,
    RenderConfig,
    RenderOutput,
    TriplaneRenderer,
    density_l1_regularizer,
    density_monotonic_regularizer,
    query_density,
)
