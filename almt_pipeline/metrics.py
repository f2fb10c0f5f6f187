"""Regression metrics with MMSA's definitions (thuiar/MMSA ``MetricsTop``), both label scales.

MOSI / MOSEI (labels in [-3, 3]):
  MAE on raw values; Corr (Pearson); Mult_acc_7/5/3: clip to [-3,3]/[-2,2]/[-1,1], round to the
  nearest integer (numpy: half to even), compare; Has0_*: truth >= 0 vs pred >= 0 on all samples;
  Non0_*: samples with truth == 0 dropped, truth > 0 vs pred > 0. F1 = sklearn weighted F1.
CH-SIMS (labels in [-1, 1]): predictions and labels clipped to [-1, 1] first (MAE, Corr too);
  Mult_acc_2 bins [-1, 0], (0, 1]; Mult_acc_3 [-1, -0.1], (-0.1, 0.1], (0.1, 1];
  Mult_acc_5 [-1, -0.7], (-0.7, -0.1], (-0.1, 0.1], (0.1, 0.7], (0.7, 1]; F1_score on the 2 bins.

Values are compared in float32 like MMSA (its tensors are float32), so a bin edge such as 0.1
lands where MMSA puts it. Edge cases MMSA does not handle: Corr is 0.0 (not NaN) when predictions
or labels are constant, so model selection and JSON logs keep working; Non0_* are NaN when every
label is 0 (no sample left). Results are not rounded (MMSA rounds MOSI results to 4 decimals);
``format_metrics`` rounds for display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

MOSI_KEYS = (
    "Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score",
    "Mult_acc_5", "Mult_acc_7", "MAE", "Corr", "Mult_acc_3",
)
SIMS_KEYS = ("Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr")
LOSS_KEY = "Loss"  # mean squared error, the training objective
LOWER_IS_BETTER = {"MAE", LOSS_KEY}
SCALES = {"mosi": "mosi", "mosei": "mosi", "sims": "sims"}  # label-scale names -> canonical scale
LABEL_RANGES = {"mosi": 3.0, "sims": 1.0}  # labels of a canonical scale lie in [-r, r]
LABEL_TOLERANCE = 1e-6  # float32 labels at the bound (e.g. 3.0000001) are in range
SIMS_EDGES = {  # interior bin edges; a value v is in bin sum(v > edge) (right-closed bins)
    2: (0.0,),
    3: (-0.1, 0.1),
    5: (-0.7, -0.1, 0.1, 0.7),
}
MOSI_CLIPS = {7: 3.0, 5: 2.0, 3: 1.0}  # Mult_acc_k: clip to [-c, c], round
# the columns analysis tables show, per canonical scale: (metric key, heading as papers write it)
HEADLINE_METRICS = {
    "mosi": (("MAE", "MAE"), ("Corr", "Corr"), ("Non0_acc_2", "Acc-2"), ("Non0_F1_score", "F1"),
             ("Mult_acc_7", "Acc-7")),
    "sims": (("MAE", "MAE"), ("Corr", "Corr"), ("Mult_acc_2", "Acc-2"), ("F1_score", "F1"),
             ("Mult_acc_5", "Acc-5")),
}


def canonical_scale(scale: str) -> str:
    """"mosi" or "sims" for any label-scale name of :data:`SCALES` (ValueError otherwise)."""
    try:
        return SCALES[str(scale).lower()]
    except KeyError:
        raise ValueError(f"unknown label scale {scale!r} (use {', '.join(SCALES)})") from None


def infer_label_scale(labels: np.ndarray) -> str:
    """"sims" when every finite label lies in [-1, 1], else "mosi" (also when there is none)."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    y = y[np.isfinite(y)]
    return "sims" if y.size and float(np.abs(y).max()) <= LABEL_RANGES["sims"] else "mosi"


def outside_label_range(labels: np.ndarray, scale: str) -> np.ndarray:
    """Mask of the finite labels outside ``[-r, r]`` of the (canonical) label scale ``scale``."""
    y = np.asarray(labels, dtype=np.float64)
    return np.isfinite(y) & (np.abs(y) > LABEL_RANGES[scale] + LABEL_TOLERANCE)


def metric_names(scale: str) -> tuple[str, ...]:
    """Metric keys :func:`regression_metrics` produces for a label scale."""
    return MOSI_KEYS if canonical_scale(scale) == "mosi" else SIMS_KEYS


def split_metric_names(scale: str) -> tuple[str, ...]:
    """Metric keys :func:`split_metrics` produces (what ``train.select_metric`` may name)."""
    return (*metric_names(scale), LOSS_KEY)


def _as_float32(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32).reshape(-1)  # (N,)


def _accuracy(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b)) if a.size else math.nan


def _weighted_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    if truth.size == 0:
        return math.nan
    from sklearn.metrics import f1_score  # imported on use: prediction needs no sklearn

    return float(f1_score(truth, pred, average="weighted", zero_division=0))


def _pearson(pred: np.ndarray, truth: np.ndarray) -> float:
    """Pearson r; 0.0 when either side is constant (undefined), NaN when inputs hold NaN/inf."""
    p = pred.astype(np.float64)
    t = truth.astype(np.float64)
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        return math.nan
    p = p - p.mean()
    t = t - t.mean()
    denom = math.sqrt(float(np.dot(p, p)) * float(np.dot(t, t)))
    if denom == 0.0:
        return 0.0
    return float(np.clip(np.dot(p, t) / denom, -1.0, 1.0))


