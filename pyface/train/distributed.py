"""Process groups, per-rank data sharding and gradient averaging.

Launch with ``torchrun --nproc_per_node=N -m pyface train ...`` (multi-node through torchrun's
rendezvous flags). NCCL is used for CUDA devices, gloo for CPU.

Gradients are averaged explicitly after each phase's backward (one flattened all-reduce per
optimizer, as StyleGAN2/EG3D do) rather than through ``DistributedDataParallel`` hooks: this works
unchanged for several optimizers per step, lazily scheduled regularisation phases, parameters that
a phase does not touch, and R1's double backward.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        torch.cuda.set_device(device)
    info = DistInfo(rank=rank, world_size=world, local_rank=local)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        info.initialized_here = True
    elif world > 1:
        info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    return info, device


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
