"""PyTorch modules built on the fused ops."""
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
