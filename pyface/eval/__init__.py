"""Evaluation metrics (placeholder package file; the eval branch owns this module)."""
