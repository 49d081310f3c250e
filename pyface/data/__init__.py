"""Talking-head data: the on-disk format (:mod:`~pyface.data.format`), the synthetic ground-truth
engine (:mod:`~pyface.data.synthetic`) and torch datasets (:mod:`~pyface.data.datasets`).
See docs/data.md."""


def __getattr__(name: str):
    # lazy, so that `import pyface.data` stays light (no torch)
    if name in ("reenactment_pairs", "ReenactmentPairs"):
        from pyface.data import eval_pairs
        return getattr(eval_pairs, name)
    raise AttributeError(f"module 'pyface.data' has no attribute {name!r}")
