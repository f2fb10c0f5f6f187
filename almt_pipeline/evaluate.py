"""Scoring a checkpoint on one split of a feature file, with optional per-sample predictions."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from .batches import Split, amp_dtype, check_token_ids, predict_split, to_split
from .errors import ConfigError, FeatureFileError
from .features import FeatureFile, load_features
from .files import atomic_write_csv
from .metrics import format_metrics, split_metrics
from .model.checkpoint import LoadedCheckpoint, load_checkpoint
from .objectives import unimodal_metrics
from .schema import check_split
from .utils import resolve_device, results_log

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("id", "label", "prediction")


def evaluate(checkpoint_dir: str | os.PathLike, data_path: str | os.PathLike, *, split: str = "test",
             predictions_path: str | os.PathLike | None = None, device: str = "auto",
             batch_size: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Score a checkpoint on one split; optionally write ``id,label,prediction`` CSV.

    ``batch_size`` defaults to the checkpoint config's ``train.eval_batch_size``. The result
    holds the metrics (None for an unlabelled split) and the ``predictions`` (N,) in the split's
    order.
    """
    check_split(split)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    dev = resolve_device(device)
    ckpt, s = load_scored_split(checkpoint_dir, data_path, split, dev)
    batch_size = ckpt.cfg.train.eval_batch_size if batch_size is None else batch_size
    amp = amp_dtype(ckpt.cfg.train.amp, dev) if dev.type == "cuda" else None
    stages: dict[str, Any] | None = {} if getattr(ckpt.model, "aux", None) is not None else None
    pred = predict_split(ckpt.model, s, batch_size, dev, amp, quiet=quiet, stages=stages)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir), "data": str(data_path), "split": split, "n": s.n,
        "label_scale": ckpt.label_scale, "metrics": None, "predictions": pred,
        "predictions_path": str(predictions_path) if predictions_path else None,
    }
    labels = s.labels.numpy()
    if s.labelled:
        result["metrics"] = split_metrics(pred, labels, ckpt.label_scale)
        results_log.info("%s split (%d samples): %s", split, s.n, format_metrics(result["metrics"]))
        if stages:
            result["unimodal"] = unimodal_metrics(stages, s, ckpt.label_scale)
            for m, metrics in result["unimodal"].items():
                results_log.info("  unimodal head %s (against the %s label): MAE %.4f Corr %.4f", m,
                                 metrics["target"], metrics["MAE"], metrics["Corr"])
    else:
        results_log.info("%s split (%d samples) has no labels: predictions only", split, s.n)
    if predictions_path:
        atomic_write_csv(predictions_path, PREDICTION_COLUMNS, (
            [i, f"{float(y):.6g}" if math.isfinite(y) else "", f"{float(p):.6f}"]
            for i, y, p in zip(s.ids, labels, pred)
        ))
        results_log.info("wrote %d predictions to %s", s.n, predictions_path)
    return result


def load_scored_split(checkpoint_dir: str | os.PathLike, data_path: str | os.PathLike, split: str,
                      device: torch.device) -> tuple[LoadedCheckpoint, Split]:
    """A checkpoint and one split of a feature file it can score (see :func:`load_checked_features`)."""
    ckpt = load_checkpoint(checkpoint_dir, device)
    data = load_checked_features(ckpt, checkpoint_dir, data_path, (split,))
    return ckpt, to_split(split, data.splits[split])


def load_checked_features(ckpt: LoadedCheckpoint, checkpoint_dir: str | os.PathLike, data_path: str | os.PathLike,
                          splits: tuple[str, ...] | None) -> FeatureFile:
    """The ``splits`` of a feature file (None: all it has) that checkpoint ``ckpt`` can score: the file
    is read with the checkpoint's model sizes and label scale, its features must be the ones the
    checkpoint was trained on, and its token ids must fit the checkpoint's text model."""
    data = load_features(data_path, model_cfg=ckpt.cfg.model, splits=splits, require_labels=False,
                         label_scale=ckpt.label_scale)
    check_feature_names(ckpt.feature_meta, data.meta, Path(checkpoint_dir), Path(data_path))
    text_config: Any = getattr(ckpt.model.text_encoder, "config", None)
    if text_config is not None:
        check_token_ids([to_split(name, a) for name, a in data.splits.items()], int(text_config.vocab_size),
                        ckpt.cfg.model.text_model)
    if data.label_scale != ckpt.label_scale:
        logger.warning("%s: label scale %s differs from the checkpoint's %s; using the checkpoint's",
                       data_path, data.label_scale, ckpt.label_scale)
    return data


def check_feature_names(ckpt_meta: dict[str, Any], file_meta: dict[str, Any], ckpt_dir: Path,
                        data_path: Path) -> None:
    """Same widths are not enough: features from a different recipe must not be scored silently."""
    a, b = ckpt_meta.get("feature_names") or {}, file_meta.get("feature_names") or {}
    for modality in sorted(set(a) & set(b)):
        if list(a[modality]) != list(b[modality]):
            raise FeatureFileError(
                f"{data_path}: {modality} features differ from those the checkpoint {ckpt_dir} was "
                "trained on (feature_names); extract them with the checkpoint's config"
            )
