"""The learning-rate schedule of the released protocol, and deterministic kernels for training.

Per-epoch linear warm-up, then cosine annealing; stepped once per epoch after its batches.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from functools import partial

import torch


def lr_factor(epoch_index: int, epochs: int, warmup_ratio: float) -> float:
    """Multiplier of the base lr for the epoch with 0-based index ``epoch_index``.

    Linear warm-up from 0 over the first ``W = int(warmup_ratio * epochs)`` epochs, then cosine
    annealing over the remaining ``epochs - W`` (epoch index W runs at the full lr).
    """
    warmup = int(warmup_ratio * epochs)
    if epoch_index < warmup:
        return epoch_index / warmup
    t_max = max(epochs - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch_index - warmup) / t_max))


def lr_at_epoch(epoch: int, epochs: int, warmup_ratio: float, lr: float) -> float:
    """Learning rate used during (1-based) ``epoch``."""
    return lr * lr_factor(epoch - 1, epochs, warmup_ratio)


def make_scheduler(optimizer: torch.optim.Optimizer, epochs: int,
                   warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped once per epoch after the epoch's batches."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, epochs=epochs, warmup_ratio=warmup_ratio)
    )


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels where torch has them (restored afterwards)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    prev_bench = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark = prev_bench


__all__ = ["lr_factor", "lr_at_epoch", "make_scheduler", "deterministic"]
