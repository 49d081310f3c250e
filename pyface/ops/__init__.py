"""Public functional API of pyface's fused ops.

Every op validates its arguments, picks a backend (``backend=None``: the best available for the
tensors' device; see ``python -m pyface.info``) and is differentiable. The pure-PyTorch reference
twin of each op lives in :mod:`pyface.ops.reference`.
"""
from pyface.ops.triplane import triplane_sample

__all__ = ["triplane_sample"]
