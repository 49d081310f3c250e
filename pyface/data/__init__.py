"""Talking-head data: the on-disk format (:mod:`~pyface.data.format`), the synthetic ground-truth
engine (:mod:`~pyface.data.synthetic`), its cache (:mod:`~pyface.data.cache`), torch datasets
(:mod:`~pyface.data.datasets`) and the reenactment evaluation pairs
(:func:`reenactment_pairs`, :mod:`~pyface.data.reenactment`). See docs/data.md."""


__all__ = ["is_moving", "reenactment_pairs"]


def __getattr__(name):   # lazy: `import pyface.data` stays free of torch
    if name in __all__:
        from pyface.data import reenactment

        return getattr(reenactment, name)
    raise AttributeError(f"module 'pyface.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
