"""Feature-file splits as tensors, batch loaders, and batched inference (shared by training and
evaluation)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler
from tqdm.auto import tqdm

from .distributed import Group, ShardedBatches
from .errors import TrainingError
from .schema import LABEL_KEY, UNIMODAL_LABEL_KEYS, Arrays

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
Batch = tuple[torch.Tensor, ...]


@dataclass
class Split:
    """One split as tensors: the model's inputs in ``forward`` order, and the labels."""

    name: str
    ids: np.ndarray  # (N,) str
    inputs: tuple[torch.Tensor, ...]  # text_bert (N,3,L), audio (N,T_a,d_a), vision (N,T_v,d_v), lengths (N,) x2
    labels: torch.Tensor  # (N,) float32, NaN when unlabelled
    # the file's unimodal labels (regression_labels_T/A/V) by letter: (N,) float32, NaN where missing
    unimodal: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> bool:
        return self.n > 0 and bool(torch.isfinite(self.labels).all())


def to_split(name: str, arrays: Arrays) -> Split:
    """A validated split's arrays (see :mod:`.schema`) as tensors."""

    def tensor(key: str, dtype: type) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arrays[key], dtype=dtype))

    inputs = (
        tensor("text_bert", np.float32),  # (N, 3, L)
        tensor("audio", np.float32),  # (N, T_a, d_a)
        tensor("vision", np.float32),  # (N, T_v, d_v)
        tensor("audio_lengths", np.int64),  # (N,)
        tensor("vision_lengths", np.int64),  # (N,)
    )
    n = len(arrays["id"])
    labels = (
        tensor(LABEL_KEY, np.float32).reshape(-1) if LABEL_KEY in arrays else torch.full((n,), float("nan"))
    )  # (N,)
    unimodal = {key[-1]: tensor(key, np.float32).reshape(-1) for key in UNIMODAL_LABEL_KEYS if key in arrays}
    return Split(name=name, ids=arrays["id"], inputs=inputs, labels=labels, unimodal=unimodal)


class _BatchDataset(Dataset[Batch]):
    """Indexable by a list of sample indices: returns whole batches by tensor indexing. With
    ``weighted``, a last tensor holds each row's weight: 0 for a placeholder row, asked for as
    ``-1 - index`` (see :class:`.distributed.ShardedBatches`), else 1."""

    def __init__(self, tensors: Batch, weighted: bool = False):
        self.tensors = tensors
        self.weighted = weighted

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, idx: list[int]) -> Batch:
        index = torch.as_tensor(idx, dtype=torch.long)
        if not self.weighted:
            return tuple(t[index] for t in self.tensors)
        rows = torch.where(index < 0, -1 - index, index)
        return (*(t[rows] for t in self.tensors), (index >= 0).float())


def check_token_ids(splits: Iterable[Split], vocab_size: int, text_model: str) -> None:
    """Token ids beyond the text model's vocabulary mean the file was tokenized for another model
    (the embedding lookup would fail mid-run)."""
    tops = [int(s.inputs[0][:, 0].max()) for s in splits if s.n]
    if tops and max(tops) >= vocab_size:
        raise TrainingError(
            f"the feature file holds token id {max(tops)} but text model {text_model!r} has only {vocab_size} "
            "tokens: it was tokenized for another text model; pass the one used by `almt extract` "
            "with --text-model"
        )


def make_loader(split: Split, batch_size: int, generator: torch.Generator | None, pin: bool,
                extra: tuple[torch.Tensor, ...] = (), group: Group | None = None) -> DataLoader[Batch]:
    """Shuffled (seeded ``generator``) or sequential batches of (inputs..., labels, extra...).
    With an active ``group`` (several training processes), this rank's share of each batch, and a
    last tensor of row weights (see :mod:`.distributed`)."""
    sharded = group is not None and group.active
    ds = _BatchDataset((*split.inputs, split.labels, *extra), weighted=sharded)
    base = RandomSampler(ds, generator=generator) if generator is not None else SequentialSampler(ds)
    batches: Sampler[list[int]] = BatchSampler(base, batch_size=batch_size, drop_last=False)
    if sharded and group is not None:
        batches = ShardedBatches(batches, group)
    return DataLoader(ds, sampler=batches, batch_size=None, generator=generator, pin_memory=pin)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None: float32)."""
    if amp == "none":
        return None
    if device.type != "cuda":
        logger.warning("amp=%s is only used on CUDA; running in float32 on %s", amp, device)
        return None
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


N_INPUTS = 5  # a batch starts with the model's inputs: text_bert, audio, vision, lengths x2


def forward(model: nn.Module, inputs: Batch, device: torch.device,
            outputs: dict[str, Any] | None = None) -> torch.Tensor:
    """The model's scores (B,) for a batch's inputs (text_bert, audio, vision, lengths x2);
    ``outputs`` receives the auxiliary heads' outputs (see ``ALMT.forward``)."""
    text_bert, audio, vision, a_len, v_len = (t.to(device, non_blocking=True) for t in inputs[:N_INPUTS])
    if outputs is None:
        return model(text_bert, audio, vision, audio_lengths=a_len, vision_lengths=v_len)  # (B,)
    return model(text_bert, audio, vision, audio_lengths=a_len, vision_lengths=v_len, outputs=outputs)


@torch.no_grad()
def predict_split(model: nn.Module, split: Split, batch_size: int, device: torch.device,
                  amp: torch.dtype | None, quiet: bool = True,
                  stages: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Predictions (N,) float32 in sample order. ``stages`` (a dict) receives, for a model with
    auxiliary heads, each stage's scores (stage -> (N,)): the fused head and the unimodal heads."""
    model.eval()
    loader = make_loader(split, batch_size, None, pin=device.type == "cuda")
    out = []
    collected: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc=f"predict {split.name}", unit="batch", leave=False, disable=quiet):
        outputs: dict[str, Any] | None = {} if stages is not None else None
        with autocast(device, amp):
            pred = forward(model, batch[:-1], device, outputs)  # (B,)
        out.append(pred.float().reshape(-1).cpu())
        for k, v in (outputs or {}).get("scores", {}).items():
            collected.setdefault(k, []).append(v.float().reshape(-1).cpu())
    if stages is not None:
        stages.update({k: torch.cat(v).numpy() for k, v in collected.items()})
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)
