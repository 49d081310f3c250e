"""Pure-PyTorch reference twins of every pyface op.

They define the semantics (each mirrors the public code it replaces, quirks included), run on any
device, are what the tests compare every kernel against, and are the ``backend="reference"`` path.
"""
from pyface.ops.reference.triplane import triplane_sample_reference

__all__ = ["triplane_sample_reference"]
