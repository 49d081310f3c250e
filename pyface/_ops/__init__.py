"""Op registration layer: torch.library custom ops for the C++ kernels (fake kernels, autograd)
and ``torch.library.triton_op`` wrappers for the Triton kernels.

Every module here that defines ``register_cpp()`` is called once, when ``pyface._C`` loads.
Models never import this package: they use ``pyface.ops``.
"""
