"""Test helper: a run as saved before some model config keys existed."""
from __future__ import annotations

import json
import os

from pyface import checkpoint as ckpt


def drop_saved_keys(run, keys) -> list[str]:
    """Removes ``keys`` from the saved model config (``meta.json``'s
    ``experiment.model_config``) of every checkpoint of the run folder ``run``, as a run saved
    before those keys existed wrote it; returns the checkpoint folders, oldest first. The run's
    ``config.yaml`` is left as it is."""
    folders = [p for _, p in ckpt.list_checkpoints(str(run))]
    assert folders, f"{run}: no checkpoint"
    for folder in folders:
        path = os.path.join(folder, ckpt.META_FILE)
        with open(path) as f:
            meta = json.load(f)
        config = meta["experiment"]["model_config"]
        for key in keys:
            del config[key]
        with open(path, "w") as f:
            json.dump(meta, f)
    return folders
