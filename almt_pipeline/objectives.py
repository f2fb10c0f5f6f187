"""Training objectives beyond the released regression loss (``train.objective``).

``regression`` is the released loss, MSE between the model's score and the multimodal label; it
does not go through this module. The others add terms to it, each over heads that
:mod:`.model.heads` adds to the model (and documents):

**multitask** (unimodal multi-task learning, as in text-guided fusion with unimodal multi-task
learning, SETGF, with Self-MM's self-supervised unimodal labels). Loss:
``MSE(score, y) + multitask.weight * sum_m MSE(score_m, y_m)`` over the modalities m in T, A, V,
where ``score_m`` is modality m's unimodal head and ``y_m`` its label: the feature file's
``regression_labels_m`` where it has one (``multitask.labels: auto`` or ``given``), otherwise a
generated label. The rule that generates them (Self-MM, Yu et al., AAAI 2021), with ``F_m`` a
sample's representation of modality m (the unimodal head's input) and ``F_f`` the fused
representation (the fused head's input):

- a memory holds every training sample's latest ``F_m`` and ``F_f`` (written after each batch);
- class centres: ``C+_m`` / ``C-_m`` are the means of ``F_m`` over the samples whose current
  label ``y_m`` is positive / negative (for ``F_f``: the multimodal label ``y``);
- a sample's relative distance ``r_m = (|F_m - C-_m| - |F_m - C+_m|) / (|F_m - C+_m| + eps)``
  (larger: nearer the positive centre), and ``r_f`` likewise;
- a new label ``0.5 * y * r_m / (r_f + eps) + 0.5 * (y + r_m - r_f)``, clipped to the label
  range: ``y`` scaled and shifted by how much more (or less) positive modality m looks than the
  fused representation;
- it is blended into the label with epoch-based momentum, ``y_m <- (n - 1) / (n + 1) * y_m +
  2 / (n + 1) * new`` in epoch n. Labels start as ``y`` and move after each batch from epoch
  ``multitask.update_from_epoch`` (default 2: the first epoch fills the memory).

Each epoch's log has the generated labels' mean, std, correlation with ``y`` and mean distance to
``y``, per modality.

**contrastive** (cross-modal contrastive learning with balanced prediction, as in CMCBEP-CL).
Loss: ``MSE(score, y) + contrastive.weight * InfoNCE`` where InfoNCE pairs the same sample's
projections of text and audio, text and vision, audio and vision (each ``z_m`` the projection head
of ``F_m``, unit length): for a pair (a, b) and a batch of B samples, the logits are
``z_a @ z_b.T / temperature`` (B x B, in-batch negatives off the diagonal); the loss is the
cross-entropy towards the diagonal in both directions, averaged, then averaged over the pairs.
With ``contrastive.balanced`` the model's score is a learned softmax-weighted sum of the fused and
the unimodal heads' scores, and each stage is also trained on its own:
``+ contrastive.stage_weight * mean over stages of MSE(score_stage, target)`` with target ``y``
(the unimodal stages' targets are their multitask labels when multitask is on too, and that loss
already trains them: then only the fused stage is added here). The stage weights' logits start
equal and learn at ``contrastive.stage_lr_scale`` times the model's learning rate (at the model's
own lr four numbers would barely move in a run).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .batches import Split
from .config import TrainConfig
from .errors import TrainingError
from .metrics import LABEL_RANGES, split_metrics
from .model.heads import FUSED, objective_parts

_EPS = 1e-8


def parameter_groups(model: torch.nn.Module, t: TrainConfig) -> Any:
    """The optimizer's parameters: all in one group, except the balanced stage logits, which learn
    ``contrastive.stage_lr_scale`` times faster (four numbers that would barely move at the model's lr)."""
    logits = getattr(getattr(model, "aux", None), "stage_logits", None)
    if logits is None:
        return model.parameters()
    rest = [p for p in model.parameters() if p is not logits]
    return [{"params": rest}, {"params": [logits], "lr": t.lr * t.contrastive.stage_lr_scale}]


def info_nce(projections: dict[str, Tensor], temperature: float) -> Tensor:
    """Mean symmetric InfoNCE over every pair of modalities; projections: letter -> (B, P) unit rows."""
    pairs = list(itertools.combinations(sorted(projections, key="TAV".index), 2))
    losses = []
    for a, b in pairs:
        logits = projections[a].float() @ projections[b].float().T / temperature  # (B, B)
        target = torch.arange(logits.shape[0], device=logits.device)
        losses.append(0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)))
    return torch.stack(losses).mean()


