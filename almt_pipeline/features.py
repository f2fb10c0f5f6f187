"""MMSA feature files: load safely and validate, write atomically, and lay out clips as arrays.

The schema (split names, keys, per-split checks) is in :mod:`.schema`; unpickling is restricted
by :mod:`.safe_pickle`. :func:`fit_length` and :func:`assemble_splits` turn per-clip features of
any length into the padded arrays of a split, as MMSA files store them.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .config import Config, ModelConfig
from .errors import FeatureFileError
from .files import atomic_write
from .metrics import LABEL_RANGES, canonical_scale, infer_label_scale, outside_label_range
from .safe_pickle import safe_load_pickle
from .schema import (
    LABEL_KEY,
    LENGTH_KEYS,
    MAX_NESTING,
    META_KEY,
    SCHEMA_VERSION,
    SPLITS,
    STRING_KEYS,
    Arrays,
    ExpansionBudget,
    ExpansionError,
    Problems,
    as_array,
    check_against_config,
    check_consistency,
    to_str_array,
    validate_split,
)
from .utils import package_version

logger = logging.getLogger(__name__)

PICKLE_PROTOCOL = 4


@dataclass
class FeatureFile:
    """A validated feature file: float32 features, int64 lengths, str ids/texts per split."""

    path: Path
    splits: dict[str, Arrays]
    meta: dict[str, Any] = field(default_factory=dict)
    label_scale: str = "mosi"  # "mosi" ([-3, 3]) or "sims" ([-1, 1])

    @property
    def dims(self) -> dict[str, int]:
        """Widths and padded lengths shared by all splits: text_len/text_dim/audio_*/vision_*."""
        split = next(iter(self.splits.values()))
        return {
            "text_len": int(split["text_bert"].shape[2]),
            "text_dim": int(split["text"].shape[2]),
            "audio_len": int(split["audio"].shape[1]),
            "audio_dim": int(split["audio"].shape[2]),
            "vision_len": int(split["vision"].shape[1]),
            "vision_dim": int(split["vision"].shape[2]),
        }

    def n(self, split: str) -> int:
        return int(len(self.splits[split]["id"]))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def resolve_scale(name: str | None) -> str | None:
    """Canonical label scale ("mosi"/"sims") of a name; None for ``None``, "" and "auto"."""
    if name in (None, "", "auto"):
        return None
    try:
        return canonical_scale(str(name))
    except ValueError as e:
        raise FeatureFileError(str(e)) from None


def load_features(
    path: str | os.PathLike,
    *,
    model_cfg: ModelConfig | Config | None = None,
    splits: Iterable[str] | None = SPLITS,
    require_labels: bool = True,
    label_scale: str | None = None,
    fix_nonfinite: bool = False,
) -> FeatureFile:
    """Safely load and validate an MMSA-format feature file.

    ``splits``: the splits to load, each required to exist; ``None`` loads whichever of
    ``SPLITS`` the file has (at least one). ``model_cfg`` (a ``ModelConfig`` or a ``Config``):
    feature widths must match it and padded lengths must not exceed it. ``require_labels=False``
    accepts splits without (or with NaN) labels; missing labels become NaN. The label scale comes
    from the file's meta, else ``label_scale`` / the config's ``train.label_scale``, else it is
    inferred (max |y| > 1 -> "mosi"). Audio -inf becomes 0 as upstream loaders do; other
    non-finite values are an error unless ``fix_nonfinite`` (then they become 0, with a warning).
    """
    path = Path(path)
    obj = safe_load_pickle(path)
    if not isinstance(obj, Mapping):
        raise FeatureFileError(f"{path}: expected a dict of splits at the top level, found {type(obj).__name__}")
    budget = ExpansionBudget(path.stat().st_size)  # lists and meta, before anything expands them
    meta = _checked_meta(obj.get(META_KEY), budget, path)
    cfg_scale = None
    if isinstance(model_cfg, Config):
        cfg_scale = model_cfg.train.label_scale
        model_cfg = model_cfg.model
    cfg_scale = resolve_scale(label_scale) or resolve_scale(cfg_scale)

    problems = Problems(path)
    loaded: dict[str, Arrays] = {}
    for s in _wanted_splits(obj, splits, path, problems):
        data = validate_split(s, obj[s], problems, require_labels=require_labels, fix_nonfinite=fix_nonfinite,
                              budget=budget)
        if data is not None:
            loaded[s] = data
    del obj
    check_consistency(loaded, problems)
    if model_cfg is not None and loaded:
        check_against_config(loaded, model_cfg, problems)
    scale = _label_scale(meta, cfg_scale, loaded, path, problems)
    _check_label_range(loaded, scale, problems)
    problems.raise_if_any()
    sizes = ", ".join(f"{s} {len(d['id'])}" for s, d in loaded.items())
    logger.info("%s: loaded %s samples (label scale %s)", path, sizes, scale)
    return FeatureFile(path=path, splits=loaded, meta=meta, label_scale=scale)


def _checked_meta(meta: Any, budget: ExpansionBudget, path: Path) -> dict[str, Any]:
    """The file's meta dict: plain builtins (what JSON holds), sized against the file's budget
    before anything (logging, JSON in checkpoints) expands shared parts of it."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise FeatureFileError(f"{path}: top-level '{META_KEY}' is a {type(meta).__name__}, expected a dict")
    try:
        budget.take(_plain_size(meta, {}, 0)[0], f"the '{META_KEY}' dict")
    except ValueError as e:  # ExpansionError included
        raise FeatureFileError(f"{path}: {META_KEY}: {e}") from None
    return dict(meta)