def _mae(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(np.abs(pred.astype(np.float64) - truth.astype(np.float64))))


def _sims_bins(x: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Bin index of each value for right-closed bins; NaN gets -1 (never equal to a label's bin)."""
    e = np.asarray(edges, dtype=np.float32)
    bins = (x[:, None] > e[None, :]).sum(axis=1)  # (N,)
    bins[np.isnan(x)] = -1
    return bins


def sentiment_class(x: Any, scale: str, n_classes: int) -> np.ndarray:
    """Class of each value as the accuracy metrics see it.

    mosi: ``round(clip(x, -c, c))`` for 7, 5 or 3 classes (an integer in [-c, c]);
    sims: the index of the right-closed bin for 2, 3 or 5 classes (0 = most negative).
    """
    v = _as_float32(x)
    if canonical_scale(scale) == "mosi":
        c = MOSI_CLIPS[n_classes]
        return np.round(np.clip(v, -c, c))
    return _sims_bins(np.clip(v, -1.0, 1.0), SIMS_EDGES[n_classes])


def _mosi(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    has0_t, has0_p = truth >= 0, pred >= 0
    out["Has0_acc_2"] = _accuracy(has0_p, has0_t)
    out["Has0_F1_score"] = _weighted_f1(has0_t, has0_p)
    nonzero = truth != 0
    non0_t, non0_p = truth[nonzero] > 0, pred[nonzero] > 0
    out["Non0_acc_2"] = _accuracy(non0_p, non0_t)
    out["Non0_F1_score"] = _weighted_f1(non0_t, non0_p)
    for k in (5, 7):
        out[f"Mult_acc_{k}"] = _accuracy(sentiment_class(pred, "mosi", k), sentiment_class(truth, "mosi", k))
    out["MAE"] = _mae(pred, truth)
    out["Corr"] = _pearson(pred, truth)
    out["Mult_acc_3"] = _accuracy(sentiment_class(pred, "mosi", 3), sentiment_class(truth, "mosi", 3))
    return out


def _sims(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    pred = np.clip(pred, -1.0, 1.0)
    truth = np.clip(truth, -1.0, 1.0)
    out: dict[str, float] = {}
    bins = {k: (_sims_bins(pred, e), _sims_bins(truth, e)) for k, e in SIMS_EDGES.items()}
    for k in (2, 3, 5):
        out[f"Mult_acc_{k}"] = _accuracy(*bins[k])
    p2, t2 = bins[2]
    out["F1_score"] = _weighted_f1(t2, p2)
    out["MAE"] = _mae(pred, truth)
    out["Corr"] = _pearson(pred, truth)
    return out


def regression_metrics(pred: Any, truth: Any, scale: str) -> dict[str, float]:
    """MMSA regression metrics of predictions vs labels for ``scale`` "mosi"/"mosei" or "sims"."""
    p = _as_float32(pred)
    t = _as_float32(truth)
    if p.shape != t.shape:
        raise ValueError(f"predictions ({p.size}) and labels ({t.size}) differ in length")
    if p.size == 0:
        raise ValueError("no samples to compute metrics on")
    return _mosi(p, t) if canonical_scale(scale) == "mosi" else _sims(p, t)


def split_metrics(pred: Any, truth: Any, scale: str) -> dict[str, float]:
    """:func:`regression_metrics` plus ``Loss`` (the MSE), as plain floats."""
    out = {k: float(v) for k, v in regression_metrics(pred, truth, scale).items()}
    diff = _as_float32(pred).astype(np.float64) - _as_float32(truth).astype(np.float64)
    out[LOSS_KEY] = float(np.mean(diff**2))
    return out


def is_better(metric: str, new: float | None, old: float | None) -> bool:
    """True when ``new`` strictly improves on ``old`` (lower for MAE/Loss, higher otherwise).

    The first value (``old`` is None) is always the best so far, so a run always has a
    selected epoch; after that a non-finite ``new`` (NaN, inf) never improves, and a finite one
    improves on a non-finite ``old``.
    """
    if old is None:
        return True
    if new is None or not math.isfinite(new):
        return False
    if not math.isfinite(old):
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


def sort_key(metric: str, value: float | None) -> float:
    """Ascending key that puts the best value first (non-finite values last)."""
    if value is None or not math.isfinite(value):
        return math.inf
    return value if metric in LOWER_IS_BETTER else -value


def format_metrics(d: Mapping[str, Any], digits: int = 4) -> str:
    """One line: ``MAE 0.7123 | Corr 0.7890 | ...`` (floats rounded to ``digits``)."""
    parts = []
    for k, v in d.items():
        if isinstance(v, (float, np.floating)):
            parts.append(f"{k} {float(v):.{digits}f}")
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)


__all__ = [
    "MOSI_KEYS", "SIMS_KEYS", "LOWER_IS_BETTER", "SCALES", "canonical_scale", "infer_label_scale",
    "metric_names", "split_metric_names", "regression_metrics", "split_metrics", "is_better",
    "sort_key", "format_metrics",
]
