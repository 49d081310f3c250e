"""Process groups, per-rank data sharding and gradient averaging.

Launch with ``torchrun --nproc_per_node=N -m pyface train ...`` (multi-node through torchrun's
rendezvous flags). NCCL is used for CUDA devices, gloo for CPU.

Gradients are averaged by the engine per update (each phase's loss and each in-step
``ctx.update``), over the parameters of that update's optimizer only, rather than by
``DistributedDataParallel``: this works unchanged for several optimizers per step, lazily
scheduled regularisation phases, inner optimisation loops, parameters that a phase does not touch
or freezes, and R1's double backward. Two ways, with identical results on two ranks:

* :class:`BucketedAllReduce`: hooks on the parameters' gradient accumulation launch an
  asynchronous all-reduce per bucket (about ``bucket_mb``) as soon as the bucket's gradients are
  ready, so communication overlaps the rest of the backward (DDP's scheme);
* :func:`average_gradients`: one flattened all-reduce after the backward (StyleGAN2/EG3D's).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


log = logging.getLogger("pyface.train")

#: seconds a collective waits for the other ranks before failing (``PYFACE_DIST_TIMEOUT``)
DEFAULT_TIMEOUT_S = 1800

#: seconds the other ranks wait for rank 0 working alone (preparing the dataset on disk the first
#: time, writing checkpoints and previews): a week, not ``PYFACE_DIST_TIMEOUT``
#: (:func:`wait_for_main`)
MAIN_WORK_TIMEOUT_S = 7 * 24 * 3600


def dist_timeout() -> float:
    """``PYFACE_DIST_TIMEOUT`` (seconds, > 0), else :data:`DEFAULT_TIMEOUT_S`: how long a rank
    waits in a collective for a rank that neither takes part nor exits (a hung data read, a
    process stopped in a debugger) before it fails with an error instead of waiting forever."""
    raw = os.environ.get("PYFACE_DIST_TIMEOUT", "").strip()
    if not raw:
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"PYFACE_DIST_TIMEOUT: expected a number of seconds > 0, got {raw!r}")
    return value


def refuse_under_torchrun(command: str, instead: str) -> int | None:
    """For a command that has no distributed code and writes files or measures (``pyface
    animate``, ``invert``, ``convert``, ``bench``, ``pyface data synth`` / ``prepare``
    / ``index`` / ``bench`` / ``cache --build``, ``python -m pyface.bench.train`` but for
    ``--overlap``): None on one process; launched by torchrun (``WORLD_SIZE`` > 1), exit code 2,
    before any work, with one line on rank 0 (``[rank N] `` prefixed copies would only repeat
    it): every rank would otherwise run the whole command and write the same files. ``instead``:
    what to run (the command's own way of using several processes)."""
    import sys

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"{command}: runs as one process, not under torchrun (WORLD_SIZE={world}: every "
              f"rank would run all of it and write the same files); {instead}", file=sys.stderr)
    return 2


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group described by torchrun's environment (if any) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_pref)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={device_pref!r} but CUDA is not available")
        if world > 1:
            _check_rank_device(device_pref, device, local)
        torch.cuda.set_device(device)
    info = DistInfo(rank=rank, world_size=world, local_rank=local)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = dist_timeout()
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        info.initialized_here = True
        if rank == 0:
            why = ("" if device.type == "cuda" else
                   f" (train.device={device_pref})" if torch.cuda.is_available()
                   else " (no CUDA device)")
            log.info("distributed: %d ranks, backend %s on %s%s; a collective fails after "
                     "waiting %g s for the other ranks (PYFACE_DIST_TIMEOUT)", world, backend,
                     device.type, why, timeout)
    elif world > 1:
        info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    return info, device


def _check_rank_device(device_pref: str, device: torch.device, local: int) -> None:
    """Under torchrun: a ValueError for a GPU that several ranks of a node would share (an
    explicit ``cuda:N`` with several processes per node: NCCL then fails on the duplicate GPU)
    or that the node does not have (more processes per node than GPUs)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if device_pref.startswith("cuda:") and per_node > 1:
        raise ValueError(f"train.device={device_pref!r}: under torchrun with {per_node} "
                         f"processes on this node (LOCAL_WORLD_SIZE={per_node}) every one would "
                         f"use {device}; use train.device=cuda or auto (each rank takes "
                         "cuda:LOCAL_RANK)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        explicit = device_pref.startswith("cuda:")
        raise ValueError((f"train.device={device_pref!r}" if explicit else f"LOCAL_RANK={local}")
                         + f" but this node has {count} CUDA devices (torch.cuda.device_count())"
                         + ("" if explicit else f": start at most {count} processes per node "
                            "(--nproc_per_node)"))


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients of ``params``; a missing gradient counts as zeros so that
    every rank takes part in the same collective."""
    if world_size <= 1 or not params:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    torch._foreach_copy_(grads, [t.view_as(g) for t, g in
                                 zip(flat.split([g.numel() for g in grads]), grads)])


