"""``pyface convert``: third-party weights -> pyface weights (placeholder, filled below)."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert third-party weights")
    p.set_defaults(func=lambda args: 2)
