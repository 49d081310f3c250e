"""Loading pretrained weights from local files (never downloaded) and the one warning when a
loss runs without them."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

log = logging.getLogger("pyface.nn")
_warned: set[str] = set()


class PretrainedWeightsWarning(UserWarning):
    """A component that needs pretrained weights runs with random ones."""


def warn_random_init(component: str, what: str) -> None:
    """Warn once per process that ``component`` runs with random weights."""
    if component in _warned:
        return
    _warned.add(component)
    msg = (f"{component}: no pretrained weights given, using a RANDOM initialisation - {what} is "
           f"not meaningful without them. Pass weights=PATH (a local file; pyface never "
           f"downloads weights).")
    log.warning(msg)
    warnings.warn(msg, PretrainedWeightsWarning, stacklevel=3)


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
              rename: Callable[[str], str | None] = lambda k: k) -> None:
    """Load ``state`` (third-party keys, mapped by ``rename``; None drops a key) into ``module``
    strictly, with an error that names missing/unexpected keys and shape mismatches."""
    from pyface.checkpoint import CheckpointError, check_state_dict

    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise CheckpointError(f"{source}: expected a state dict of tensors, got "
                              f"{type(state).__name__}")
    mapped = {}
    for k, v in state.items():
        nk = rename(k)
        if nk is not None:
            mapped[nk] = v
    check_state_dict(module, mapped, source)
    module.load_state_dict(mapped, strict=True)


def read_state(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors / .pth / .pt / .bin file or a pyface folder."""
    from pyface.checkpoint import load_weights_file

    from pyface.checkpoint import CheckpointError

    state = load_weights_file(path)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"],
                                                                           Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), got "
                              f"{type(state).__name__}")
    return state


def plain_state_dict(raw, where: str) -> dict[str, torch.Tensor]:
    """A released checkpoint's tensors: the dict itself or its ``state_dict`` entry, with a
    ``module.`` prefix on every key (DataParallel) removed. Raises
    :class:`pyface.checkpoint.CheckpointError` naming ``where`` when it is not a non-empty
    mapping of tensors."""
    from pyface.checkpoint import CheckpointError

    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor)
                                                       for v in raw.values()):
        raise CheckpointError(f"{where}: expected a state dict of tensors")
    if all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    return raw