def _plain_size(value: Any, seen: dict[int, tuple[int, int]], depth: int) -> tuple[int, int]:
    """(bytes once expanded, nesting height) of a plain value; shared parts count at each use."""
    if value is None or isinstance(value, (bool, float, np.bool_, np.floating)):
        return 8, 0
    if isinstance(value, (int, np.integer)):
        if int(value).bit_length() > 64:
            raise ValueError(f"holds an integer of {int(value).bit_length()} bits")
        return 8, 0
    if isinstance(value, (str, bytes)):
        return 8 + len(value), 0
    if not isinstance(value, (list, tuple, Mapping)):
        raise ValueError(f"holds a {type(value).__name__}; only plain builtins are allowed")
    key = id(value)
    if key not in seen:
        if depth >= MAX_NESTING:
            raise ExpansionError(f"nested more than {MAX_NESTING} deep")
        parts = [*value.keys(), *value.values()] if isinstance(value, Mapping) else list(value)
        sizes = [_plain_size(v, seen, depth + 1) for v in parts]
        seen[key] = (8 + sum(s for s, _ in sizes), 1 + max((h for _, h in sizes), default=0))
    if depth + seen[key][1] > MAX_NESTING:
        raise ExpansionError(f"nested more than {MAX_NESTING} deep")
    return seen[key]


def _wanted_splits(obj: Mapping[Any, Any], splits: Iterable[str] | None, path: Path,
                   problems: Problems) -> list[str]:
    """The requested splits that the file has (missing requested ones are problems)."""
    present = [k for k in obj if k != META_KEY and isinstance(k, str)]
    if splits is None:
        wanted = [s for s in SPLITS if s in obj]
        if not wanted:
            raise FeatureFileError(
                f"{path}: no train/valid/test split in the file "
                f"(top-level keys: {', '.join(map(str, present)) or 'none'})"
            )
        return wanted
    wanted = list(splits)
    for s in wanted:
        if s not in obj:
            problems.add(s, f"split missing (the file has: {', '.join(present) or 'nothing'})")
    return [s for s in wanted if s in obj]


