"""Several devices for one run: one process per device (rank), started by torchrun, trained with DDP.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous address); without them the
context is world 1 and every helper here returns at once, so a one-device run is exactly what it was.

What is global and what is per rank:

* each rank trains on its shard of the global batch (``batch_size`` stays the global batch size; the
  sample order, augmentation and a method's batch preparation are those of the global batch, so a run
  resumes with another number of devices);
* gradients are averaged over the ranks (DDP for the model; one all-reduce for the parameters of loss
  terms and methods, which live outside it);
* loss terms that use batch statistics (relation, contrastive losses) and BatchNorm see the rank's shard
  only; BatchNorm is converted to SyncBatchNorm on CUDA (DDP refuses it on CPU in torch 2.14);
* rank 0 alone evaluates, writes metrics, progress, checkpoints and artifacts; the others wait.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

# a crashed or killed peer must fail the run within minutes, not torch's default half hour
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among the run's ranks; world 1 (no torchrun) means a plain run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` on CUDA, ``device`` otherwise."""
        return torch.device("cuda", self.local_rank) if self.active and device.type == "cuda" else device

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (the first ``len % world`` ranks get one more)."""
        return idx.tensor_split(self.world)[self.rank] if self.active else idx

    def shard_batch(self, batch: T) -> T:
        """Every per-sample tensor of a batch dataclass (x, y, idx, soft targets...) cut to this rank's rows."""
        if not self.active:
            return batch
        n = len(batch.idx)  # type: ignore[attr-defined]
        rows = {f.name: self.shard(v) for f in dataclasses.fields(batch)  # type: ignore[arg-type]
                if isinstance(v := getattr(batch, f.name), torch.Tensor) and v.dim() > 0 and len(v) == n}
        return dataclasses.replace(batch, **rows)  # type: ignore[type-var]

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` in DistributedDataParallel (gradients averaged over ranks); ``model`` itself at world 1."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # a recipe may leave parameters without a gradient (e.g. feature-only terms never reach the classifier)
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of parameters outside the DDP model (loss terms', methods') in one all-reduce."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.active or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def mean_values(self, values: dict[str, Any]) -> dict[str, Any]:
        """The per-step logged values as means over the ranks (one all-reduce); plain numbers stay rank 0's."""
        keys = [k for k, v in values.items() if isinstance(v, torch.Tensor) and v.dim() == 0]
        if not self.active or not keys:
            return values
        stacked = torch.stack([values[k].detach().float() for k in keys])
        dist.all_reduce(stacked)
        return {**values, **dict(zip(keys, stacked / self.world))}

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any (a stop request ends every rank at the same step)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only (evaluation, files, the database) and hand its result to every rank."""
        if not self.active:
            return fn()
        box: list[Any] = [fn() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_ranks() -> DistributedContext:
    """The context torchrun's environment describes (world 1 when not launched by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    return DistributedContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def setup(device: torch.device) -> DistributedContext:
    """Join the run's process group (nccl on CUDA, gloo on CPU) once per process; world 1 does nothing."""
    ctx = launched_ranks()
    if not ctx.active or dist.is_initialized():
        return ctx
    die_with_parent()
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"student.devices: {ctx.world} processes were started but only {torch.cuda.device_count()} "
                               f"CUDA GPU(s) are visible; lower student.devices or use device: cpu")
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return ctx


def teardown(wait_for_peers: bool = True) -> None:
    """Leave the process group; ``wait_for_peers`` first waits until every rank is done with its collectives.

    A rank that exits while a peer still talks to it can make the peer's gloo transport abort (SIGABRT).
    After a failure there is no waiting: the peers may be gone.
    """
    if not dist.is_initialized():
        return
    if wait_for_peers:
        try:
            dist.barrier()
        except RuntimeError:
            pass  # a peer already failed; nothing left to wait for
    dist.destroy_process_group()


def end_rank(code: int, wait_for_peers: bool = True) -> int:
    """Leave the process group (``teardown``); in a process that had joined one, end the process at once with ``code``.

    Ranks of finished 2-process gloo runs on CPU have aborted at exit ("terminate called without an active
    exception", SIGABRT) after writing every result: the C++ side of the process group torn down with the
    interpreter. ``os._exit`` skips that teardown, so torchrun sees the rank's own exit status. Returns ``code``
    in a single process.
    """
    if not dist.is_initialized():
        return code
    teardown(wait_for_peers)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def die_with_parent() -> None:
    """Ask Linux to kill this rank when torchrun dies: a SIGKILL of torchrun must not leave ranks training alone.

    torchrun starts each rank in its own session, so signalling torchrun's process group misses them.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was already gone before the request took effect
        os._exit(1)


def sync_batchnorm(model: nn.Module, device: torch.device, ctx: DistributedContext) -> nn.Module:
    """BatchNorm over the global batch on CUDA; on CPU each rank's shard (torch 2.14: "SyncBatchNorm layers only work with GPU modules")."""
    if ctx.active and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
