"""``pyface eval`` under torchrun: the ranks share the pairs, rank 0 writes the one report.

``torchrun --nproc_per_node=N -m pyface eval ...`` starts N processes; each joins the process
group of :func:`pyface.train.distributed.init_distributed` (gloo on CPU, NCCL on CUDA with
``cuda:LOCAL_RANK``), evaluates the source groups :func:`pyface.eval.evaluate.shard_groups`
gives it (:func:`pyface.eval.evaluate.evaluate` with ``shard=(rank, world)``) and sends its
:class:`~pyface.eval.evaluate.EvalResult` to rank 0, which joins them with
:func:`pyface.eval.evaluate.merge_results` (see docs/eval.md, "Several processes (torchrun)").

Every step that can fail on one rank only (loading the model, the metrics' networks, an
evaluation) ends in a collective in which each rank says whether it failed (:meth:`EvalGroup.
agree`, :meth:`EvalGroup.gather`): a rank that failed re-raises its own error, the others raise
:class:`PeerFailed`, so every rank exits non-zero instead of waiting for a rank that is gone.
"""
from __future__ import annotations

import os

import torch.distributed as dist


class PeerFailed(RuntimeError):
    """Another rank failed (its own message is printed by that rank); ``failures``: ``[(rank,
    message)]``."""

    def __init__(self, failures: list[tuple[int, str]], world: int, what: str):
        self.failures = failures
        said = "; ".join(f"rank {r} of {world}: {m}" for r, m in failures)
        super().__init__(f"{what} failed on another rank, so every rank stops ({said})")


def world_size() -> int:
    """``WORLD_SIZE`` of torchrun's environment (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank_prefix() -> str:
    """``"[rank N] "`` on the ranks other than 0 under torchrun, else ``""``."""
    rank = int(os.environ.get("RANK", "0") or 0)
    return f"[rank {rank}] " if rank and world_size() > 1 else ""


def _describe(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class EvalGroup:
    """The ranks of one ``pyface eval`` under torchrun (:meth:`start`)."""

    def __init__(self, info, device):
        self.info = info
        self.device = device

    @classmethod
    def start(cls, device_pref: str) -> "EvalGroup":
        """Joins torchrun's process group (``device_pref``: ``auto``, ``cpu`` or ``cuda``; on
        CUDA each rank takes ``cuda:LOCAL_RANK``)."""
        from pyface.train.distributed import init_distributed

        info, device = init_distributed(device_pref)
        return cls(info, device)

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world(self) -> int:
        return self.info.world_size

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    def close(self) -> None:
        from pyface.train.distributed import shutdown

        shutdown(self.info)

    def agree(self, error: BaseException | None, what: str) -> None:
        """A collective: every rank tells whether its ``what`` failed (``error``). Returns when
        none did; else the ranks that failed re-raise their error and the others raise
        :class:`PeerFailed`."""
        said = [None] * self.world
        dist.all_gather_object(said, None if error is None else _describe(error))
        self._raise(error, [(r, m) for r, m in enumerate(said) if m is not None], what)

    def gather(self, result, error: BaseException | None, what: str):
        """A collective: each rank's :class:`~pyface.eval.evaluate.EvalResult` of its shard
        (``error``: why it has none) goes to rank 0, which returns
        :func:`~pyface.eval.evaluate.merge_results` of them; the other ranks return None. When a
        rank failed, every rank raises as in :meth:`agree`; so does every rank when joining the
        parts fails on rank 0 (whatever the error), rank 0 with its own error."""
        from pyface.eval.evaluate import merge_results

        payload = ("error", _describe(error)) if error is not None else ("ok", pack(result))
        parts = [None] * self.world if self.is_main else None
        dist.gather_object(payload, parts, dst=0)
        failures = merged = None
        if self.is_main:
            failures = [(r, p[1]) for r, p in enumerate(parts) if p[0] == "error"]
            if not failures:
                try:                       # told to every rank, as a rank's own failure
                    merged = merge_results([unpack(p[1]) for p in parts])
                except Exception as exc:  # noqa: BLE001 - any error: the others must not wait
                    error = exc
                    failures = [(0, _describe(exc))]
        box = [failures]
        dist.broadcast_object_list(box, src=0)
        self._raise(error, box[0], what)
        return merged

    def _raise(self, error, failures, what: str) -> None:
        if error is not None:
            raise error
        if failures:
            raise PeerFailed(failures, self.world, what)


def pack(res):
    """A shard's :class:`~pyface.eval.evaluate.EvalResult` with its per-pair arrays (values,
    ``moving``, fid / kid features) cut to the rows it evaluated (``evaluated``), for sending;
    :func:`unpack` restores them. A result of every pair (``evaluated`` None) is unchanged."""
    import copy

    if res is None or res.evaluated is None:
        return res
    ev = res.evaluated
    out = copy.copy(res)
    out.values = {m: {r: v[ev] for r, v in regions.items()} for m, regions in res.values.items()}
    out.moving = res.moving[ev]
    out.features = {k: v[ev] for k, v in res.features.items()}
    return out


def unpack(res):
    """The inverse of :func:`pack`: the per-pair arrays at full length again (the rows of other
    shards NaN, ``moving`` False there)."""
    import copy

    import numpy as np

    if res is None or res.evaluated is None:
        return res
    ev = res.evaluated

    def full(v):
        out = np.full((len(ev),) + v.shape[1:], np.nan) if v.dtype.kind == "f" else \
            np.zeros((len(ev),) + v.shape[1:], v.dtype)
        out[ev] = v
        return out

    out = copy.copy(res)
    out.values = {m: {r: full(v) for r, v in regions.items()} for m, regions in res.values.items()}
    out.moving = full(res.moving)
    out.features = {k: full(v) for k, v in res.features.items()}
    return out