class BucketedAllReduce:
    """Averages the gradients of ``params`` over ranks while the backward runs.

    Parameters are grouped, in reverse order (the backward produces the last layers' gradients
    first), into buckets of about ``bucket_mb`` MiB (the first one at most 1 MiB, as in DDP). The
    engine calls :meth:`mark_ready` from each parameter's post-accumulate-grad hook; when every
    gradient of a bucket is ready, and every earlier bucket has been launched (so that all ranks
    issue the collectives in one order), the bucket's gradients are copied into one flat tensor
    whose all-reduce starts asynchronously. :meth:`finish` launches the buckets still waiting (a parameter the backward
    did not reach contributes zeros, as in :func:`average_gradients`), waits, and writes the
    means back into ``.grad``. Element by element the sums are those of the flat all-reduce.
    """

    def __init__(self, params: list[torch.nn.Parameter], world_size: int,
                 bucket_mb: float = 25.0):
        self.world = world_size
        cap = max(1, int(bucket_mb * 2**20))
        first_cap = min(cap, 2**20)    # a small first bucket starts communicating early
        self.buckets: list[list[torch.nn.Parameter]] = []
        cur: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(list(params)):
            if cur and (p.dtype, p.device) != (cur[-1].dtype, cur[-1].device):
                self.buckets.append(cur)           # one dtype and device per flat tensor
                cur, size = [], 0
            cur.append(p)
            size += p.numel() * p.element_size()
            if size >= (cap if self.buckets else first_cap):
                self.buckets.append(cur)
                cur, size = [], 0
        if cur:
            self.buckets.append(cur)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.reset()

    def reset(self) -> None:
        self._pending = [len(b) for b in self.buckets]
        self._flat: list[torch.Tensor | None] = [None] * len(self.buckets)
        self._work: list = [None] * len(self.buckets)
        self._next = 0
        #: how many buckets were launched from inside the backward (the overlapped ones)
        self.launched_in_backward = 0

    def mark_ready(self, p: torch.Tensor) -> None:
        i = self._bucket_of.get(id(p))
        if i is None:
            return
        self._pending[i] -= 1
        while self._next < len(self.buckets) and self._pending[self._next] <= 0:
            self._launch(self._next)
            self._next += 1
            self.launched_in_backward += 1

    def _launch(self, i: int) -> None:
        grads = []
        for p in self.buckets[i]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._flat[i] = flat
        self._work[i] = dist.all_reduce(flat, async_op=True)

    def finish(self) -> None:
        """Launch what is left, wait for every bucket and store the averaged gradients."""
        try:
            while self._next < len(self.buckets):
                self._launch(self._next)
                self._next += 1
            for i, bucket in enumerate(self.buckets):
                self._work[i].wait()
                flat = self._flat[i]
                flat /= self.world
                grads = [p.grad for p in bucket]
                torch._foreach_copy_(grads, [t.view_as(g) for t, g in
                                             zip(flat.split([g.numel() for g in grads]), grads)])
        finally:
            overlapped = self.launched_in_backward
            self.reset()
            self.launched_in_backward = overlapped


#: what gloo's and NCCL's errors say when a peer exited, was killed or did not answer in time
#: (gloo's name the gloo source file; a DataLoader's "timed out" is not one of them)
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "gloo", "nccl",
              "processgroup")


def collective_failure(exc: BaseException) -> bool:
    """True for the error a collective raises when another rank failed, exited or hung (gloo's
    ``Connection closed by peer``, a timeout after ``PYFACE_DIST_TIMEOUT``, an NCCL error), as
    opposed to an error of this rank's own computation."""
    errors = tuple(getattr(dist, n) for n in ("DistError", "DistBackendError",
                                              "DistNetworkError") if hasattr(dist, n))
    if errors and isinstance(exc, errors):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(k in text for k in _PEER_GONE)


