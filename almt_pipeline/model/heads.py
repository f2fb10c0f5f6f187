"""The parts of the model that only the auxiliary training objectives add (``train.objective``).

With ``regression`` (the released loss) none of this exists: the model is the released ALMT,
parameter for parameter. The other objectives add, after every released parameter:

- **unimodal heads** (``multitask``, and ``contrastive`` with ``balanced``): per modality a
  two-layer MLP ``Linear(D, D) -> ReLU -> Dropout -> Linear(D, 1)`` on that modality's
  representation, the mean over its modality embedding's T summary tokens (``h_l``, ``h_a``,
  ``h_v`` of the paper, before AHL and fusion), giving a score per modality;
- **projection heads** (``contrastive``): per modality ``Linear(D, D) -> ReLU -> Linear(D, P)``
  on the same representation, L2-normalised: the space where InfoNCE compares modalities;
- **stage weights** (``contrastive`` with ``balanced``): one learned logit per stage (the fused
  head's score first, then text, audio, vision); the model's score is the softmax-weighted sum of
  the stages' scores instead of the fused head's alone.

Which of them a model has is a :class:`HeadSpec`, derived from the training config by
:func:`head_spec`, so a checkpoint (which stores that config) rebuilds the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..config import TrainConfig

MODALITY_LETTERS = {"text": "T", "audio": "A", "vision": "V"}  # MMSA's suffixes (label_T, ...)
FUSED = "fused"  # the name of the fused head's stage


@dataclass(frozen=True)
class HeadSpec:
    """What the objectives add to the model (all off: the released model)."""

    unimodal: bool = False  # a score head per modality
    projection_dim: int | None = None  # contrastive projection heads of this width
    balanced: bool = False  # learned stage weights combine the fused and unimodal scores

    @property
    def any(self) -> bool:
        return self.unimodal or self.projection_dim is not None or self.balanced


def objective_parts(objective: str) -> set[str]:
    """``multitask+contrastive`` -> {"multitask", "contrastive"}; ``regression`` -> set()."""
    return {p for p in objective.split("+") if p != "regression"}


def head_spec(t: TrainConfig) -> HeadSpec:
    """The heads ``t.objective`` needs."""
    parts = objective_parts(t.objective)
    contrastive = "contrastive" in parts
    balanced = contrastive and t.contrastive.balanced
    return HeadSpec(
        unimodal="multitask" in parts or balanced,
        projection_dim=t.contrastive.projection_dim if contrastive else None,
        balanced=balanced,
    )


def _mlp(dim: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, out))


class AuxiliaryHeads(nn.Module):
    """The heads of :class:`HeadSpec` over the modalities ``letters`` (e.g. ["T", "A", "V"])."""

    def __init__(self, spec: HeadSpec, dim: int, letters: list[str], dropout: float = 0.0) -> None:
        super().__init__()
        self.spec = spec
        self.letters = list(letters)
        self.unimodal = nn.ModuleDict({m: _mlp(dim, 1, dropout) for m in letters}) if spec.unimodal else None
        self.projections = nn.ModuleDict(
            {m: _mlp(dim, spec.projection_dim, 0.0) for m in letters}
        ) if spec.projection_dim is not None else None
        self.stage_logits = nn.Parameter(torch.zeros(1 + len(letters))) if spec.balanced else None  # (1 + M,)

    @property
    def stages(self) -> list[str]:
        return [FUSED, *self.letters]

    def stage_weights(self) -> dict[str, float]:
        """The softmax weight of each stage in the final score (empty without ``balanced``)."""
        if self.stage_logits is None:
            return {}
        weights = self.stage_logits.detach().float().softmax(0).tolist()
        return dict(zip(self.stages, weights))

    def forward(self, fused_score: Tensor, reps: dict[str, Tensor], outputs: dict[str, Any] | None) -> Tensor:
        """fused_score (B,) from the fused head; reps: modality letter -> (B, D). Returns the final
        score (B,). ``outputs`` (a dict) receives ``scores`` (stage -> (B,)) and ``projections``
        (letter -> (B, P), unit length)."""
        scores = {FUSED: fused_score}
        if self.unimodal is not None:
            for m, head in self.unimodal.items():
                scores[m] = head(reps[m]).squeeze(-1)  # (B,)
        final = fused_score
        if self.stage_logits is not None:
            w = self.stage_logits.softmax(0)  # (1 + M,)
            final = (torch.stack([scores[s] for s in self.stages], dim=-1) * w.to(fused_score.dtype)).sum(-1)
        if outputs is not None:
            outputs["scores"] = scores
            if self.projections is not None:
                outputs["projections"] = {m: F.normalize(p(reps[m]), dim=-1) for m, p in self.projections.items()}
        return final


def aux_parameter_count(spec: HeadSpec, dim: int, n_modalities: int) -> int:
    """Parameters of ``AuxiliaryHeads(spec, dim, letters)`` with ``n_modalities`` letters."""
    def mlp(out: int) -> int:
        return (dim * dim + dim) + (dim * out + out)

    unimodal = n_modalities * mlp(1) if spec.unimodal else 0
    projections = n_modalities * mlp(spec.projection_dim) if spec.projection_dim is not None else 0
    return unimodal + projections + ((1 + n_modalities) if spec.balanced else 0)


__all__ = ["HeadSpec", "AuxiliaryHeads", "head_spec", "objective_parts", "aux_parameter_count",
           "MODALITY_LETTERS", "FUSED"]
