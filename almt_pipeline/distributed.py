"""Training over several processes with ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node N -m almt_pipeline train ...`` (or ``almt train --nproc N``, which
runs exactly that) starts N copies of the training command; torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environments. Each copy:

- joins one process group: NCCL on GPUs (rank r uses ``cuda:LOCAL_RANK``), gloo on CPUs;
- draws the **same** shuffled order of the training split as a one-process run (the loader's
  generator has the same seed on every rank) and trains on its share of every global batch, the
  batch's samples ``r, r + N, r + 2N, ...``: the effective batch and the lr schedule are those of
  one process;
- weights its loss so that the gradients DistributedDataParallel averages are those of the mean
  loss over the whole global batch (ranks may hold one sample more or less than the others; a
  rank left without a sample in a short last batch computes a placeholder with weight 0);
- scores the full validation and test splits itself (every rank holds the same weights, so all
  reach the same metrics and the same model-selection and early-stopping decisions);
- writes nothing unless it is rank 0: logs, resume states, checkpoints and summaries come from
  rank 0 alone; the resume state holds every rank's random-number state, so a resumed run with
  the same N continues as the uninterrupted one would.

The one thing that differs from a one-process run with the same seed is randomness drawn inside
the model (dropout, e.g. in the text encoder): each rank draws it for its own samples. With
dropout off, N processes reproduce one process up to the order of floating-point sums.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from .errors import ConfigError
from .processes import exit_with_parent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """This process's place in the training group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that logs and writes files."""
        return self.rank == 0


def group_from_env() -> Group:
    """The group torchrun describes in this process's environment (a single process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    return Group(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def join(group: Group, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns the device this rank trains on."""
    import torch.distributed as dist

    if not group.active or dist.is_initialized():
        return device
    exit_with_parent(os.getppid())  # a killed torchrun takes its workers with it
    if device.type == "cuda":
        check_devices(device, group.local_rank + 1)
        torch.cuda.set_device(group.local_rank)
        device = torch.device("cuda", group.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not group.main:  # one voice: the other ranks report only errors
        for name in ("almt_pipeline", "almt_pipeline.results"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return device


def check_devices(device: torch.device, processes: int) -> None:
    """On CUDA each process of a machine takes one GPU (``cuda:LOCAL_RANK``)."""
    if device.type == "cuda" and processes > 1 and torch.cuda.device_count() < processes:
        raise ConfigError(f"{processes} training processes on CUDA need {processes} GPUs on each machine; "
                          f"this one has {torch.cuda.device_count()}")


def leave(group: Group) -> None:
    import torch.distributed as dist

    if group.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(group: Group) -> None:
    if group.active:
        import torch.distributed as dist

        dist.barrier()


def totals(group: Group, values: Sequence[float], device: torch.device) -> list[float]:
    """The sums of ``values`` over the ranks (one collective)."""
    if not group.active:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(x) for x in t.cpu()]


def sharded_mse(pred: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, group: Group,
                device: torch.device) -> tuple[torch.Tensor, float, float]:
    """This rank's loss, scaled so that the gradients DDP averages over the ranks are those of the
    mean squared error over the whole global batch; that global mean and the global batch size
    (for the log)."""
    squared = weights * (pred.float().reshape(-1) - y) ** 2  # (B_rank,)
    n_global, sum_global = totals(group, [float(weights.sum()), float(squared.detach().sum())], device)
    return squared.sum() * (group.world / n_global), sum_global / n_global, n_global


def broadcast(group: Group, obj: Any) -> Any:
    """Rank 0's ``obj``, on every rank."""
    if not group.active:
        return obj
    import torch.distributed as dist

    box = [obj if group.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(group: Group, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not group.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * group.world
    dist.all_gather_object(out, obj)
    return out


class ShardedBatches(Sampler[list[int]]):
    """This rank's share of each batch of ``batches``: samples ``rank, rank + world, ...``. A rank
    left without a sample gets the batch's first one, marked as a placeholder by ``-1 - index``."""

    def __init__(self, batches: Sampler[list[int]], group: Group) -> None:
        self.batches = batches
        self.group = group

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            mine = list(batch)[self.group.rank::self.group.world]
            yield mine if mine else [-1 - int(batch[0])]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def wrap(model: torch.nn.Module, group: Group, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (the model itself without a group). Parameters the
    forward pass does not use (the text encoder's pooler; the key LayerNorm bias that the fast
    attention path folds away) are allowed."""
    if not group.active:
        return model
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # the summary tokens' gradients come from an expand and have a stride on their size-1 batch
    # axis unlike DDP's buffer: a layout note about copying 8 x D numbers, not a problem
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command that runs ``almt <argv>`` in ``nproc`` processes on this machine."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "almt_pipeline", *argv]


def launch(nproc: int, argv: Sequence[str]) -> None:
    """Replace this process by torchrun running ``almt <argv>`` in ``nproc`` processes (so a
    signal to this command reaches torchrun, which stops its workers)."""
    cmd = torchrun_command(nproc, argv)
    logger.info("running %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def without_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


__all__ = ["Group", "group_from_env", "join", "leave", "barrier", "totals", "sharded_mse", "gather", "broadcast",
           "check_devices",
           "ShardedBatches", "wrap", "torchrun_command", "launch", "without_option"]