def _label_scale(meta: dict[str, Any], cfg_scale: str | None, loaded: dict[str, Arrays], path: Path,
                 problems: Problems) -> str:
    """The file's meta, else the configured scale, else inferred from the labels."""
    meta_scale = meta.get("label_scale")
    try:
        meta_scale = resolve_scale(meta_scale)
    except FeatureFileError:
        problems.add(META_KEY, f"unknown label_scale {meta_scale!r} (use mosi or sims)")
        meta_scale = None
    if meta_scale and cfg_scale and meta_scale != cfg_scale:
        logger.warning(
            "%s: the file says label_scale=%s; ignoring the configured %s", path, meta_scale, cfg_scale
        )
    if meta_scale or cfg_scale:
        return str(meta_scale or cfg_scale)
    labels = [d[LABEL_KEY] for d in loaded.values() if LABEL_KEY in d]
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    scale = infer_label_scale(all_labels)
    finite = all_labels[np.isfinite(all_labels)]
    if not finite.size:
        logger.info("%s: no labels; assuming the MOSI/MOSEI label scale [-3, 3]", path)
    else:
        logger.info("%s: label scale inferred from the labels (max |y| = %.3g): %s; set label_scale to "
                    "override", path, float(np.abs(finite).max()), scale)
    return scale


def _check_label_range(loaded: dict[str, Arrays], scale: str, problems: Problems) -> None:
    bound = LABEL_RANGES[scale]
    for s, data in loaded.items():
        y = data.get(LABEL_KEY)
        if y is None:
            continue
        finite = y[np.isfinite(y)]
        bad = int(outside_label_range(y, scale).sum())
        if bad:
            problems.add(
                f"{s}/{LABEL_KEY}",
                f"{bad} label(s) outside [-{bound:g}, {bound:g}] for label scale {scale} "
                f"(range found {float(finite.min()):.3g}..{float(finite.max()):.3g})",
            )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _check_plain(value: Any, where: str) -> None:
    """Meta must hold only builtins so that any unpickler (and JSON) can read it."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise FeatureFileError(f"meta key {where}.{k!r} must be a str")
            _check_plain(v, f"{where}.{k}")
        return
    raise FeatureFileError(f"meta value {where} is a {type(value).__name__}; only plain builtins are allowed")


def _plain(value: Any) -> Any:
    """Convert numpy scalars/arrays and paths inside meta to builtins."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_features(
    path: str | os.PathLike, splits: Mapping[str, Mapping[str, Any]], meta: Mapping | None = None
) -> None:
    """Write ``{split: {key: array}, "meta": meta}`` atomically (pickle protocol 4).

    Ids/texts are stored as object arrays of ``str`` and lengths as int64, as MMSA files are.
    ``meta`` gets ``schema_version`` and ``created_by`` when missing.
    """
    path = Path(path)
    out: dict[str, Any] = {}
    for name, data in splits.items():
        if name == META_KEY:
            raise FeatureFileError(f"{path}: '{META_KEY}' is reserved and cannot be a split name")
        arrays: dict[str, np.ndarray] = {}
        for key, value in data.items():
            arr = as_array(value)
            if key in STRING_KEYS:
                arr = to_str_array(arr)
            elif key in LENGTH_KEYS:
                arr = arr.astype(np.int64)
            arrays[key] = arr
        counts = {k: (len(v) if v.ndim else None) for k, v in arrays.items()}
        if len(set(counts.values())) > 1:
            raise FeatureFileError(f"{path}: split {name!r} has arrays of different lengths: {counts}")
        out[name] = arrays
    meta_out = _plain(dict(meta or {}))
    meta_out.setdefault("schema_version", SCHEMA_VERSION)
    meta_out.setdefault("created_by", f"almt-pipeline {package_version()}")
    _check_plain(meta_out, META_KEY)
    out[META_KEY] = meta_out
    with atomic_write(path, "wb") as f:
        pickle.dump(out, f, protocol=PICKLE_PROTOCOL)
    sizes = ", ".join(f"{s} {len(d.get('id', []))}" for s, d in out.items() if s != META_KEY)
    logger.info("wrote %s (%s)", path, sizes)


# ---------------------------------------------------------------------------------------------
# Clips -> arrays
# ---------------------------------------------------------------------------------------------


