"""Test helpers: a run as saved before some model config keys existed, or with other saved
model config values."""
from __future__ import annotations

import json
import os

from pyface import checkpoint as ckpt


def edit_saved_config(run, edit) -> list[str]:
    """Calls ``edit(config)`` on the saved model config (``meta.json``'s
    ``experiment.model_config``, a dict changed in place) of every checkpoint of the run folder
    ``run`` and writes it back; returns the checkpoint folders, oldest first. The run's
    ``config.yaml`` is left as it is."""
    folders = [p for _, p in ckpt.list_checkpoints(str(run))]
    assert folders, f"{run}: no checkpoint"
    for folder in folders:
        path = os.path.join(folder, ckpt.META_FILE)
        with open(path) as f:
            meta = json.load(f)
        edit(meta["experiment"]["model_config"])
        with open(path, "w") as f:
            json.dump(meta, f)
    return folders


def drop_saved_keys(run, keys) -> list[str]:
    """Removes ``keys`` from the saved model config of every checkpoint of the run folder
    ``run`` (:func:`edit_saved_config`), as a run saved before those keys existed wrote it;
    returns the checkpoint folders, oldest first."""
    def drop(config):
        for key in keys:
            del config[key]

    return edit_saved_config(run, drop)