def peer_failure_message(exc: BaseException, info: DistInfo, step: int | None = None,
                         latest: str | None = None, *, stage: bool = False) -> str:
    """The one message a rank prints when a collective failed because of another rank (``step``:
    the steps done when it failed; None before training, or in a stage (``stage``), whose run
    resumes by itself)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = f" during step {step + 1}" if step is not None else ""
    if stage:
        again = ("run the same command again to continue (an unfinished stage resumes from its "
                 "latest checkpoint)")
    elif step is None:
        where = " before training"
        again = "run the same command again"
    elif latest is None:
        again = "no checkpoint was written yet; run the same command again"
    else:
        again = (f"no checkpoint was written for this step; latest checkpoint: {latest}; run "
                 "the same command with --resume to continue")
    return (f"rank {info.rank} of {info.world_size}: a collective failed{where} ({first}): "
            f"another rank exited, was killed or did not answer within PYFACE_DIST_TIMEOUT="
            f"{dist_timeout():g} s (see its messages above); {again}")


def patient_group():
    """A gloo group of every rank of the default process group (CPU; also under NCCL) whose
    collectives wait up to :data:`MAIN_WORK_TIMEOUT_S` instead of ``PYFACE_DIST_TIMEOUT``, for
    the waits of :func:`wait_for_main` and :func:`in_turns`; None without a process group. Every
    rank makes it at the same point; :func:`leave_group` leaves it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return dist.new_group(backend="gloo",
                          timeout=datetime.timedelta(seconds=MAIN_WORK_TIMEOUT_S))


def leave_group(group) -> None:
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group(group)


def wait_for_main(group=None) -> None:
    """A barrier of every rank of the default process group (none without one) where the ranks
    wait for rank 0 doing work of its own (a dataset's first preparation on disk: a cache, the
    synthetic set; its checkpoints and previews) for up to :data:`MAIN_WORK_TIMEOUT_S`, not
    ``PYFACE_DIST_TIMEOUT``: rank 0 is in no collective meanwhile, so such a timeout would not
    catch a rank 0 that hangs (it would hang all the same) and only ended the others of a run
    whose data took longer to prepare (or whose previews took longer to render), after which
    torchrun stopped rank 0 too. A rank that fails or exits still ends the wait at once
    (torchrun stops the others). ``group``: a :func:`patient_group` (default: one made and left
    here)."""
    in_turns(lambda: None, 0, 1, group)


def in_turns(fn, turn: int, turns: int, group=None):
    """``fn()`` on every rank of the default process group, in ``turns`` turns one after the
    other: a rank calls it in its ``turn`` (0 <= turn < turns), after every rank of the earlier
    turns has returned from its call, and every rank returns once all have. The waits last up to
    :data:`MAIN_WORK_TIMEOUT_S` (see :func:`wait_for_main`); ``group``: a :func:`patient_group`
    (default: one made and left here). Without a process group, ``fn()``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return fn()
    if not 0 <= turn < turns:
        raise ValueError(f"turn: expected 0 <= turn < turns={turns}, got {turn}")
    own = group is None
    if own:
        group = patient_group()
    try:
        out = None
        for i in range(turns):
            if i == turn:
                out = fn()
            dist.barrier(group=group)
        return out
    finally:
        if own:
            leave_group(group)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make parameters and buffers identical to rank ``src``'s."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


def any_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches as a pure function of (seed, step): the global batch of a step is the next
    ``global_batch`` indices of a per-epoch permutation seeded by (seed, epoch); rank ``r`` takes
    the slice ``[r * b, (r + 1) * b)`` with ``b = global_batch / world_size``. So a run with N
    ranks sees exactly the samples of a one-process run with the same global batch, and resuming
    at ``start_step`` continues the same sequence."""

    def __init__(self, n: int, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_step: int = 0, steps: int | None = None):
        if n <= 0:
            raise ValueError("dataset is empty")
        if global_batch % world_size:
            raise ValueError(f"train.batch_size={global_batch} is not divisible by the "
                             f"{world_size} ranks")
        self.n, self.gb, self.rank, self.world = n, global_batch, rank, world_size
        self.seed, self.start, self.steps = seed, start_step, steps
        self._perm_epoch, self._perm = None, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def batch_indices(self, step: int) -> list[int]:
        b = self.gb // self.world
        out = []
        for j in range(self.rank * b, (self.rank + 1) * b):
            k = step * self.gb + j
            out.append(int(self._perm_for(k // self.n)[k % self.n]))
        return out

    def __iter__(self):
        step = self.start
        while self.steps is None or step < self.steps:
            yield self.batch_indices(step)
            step += 1

    def __len__(self) -> int:
        return (self.steps - self.start) if self.steps is not None else 2**62