def _relative_distance(feats: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """(|f - C-| - |f - C+|) / (|f - C+| + eps) per row: feats (B, D), centres (D,) -> (B,)."""
    d_pos = (feats - pos).norm(dim=-1)
    d_neg = (feats - neg).norm(dim=-1)
    return (d_neg - d_pos) / (d_pos + _EPS)


class Objective:
    """The loss of the auxiliary objectives for one training split, with the state they carry
    between batches (the memory and the generated unimodal labels; saved for resume)."""

    def __init__(self, t: TrainConfig, train: Split, scale: str, letters: list[str], source: str = "data") -> None:
        parts = objective_parts(t.objective)
        self.t = t
        self.multitask = "multitask" in parts
        self.contrastive = "contrastive" in parts
        self.balanced = self.contrastive and t.contrastive.balanced
        self.letters = list(letters)
        self.bound = float(LABEL_RANGES[scale])
        n = train.n
        self.y = train.labels.clone()  # (N,)
        self.labels: dict[str, Tensor] = {}  # letter -> (N,) current unimodal targets
        self.generated: dict[str, Tensor] = {}  # letter -> (N,) bool, label generated (not given)
        self.memory: dict[str, Tensor] = {}  # letter or "fused" -> (N, D), filled lazily
        self.seen = torch.zeros(n, dtype=torch.bool)
        self._sums: dict[str, float] = {}
        self._count = 0
        if self.multitask:
            for m in letters:
                given = train.unimodal.get(m, torch.full((n,), math.nan))
                missing = ~torch.isfinite(given)
                if t.multitask.labels == "given" and bool(missing.any()):
                    raise TrainingError(
                        f"{source}: train.multitask.labels is 'given' but {int(missing.sum())} of {n} training "
                        f"samples have no regression_labels_{m}; use 'auto' to generate the missing ones"
                    )
                generate = torch.ones(n, dtype=torch.bool) if t.multitask.labels == "self" else missing
                self.generated[m] = generate
                self.labels[m] = torch.where(generate, self.y, given.nan_to_num(0.0))

    @property
    def label_sources(self) -> dict[str, str]:
        """Per modality: ``given``, ``generated`` or ``mixed`` (how many of each)."""
        out = {}
        for m, gen in self.generated.items():
            k = int(gen.sum())
            out[m] = "generated" if k == len(gen) else "given" if k == 0 else f"mixed ({k} of {len(gen)} generated)"
        return out

    # -- the loss of one batch ------------------------------------------------------------------

    def batch_loss(self, score: Tensor, outputs: dict[str, Any], y: Tensor, index: Tensor, epoch: int) -> Tensor:
        """score (B,) the model's output, ``outputs`` its auxiliary outputs, y (B,) labels, index (B,)
        rows of the training split. Updates the memory and generated labels (after the loss is built)."""
        index = index.cpu()
        scores: dict[str, Tensor] = {k: v.float().reshape(-1) for k, v in outputs["scores"].items()}
        mse = F.mse_loss(score.float().reshape(-1), y)
        loss = mse
        parts = {"mse": mse}
        if self.multitask:
            targets = {m: self.labels[m][index].to(y.device) for m in self.letters}
            unimodal = torch.stack([F.mse_loss(scores[m], targets[m]) for m in self.letters]).sum()
            loss = loss + self.t.multitask.weight * unimodal
            parts["unimodal"] = unimodal
        if self.contrastive:
            nce = info_nce(outputs["projections"], self.t.contrastive.temperature)
            loss = loss + self.t.contrastive.weight * nce
            parts["infonce"] = nce
            if self.balanced:
                stages = [FUSED] if self.multitask else [FUSED, *self.letters]
                stage = torch.stack([F.mse_loss(scores[s], y) for s in stages]).mean()
                loss = loss + self.t.contrastive.stage_weight * stage
                parts["stages"] = stage
        for k, v in parts.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach()) * len(y)
        self._count += len(y)
        if self.multitask:
            self._observe(outputs["representations"], index, epoch)
        return loss

    def _observe(self, reps: dict[str, Tensor], index: Tensor, epoch: int) -> None:
        """Write the batch's representations to the memory; move its generated labels."""
        for key, r in reps.items():
            r = r.detach().float().cpu()
            if key not in self.memory:
                self.memory[key] = torch.zeros(len(self.seen), r.shape[-1])
            self.memory[key][index] = r
        self.seen[index] = True
        if epoch < self.t.multitask.update_from_epoch:
            return
        fused_centres = self._centres("fused", self.y)
        if fused_centres is None:
            return
        r_f = _relative_distance(self.memory["fused"][index], *fused_centres)  # (B,)
        y = self.y[index]
        for m in self.letters:
            gen = self.generated[m][index]
            centres = self._centres(m, self.labels[m])
            if centres is None or not bool(gen.any()):
                continue
            r_m = _relative_distance(self.memory[m][index], *centres)
            new = (0.5 * y * r_m / (r_f + _EPS) + 0.5 * (y + r_m - r_f)).clamp(-self.bound, self.bound)
            blended = (epoch - 1) / (epoch + 1) * self.labels[m][index] + 2 / (epoch + 1) * new
            self.labels[m][index] = torch.where(gen, blended, self.labels[m][index])

    def _centres(self, key: str, labels: Tensor) -> tuple[Tensor, Tensor] | None:
        """(positive centre, negative centre) of the memory rows seen so far, or None when a class is empty."""
        pos, neg = self.seen & (labels > 0), self.seen & (labels < 0)
        if not bool(pos.any()) or not bool(neg.any()):
            return None
        feats = self.memory[key]
        return feats[pos].mean(0), feats[neg].mean(0)

    # -- per-epoch reporting --------------------------------------------------------------------

    def end_epoch(self) -> dict[str, Any]:
        """The epoch's mean loss terms and the generated labels' statistics (then starts a new epoch)."""
        record: dict[str, Any] = {"losses": {k: v / max(self._count, 1) for k, v in self._sums.items()}}
        self._sums, self._count = {}, 0
        stats = {}
        for m in self.letters if self.multitask else ():
            gen = self.generated[m]
            if not bool(gen.any()):
                continue
            lab, y = self.labels[m][gen].double(), self.y[gen].double()
            varies = len(lab) > 1 and float(lab.std()) > 0 and float(y.std()) > 0
            corr = float(np.corrcoef(lab.numpy(), y.numpy())[0, 1]) if varies else None
            stats[m] = {"n": int(gen.sum()), "mean": float(lab.mean()), "std": float(lab.std(unbiased=False)),
                        "corr_with_y": corr, "mean_abs_diff": float((lab - y).abs().mean())}
        if stats:
            record["generated_labels"] = stats
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"labels": dict(self.labels), "memory": dict(self.memory), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any], source: str = "resume state") -> None:
        n = len(self.seen)
        sizes = {len(state["seen"]), *(len(t) for t in state["labels"].values()),
                 *(len(t) for t in state["memory"].values())}
        if sizes != {n} or set(state["labels"]) != set(self.labels):
            raise TrainingError(f"{source}: the objective's saved labels belong to another training split "
                                f"({sorted(sizes)} samples, modalities {sorted(state['labels'])}; this one has {n}, "
                                f"{sorted(self.labels)}): resume on the file the run started with")
        self.labels = {m: t.clone() for m, t in state["labels"].items()}
        self.memory = {k: t.clone() for k, t in state["memory"].items()}
        self.seen = state["seen"].clone()


