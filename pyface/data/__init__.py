"""Talking-head data: the on-disk format (:mod:`~pyface.data.format`), the synthetic ground-truth
engine (:mod:`~pyface.data.synthetic`), its cache (:mod:`~pyface.data.cache`), torch datasets
(:mod:`~pyface.data.datasets`) and the reenactment evaluation pairs
(:func:`reenactment_pairs`, :mod:`~pyface.data.reenactment`). See docs/data.md."""


def __getattr__(name):   # lazy: `import pyface.data` stays free of torch
    if name in ("reenactment_pairs", "is_moving"):
        from pyface.data import reenactment

        return getattr(reenactment, name)
    raise AttributeError(f"module 'pyface.data' has no attribute {name!r}")
