"""Talking-head data: the on-disk format (:mod:`~pyface.data.format`), the synthetic ground-truth
engine (:mod:`~pyface.data.synthetic`) and torch datasets (:mod:`~pyface.data.datasets`).
See docs/data.md."""
