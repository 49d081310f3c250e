"""Public functional API of pyface's fused ops.

Every op validates its arguments, picks a backend (``backend=None``: the default for the tensors'
device from the table in ``pyface._opspecs``; see ``python -m pyface.info``) and is
differentiable. The pure-PyTorch reference
twin of each op lives in :mod:`pyface.ops.reference`.

``use_backend(name)`` (or the environment variable ``PYFACE_BACKEND=name``) forces every op
called without an explicit ``backend=`` onto one backend, e.g. to compare a model on fused and
on reference ops.

Code that calls ``torch.ops.pyface.*`` directly calls :func:`load_library` first (the functions
here load it on first use).
"""
import contextlib as _contextlib

from pyface import _backend
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


@_contextlib.contextmanager
def use_backend(name: str | None):
    """Force every op called without ``backend=`` onto backend ``name`` inside the block.

    ``name``: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``, or None (no forcing: the
    default choice, or ``PYFACE_BACKEND`` if set). The forcing is process-wide (autograd may run
    an op's backward on another thread) and nests; a forced backend that cannot run an op's
    inputs raises ``BackendUnavailableError`` naming the op, as an explicit ``backend=`` does.
    The context manager wins over ``PYFACE_BACKEND``. Because the forcing is process-wide,
    blocks open in several threads at once share it: the most recently entered block still open
    wins, and leaving a block (in any order, also by an exception) removes only its own forcing.
    """
    if name is not None and name not in _backend.BACKENDS:
        raise ValueError(f"use_backend: expected one of {_backend.BACKENDS} or None, got {name!r}")
    token = object()
    with _backend._lock:
        _backend._forcing.append((token, name))
        _backend._forced = name
    try:
        yield
    finally:
        with _backend._lock:
            stack = _backend._forcing
            del stack[next(i for i, (t, _) in enumerate(stack) if t is token)]
            _backend._forced = stack[-1][1] if stack else None


__all__ = ["use_backend", "load_library", "triplane_sample", "rasterize_mesh", "project_points", "BFMCamera",
           "splat_points", "points_to_triplane", "ray_bundle", "sample_stratified", "mip_composite",
           "sample_importance", "render_triplane", "warp_volume", "keypoint_flow",
           "warp_by_keypoints", "motion_field_input"]