def unimodal_metrics(stages: dict[str, np.ndarray], split: Split, scale: str) -> dict[str, dict[str, Any]]:
    """Metrics of each unimodal head on ``split``: against the split's ``regression_labels_m`` when
    every sample has one, else against the multimodal label (``target`` says which)."""
    out: dict[str, dict[str, Any]] = {}
    for m, pred in stages.items():
        if m == FUSED:
            continue
        given = split.unimodal.get(m)
        own = given is not None and bool(torch.isfinite(given).all())
        target = (given if own and given is not None else split.labels).numpy()
        out[m] = {"target": f"label_{m}" if own else "multimodal", **split_metrics(pred, target, scale)}
    return out


def epoch_line(record: dict[str, Any]) -> str:
    """The auxiliary objectives' part of an epoch: loss terms, unimodal heads on valid, generated
    labels, stage weights."""
    obj = record["objective"]
    parts = ["losses " + " ".join(f"{k} {v:.4f}" for k, v in obj["losses"].items())]
    heads = record.get("unimodal", {}).get("valid", {})
    if heads:
        parts.append("valid unimodal MAE " + " ".join(f"{m} {v['MAE']:.4f}" for m, v in heads.items()))
    for m, g in obj.get("generated_labels", {}).items():
        corr = "n/a" if g["corr_with_y"] is None else f"{g['corr_with_y']:.3f}"
        parts.append(f"generated {m} labels mean {g['mean']:+.3f} std {g['std']:.3f} corr(y) {corr} "
                     f"|{m}-y| {g['mean_abs_diff']:.3f}")
    if obj.get("stage_weights"):
        parts.append("stage weights " + " ".join(f"{k} {w:.3f}" for k, w in obj["stage_weights"].items()))
    return " | ".join(parts)


__all__ = ["Objective", "info_nce", "unimodal_metrics", "epoch_line"]
