"""The data a training run needs: the feature file's splits as tensors, checked for training, and
the feature schema its checkpoints record."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batches import Split, to_split
from .config import Config
from .errors import ConfigError, TrainingError
from .features import FeatureFile, load_features
from .metrics import split_metric_names

logger = logging.getLogger(__name__)

# per-clip provenance in a feature file's meta that a checkpoint does not need
_PROVENANCE_KEYS = ("sources", "transcript_sources", "face_fraction")


@dataclass
class TrainingData:
    """What every seed of a run trains and is scored on."""

    splits: dict[str, Split]
    scale: str
    feature_meta: dict[str, Any]
    path: Path


def load_training_data(cfg: Config, data_path: Path) -> TrainingData:
    """Train and valid must be present and labelled; test is optional (metrics only when labelled)."""
    data = load_features(data_path, model_cfg=cfg.model, label_scale=cfg.train.label_scale, splits=None,
                         require_labels=False)
    splits = {name: to_split(name, arrays) for name, arrays in data.splits.items()}
    for name in ("train", "valid"):
        if name not in splits or splits[name].n == 0:
            raise TrainingError(f"{data_path}: no {name} samples; training needs labelled train and valid splits")
        if not splits[name].labelled:
            raise TrainingError(f"{data_path}: the {name} split has samples without labels; "
                                "training needs labelled train and valid splits")
    if "test" not in splits or not splits["test"].labelled:
        logger.warning("%s: no labelled test split; only validation metrics are reported", data_path)
    select = cfg.train.select_metric
    if select not in split_metric_names(data.label_scale):
        raise ConfigError(
            f"train.select_metric {select!r} is not a metric for label scale {data.label_scale} "
            f"(choose from {', '.join(split_metric_names(data.label_scale))})"
        )
    file_text_model = data.meta.get("text_model")
    if file_text_model and file_text_model != cfg.model.text_model:
        logger.warning(
            "%s: features were tokenized for text model %r but the config trains %r; make sure "
            "they share a vocabulary", data_path, file_text_model, cfg.model.text_model,
        )
    return TrainingData(splits=splits, scale=data.label_scale, feature_meta=_feature_schema(data), path=data_path)


def _feature_schema(data: FeatureFile) -> dict[str, Any]:
    """Feature meta stored in checkpoints: the file's meta (minus per-clip provenance) + shapes."""
    meta = {k: v for k, v in data.meta.items() if k not in _PROVENANCE_KEYS}
    dims = data.dims
    meta["lengths"] = {"text": dims["text_len"], "audio": dims["audio_len"], "vision": dims["vision_len"]}
    meta["dims"] = {"text": dims["text_dim"], "audio": dims["audio_dim"], "vision": dims["vision_dim"]}
    return json.loads(json.dumps(meta, default=str))  # plain JSON values only


__all__ = ["TrainingData", "load_training_data"]