class ClipFeatures(Protocol):
    """Unpadded features of one clip (what the extractors produce)."""

    text_bert: np.ndarray  # (3, L) float32: token ids, attention mask, segment ids
    text: np.ndarray  # (L, H) float32
    audio: np.ndarray  # (T_a, d_a) float32
    vision: np.ndarray  # (T_v, d_v) float32
    raw_text: str


class ClipLabels(Protocol):
    """Identity, split and labels of one clip (a row of a dataset's label file)."""

    @property
    def id(self) -> str: ...
    @property
    def split(self) -> str: ...
    @property
    def label(self) -> float: ...
    @property
    def label_T(self) -> float | None: ...  # noqa: N802 (MMSA column names)
    @property
    def label_A(self) -> float | None: ...  # noqa: N802
    @property
    def label_V(self) -> float | None: ...  # noqa: N802
    @property
    def annotation(self) -> str: ...


def fit_length(x: np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
    """Zero-pad ``x`` (T, d) to (max_len, d); a longer sequence is mean-pooled into max_len
    contiguous bins (never cut). Returns (array, number of valid rows)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a (T, d) array, got shape {x.shape}")
    n, d = x.shape
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if n <= max_len:
        out = np.zeros((max_len, d), dtype=np.float32)  # (max_len, d)
        out[:n] = x
        return out, n
    edges = (np.arange(max_len + 1) * n) // max_len  # bin boundaries, strictly increasing
    sums = np.add.reduceat(x.astype(np.float64), edges[:-1], axis=0)  # (max_len, d)
    counts = np.diff(edges)[:, None]  # (max_len, 1)
    return (sums / counts).astype(np.float32), max_len


def assemble_split(rows: Sequence[tuple[ClipLabels, ClipFeatures]], m: ModelConfig,
                   unimodal: bool) -> Arrays:
    """One split's arrays from its clips, in order: features padded or pooled to the config's
    lengths, ids, texts, labels (and ``regression_labels_T/A/V`` when ``unimodal``)."""
    n = len(rows)
    text_dim = int(rows[0][1].text.shape[1])
    arr: Arrays = {
        "text_bert": np.zeros((n, 3, m.text_len), np.float32),  # (N, 3, L)
        "text": np.zeros((n, m.text_len, text_dim), np.float32),  # (N, L, H)
        "audio": np.zeros((n, m.audio_len, m.audio_dim), np.float32),  # (N, T_a, d_a)
        "vision": np.zeros((n, m.vision_len, m.vision_dim), np.float32),  # (N, T_v, d_v)
        "audio_lengths": np.zeros(n, np.int64),  # (N,)
        "vision_lengths": np.zeros(n, np.int64),  # (N,)
    }
    for j, (_, r) in enumerate(rows):
        arr["text_bert"][j] = r.text_bert
        arr["text"][j] = r.text
        arr["audio"][j], arr["audio_lengths"][j] = fit_length(r.audio, m.audio_len)
        arr["vision"][j], arr["vision_lengths"][j] = fit_length(r.vision, m.vision_len)
    arr["id"] = np.array([spec.id for spec, _ in rows], dtype=object)
    arr["raw_text"] = np.array([r.raw_text for _, r in rows], dtype=object)
    arr[LABEL_KEY] = np.array([spec.label for spec, _ in rows], np.float32).reshape(n)
    arr["annotations"] = np.array([spec.annotation for spec, _ in rows], dtype=object)
    if unimodal:
        for mod in ("T", "A", "V"):
            values = [getattr(spec, f"label_{mod}") for spec, _ in rows]
            arr[f"{LABEL_KEY}_{mod}"] = np.array(
                [math.nan if v is None else v for v in values], np.float32).reshape(n)
    return arr


__all__ = [
    "SPLITS", "SCHEMA_VERSION", "META_KEY", "FeatureFile", "safe_load_pickle", "load_features",
    "save_features", "fit_length", "assemble_split",
]
