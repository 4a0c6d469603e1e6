"""More than one process: torch.distributed as `torchrun` (or Slurm through torchrun) sets it up.

A command started by torchrun finds RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT in its environment;
`Group.from_env()` joins the process group (NCCL for CUDA, gloo for CPU) and every other command sees a group of
one, so single-process code runs unchanged: `group.barrier()` returns at once and `group.is_main` is True.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import ModrmError

T = TypeVar("T")
GRAD_BUCKET = 2**25  # gradient elements per all_reduce (128 MB in fp32): one call for small models, bounded memory


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: str = "auto") -> Group:
        """Join the process group torchrun describes (once per process); a group of one without torchrun."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        group = cls(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            use_cuda = device != "cpu" and torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(group.local_rank)
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (a picklable object made by this program, never read from a file)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: object) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        objs: list = [None] * self.world_size
        dist.all_gather_object(objs, obj)
        return objs

    def on_main(self, work: Callable[[], T]) -> T | None:
        """Run `work` on rank 0 only; a ModrmError it raises is raised on every rank (so no rank waits forever
        at the next barrier). Returns its result on rank 0, None elsewhere."""
        result, error = None, None
        if self.is_main:
            try:
                result = work()
            except ModrmError as err:
                error = str(err)
        error = self.broadcast(error)
        if error is not None:
            raise ModrmError(error)
        return result

    def device(self, setting: str) -> str:
        """The device this rank uses: its own GPU under torchrun (cuda:LOCAL_RANK), the setting otherwise."""
        if self.distributed and setting in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return setting

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous part of `items`; the first `len % world_size` ranks take one more. A rank may get
        none (fewer items than ranks)."""
        base, extra = divmod(len(items), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return list(items[start : start + base + (self.rank < extra)])

    def sum_gradients(self, params: Sequence[torch.Tensor], scalars: Sequence[float] = ()) -> list[float]:
        """Sum the gradients of `params` over the ranks, in place, and `scalars` with them (returned summed).

        Called once per optimizer step, after every rank ran its share of the step's micro-batches and before
        unscaling and clipping: each rank then holds the gradient one process would have accumulated over all of
        them (the loss of every micro-batch is already normalised by the pair counts of the whole step, so the
        step's gradient is a plain sum). A parameter that no rank gave a gradient (a module's head that no pair of
        the step used) keeps `grad = None` on every rank, so AdamW skips it (no decay, no moment update) exactly
        as in one process; one that some rank used but this one did not counts as zeros here.

        One all_reduce of the flags "has a gradient" and the scalars (float64), then one all_reduce per bucket
        of at most GRAD_BUCKET gradient elements (one bucket for a small model), over the parameters with a
        gradient somewhere.

        Why not DistributedDataParallel: its all_reduce is fired by autograd hooks during a backward pass, so a
        rank whose share of a step is empty (grad_accum not a multiple of the ranks, an epoch's short last
        step) would have to run a dummy forward and backward on some real batch for the others not to hang;
        DDP averages where the step needs a sum; and whether a head that no rank used in a step keeps
        `grad = None` (AdamW skipping it, as one process does) would rest on find_unused_parameters' handling of
        gradients accumulated under no_sync. Summing here is exact in all those cases; the price is that the
        reduction does not overlap the last backward pass.
        """
        if not self.distributed:
            return [float(s) for s in scalars]
        params = list(params)
        device = params[0].device if params else torch.device("cpu")
        flags = [float(p.grad is not None) for p in params]
        head = torch.tensor([*flags, *map(float, scalars)], dtype=torch.float64, device=device)
        dist.all_reduce(head)
        used = [p for p, n in zip(params, head[: len(params)].tolist(), strict=True) if n > 0]
        bucket: list[torch.Tensor] = []
        size = 0
        for p in used:
            if bucket and (p.dtype != bucket[0].dtype or size + p.numel() > GRAD_BUCKET):
                _sum_bucket(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel()
        if bucket:
            _sum_bucket(bucket)
        return head[len(params) :].tolist()


def _sum_bucket(params: list[torch.Tensor]) -> None:
    """One all_reduce(SUM) over the flattened gradients of `params` (zeros where this rank has none); each
    parameter's gradient becomes its slice of the result."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


def leave_group() -> bool:
    """Leave the process group torchrun set up, if any; True on the rank that reports (rank 0, or the only one)."""
    if not dist.is_initialized():
        return True
    main = dist.get_rank() == 0
    dist.destroy_process_group()
    return main
