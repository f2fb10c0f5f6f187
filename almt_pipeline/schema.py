"""The MMSA feature-file schema: split names, array keys, and the checks a split must pass.

A feature file is a pickled dict ``{"train": {...}, "valid": {...}, "test": {...}}`` whose splits
hold equal-length arrays (README, "The feature file"). Files written here add a top-level
``"meta"`` dict of plain builtins; MMSA's own loader only indexes ``data[split][key]`` and never
sees it. :func:`validate_split` turns one split into normalised arrays (float32 features,
int64 lengths, ``str`` ids and texts), collecting every problem found into :class:`Problems`.
Lists in a split and the meta dict are sized against an :class:`ExpansionBudget` derived from
the file's size before anything expands them (numpy, JSON): pickle's memo lets a small file
describe a list of lists far larger than the file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig
from .errors import ConfigError, FeatureFileError
from .utils import one_line

SPLITS = ("train", "valid", "test")
SCHEMA_VERSION = 1
META_KEY = "meta"
REQUIRED = (
    "id", "raw_text", "text_bert", "text", "audio", "vision",
    "audio_lengths", "vision_lengths", "regression_labels",
)
LABEL_KEY = "regression_labels"
STRING_KEYS = ("id", "raw_text", "annotations")
FEATURE_KEYS = ("text_bert", "text", "audio", "vision")
FEATURE_NDIM = {"text_bert": 3, "text": 3, "audio": 3, "vision": 3}
LENGTH_KEYS = {"audio_lengths": "audio", "vision_lengths": "vision"}
UNIMODAL_LABEL_KEYS = ("regression_labels_T", "regression_labels_A", "regression_labels_V")
OPTIONAL_NUMERIC = ("classification_labels", *UNIMODAL_LABEL_KEYS)
logger = logging.getLogger(__name__)

_MAX_FRAME_COUNT = 1 << 40  # a valid length is at most a padded length; larger ones do not fit int64 casts
_CHUNK_ELEMENTS = 1 << 24  # finite checks in slices of ~16M values to bound temporary memory
EXPANSION_PER_FILE_BYTE = 8  # bytes a list element / meta value may take once converted, per file byte
EXPANSION_FLOOR = 1 << 20  # ... plus this much for any file
MAX_NESTING = 32  # numpy's limit is 64 dimensions; feature arrays have at most 3
_TEXT, _WIDE = 1, 2  # flags of a list: holds str/bytes (-> object array), holds complex (16 bytes)

Arrays = dict[str, np.ndarray]


def check_split(name: str, what: str = "split") -> str:
    """``name`` when it is one of :data:`SPLITS`, else a one-line :class:`ConfigError`."""
    if name not in SPLITS:
        raise ConfigError(f"{what} must be one of {', '.join(SPLITS)}, got {name!r}")
    return name


class Problems:
    """Collects one-line problems; raises them as a single FeatureFileError."""

    def __init__(self, path: Path):
        self.path = path
        self.items: list[str] = []

    def add(self, where: str, msg: str) -> None:
        self.items.append(f"{where}: {msg}" if where else msg)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise FeatureFileError(f"{self.path}: {self.items[0]}")
        lines = "\n".join(f"  - {p}" for p in self.items)
        raise FeatureFileError(
            f"{self.path}: {len(self.items)} problems in feature file (first: {self.items[0]})\n{lines}"
        )


class ExpansionError(ValueError):
    """A list or meta value that would expand past the file's :class:`ExpansionBudget`."""


class ExpansionBudget:
    """Bytes that the lists and the meta dict of one file may expand to, together.

    A list element or meta value takes at least one byte of the pickle (an opcode) and at most 8
    once converted (a pointer, an int64/float64; 16 for complex), so a real file stays within
    ``EXPANSION_PER_FILE_BYTE * file size + EXPANSION_FLOOR``. Sublists shared through pickle's
    memo are counted each time they appear, as numpy and JSON would expand them.
    """

    def __init__(self, file_size: int) -> None:
        self.file_size = file_size
        self.left = EXPANSION_PER_FILE_BYTE * file_size + EXPANSION_FLOOR

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise ExpansionError(
                f"{what} would expand to {nbytes} bytes, more than a {self.file_size}-byte feature file "
                f"can describe ({self.left} bytes left of {EXPANSION_PER_FILE_BYTE} per file byte + "
                f"{EXPANSION_FLOOR}); refused before converting it"
            )
        self.left -= nbytes


def _list_size(value: list | tuple, seen: dict[int, tuple[int, int, int]], depth: int = 0) -> tuple[int, int, int]:
    """(elements + sublists, nesting height, flags) of a nested list; a shared sublist counts at
    each use (numpy walks every occurrence, even of an empty list)."""
    key = id(value)
    if key in seen:
        if depth + seen[key][1] > MAX_NESTING:
            raise ValueError(f"lists nested more than {MAX_NESTING} deep")
        return seen[key]
    if depth >= MAX_NESTING:
        raise ValueError(f"lists nested more than {MAX_NESTING} deep")
    n = height = flags = 0
    for item in value:
        if isinstance(item, (list, tuple)):
            k, h, f = _list_size(item, seen, depth + 1)
            n, height, flags = n + k, max(height, h), flags | f
        elif isinstance(item, (str, bytes)):
            n, flags = n + 1, flags | _TEXT
        elif isinstance(item, (complex, np.complexfloating)):
            n, flags = n + 1, flags | _WIDE
        elif item is None or isinstance(item, (int, float, np.number, np.bool_)):
            n += 1
        else:
            raise ValueError(f"a list holding a {type(item).__name__}, not numbers or strings")
    seen[key] = (n + 1, height + 1, flags)
    return seen[key]


def as_array(value: Any, budget: ExpansionBudget | None = None) -> np.ndarray:
    """``value`` as an array. With a ``budget`` (a loaded file's), a list is sized against it
    first and one holding strings becomes an object array (8 bytes per element, not numpy's
    fixed-width ``<U`` of its longest string)."""
    if isinstance(value, np.ndarray):
        return value
    if budget is None:
        return np.asarray(value)
    if not isinstance(value, (list, tuple)):
        size = 4 * len(value) if isinstance(value, str) else len(value) if isinstance(value, bytes) else 0
        budget.take(8 + size, f"a {type(value).__name__}")
        return np.asarray(value)
    n, _, flags = _list_size(value, {})
    what = f"a list of {n} elements and sublists (shared ones counted each time)"
    budget.take(n * (16 if flags & _WIDE else 8), what)
    return np.array(value, dtype=object) if flags & _TEXT else np.asarray(value)


def _nonfinite_counts(x: np.ndarray) -> tuple[int, int, int]:
    """(NaN, +inf, -inf) counts, scanning in slices to bound temporary memory."""
    nan = pos = neg = 0
    flat = x.reshape(-1)
    for start in range(0, flat.size, _CHUNK_ELEMENTS):
        part = flat[start:start + _CHUNK_ELEMENTS]
        if np.isfinite(part).all():
            continue
        nan += int(np.isnan(part).sum())
        pos += int(np.isposinf(part).sum())
        neg += int(np.isneginf(part).sum())
    return nan, pos, neg


def _describe_nonfinite(nan: int, pos: int, neg: int) -> str:
    parts = [f"{c} {k}" for c, k in ((nan, "NaN"), (pos, "+inf"), (neg, "-inf")) if c]
    return ", ".join(parts)


def to_str_array(arr: np.ndarray) -> np.ndarray:
    """Object array of Python ``str`` (bytes decoded as UTF-8), as MMSA files store ids/texts.
    An object shared by many rows (pickle's memo) is converted once, not once per row."""
    out = np.empty(len(arr), dtype=object)
    done: dict[int, str] = {}
    shared = arr.dtype == object  # its items live as long as ``arr``: their ids are stable
    for i, v in enumerate(arr):
        if type(v) is not str:
            key = id(v)
            if not shared or key not in done:
                done[key] = v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
            v = done[key]
        out[i] = v
    return out


def _numbers(arr: np.ndarray) -> np.ndarray:
    """``arr``; TypeError for an object array holding strings (numbers as text are not numbers here)."""
    if arr.dtype.kind == "O" and any(isinstance(v, (str, bytes)) for v in arr.flat):
        raise TypeError("strings in an object array")
    return arr


def _to_float32(where: str, arr: np.ndarray, problems: Problems) -> np.ndarray | None:
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind == "O":
        try:
            return _numbers(arr).astype(np.float32)
        except OverflowError:
            problems.add(where, "holds a number too large for float32")
            return None
        except (TypeError, ValueError):
            pass
    problems.add(where, f"expected numbers, found dtype {arr.dtype}")
    return None


def _keep_as_float32(name: str, key: str, arr: np.ndarray, out: Arrays, problems: Problems) -> None:
    """``out[key] = arr`` as float32, or drop the key (a problem is recorded) when not numeric."""
    cast = _to_float32(f"{name}/{key}", arr, problems)
    if cast is None:
        del out[key]
    else:
        out[key] = cast


def validate_split(
    name: str, raw: Any, problems: Problems, *, require_labels: bool, fix_nonfinite: bool,
    budget: ExpansionBudget | None = None,
) -> Arrays | None:
    """Check one split's keys, lengths, shapes, dtypes and values; return normalised arrays.
    ``budget``: the loaded file's (lists are sized against it before numpy converts them)."""
    collected = _collect_arrays(name, raw, problems, require_labels, budget)
    if collected is None:
        return None
    out, n = collected
    _check_strings(name, out, problems)
    _check_features(name, out, problems)
    _check_finite(name, out, problems, fix_nonfinite)
    _check_lengths(name, out, problems)
    _check_labels(name, out, problems, n, require_labels)
    return out


def _collect_arrays(name: str, raw: Any, problems: Problems, require_labels: bool,
                    budget: ExpansionBudget | None) -> tuple[Arrays, int] | None:
    """The split's arrays by key, and its sample count; rows must agree across keys."""
    if not isinstance(raw, Mapping):
        problems.add(name, f"split is a {type(raw).__name__}, expected a dict of arrays")
        return None
    required = [k for k in REQUIRED if require_labels or k != LABEL_KEY]
    missing = [k for k in required if k not in raw]
    if missing:
        problems.add(name, f"missing key(s) {', '.join(missing)}")
    out: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            continue
        try:
            out[key] = as_array(value, budget)
        except ExpansionError as e:
            raise FeatureFileError(f"{problems.path}: {name}/{key}: {e}") from None
        except Exception as e:  # noqa: BLE001 - ragged lists and the like
            problems.add(f"{name}/{key}", f"not an array ({type(e).__name__}: {one_line(e)})")
    n = len(out["id"]) if "id" in out and out["id"].ndim == 1 else None
    # equal lengths within the split
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in out.items()}
    if n is None:
        n_guess = [s for s in sizes.values() if s is not None]
        n = max(set(n_guess), key=n_guess.count) if n_guess else 0
    for key, size in sizes.items():
        if size is None:
            problems.add(f"{name}/{key}", "is a scalar, expected one row per sample")
        elif size != n:
            problems.add(f"{name}/{key}", f"has {size} rows but the split has {n} samples (id)")
    if n == 0:
        problems.add(name, "split is empty (0 samples)")
    return out, n


def _check_strings(name: str, out: Arrays, problems: Problems) -> None:
    """Ids, texts and annotations as object arrays of ``str`` (bytes decoded as UTF-8)."""
    for key in STRING_KEYS:
        if key not in out:
            continue
        if out[key].ndim != 1:
            problems.add(f"{name}/{key}", f"expected shape (N,), found {out[key].shape}")
            continue
        odd = [type(v).__name__ for v in out[key] if not isinstance(v, (str, bytes))]
        if odd:
            problems.add(f"{name}/{key}", f"expected strings, found {len(odd)} {odd[0]} value(s)")
            continue
        out[key] = to_str_array(out[key])


def _check_features(name: str, out: Arrays, problems: Problems) -> None:
    """Feature arrays: (N, ., .) numbers cast to float32; token ids, mask and text shape checked."""
    for key, ndim in FEATURE_NDIM.items():
        if key not in out:
            continue
        if out[key].ndim != ndim:
            problems.add(f"{name}/{key}", f"expected {ndim} dims (N, T, D), found shape {out[key].shape}")
            del out[key]
            continue
        _keep_as_float32(name, key, out[key], out, problems)

    tb = out.get("text_bert")
    if tb is not None:
        if tb.shape[1] != 3:
            problems.add(f"{name}/text_bert", f"expected shape (N, 3, L) (ids, mask, segments), found {tb.shape}")
        elif tb.size:
            ids, mask = tb[:, 0], tb[:, 1]
            if not np.isfinite(tb).all():
                problems.add(f"{name}/text_bert", f"{_describe_nonfinite(*_nonfinite_counts(tb))} values")
            elif (ids < 0).any() or (ids != np.round(ids)).any():
                problems.add(f"{name}/text_bert", "token ids (row 0) must be non-negative integers")
            elif not np.isin(mask, (0.0, 1.0)).all():
                problems.add(f"{name}/text_bert", "attention mask (row 1) must be 0 or 1")
    if tb is not None and "text" in out and out["text"].shape[1] != tb.shape[2]:
        problems.add(
            f"{name}/text",
            f"has {out['text'].shape[1]} tokens but text_bert has {tb.shape[2]} "
            "(shapes must be (N, L, H) and (N, 3, L))",
        )


def _check_finite(name: str, out: Arrays, problems: Problems, fix_nonfinite: bool) -> None:
    """Audio -inf becomes 0 as upstream loaders do; other non-finite values are a problem."""
    for key in ("text", "audio", "vision"):
        if key not in out:
            continue
        nan, pos, neg = _nonfinite_counts(out[key])
        if key == "audio" and neg:
            out[key] = out[key].copy() if not out[key].flags.writeable else out[key]
            out[key][np.isneginf(out[key])] = 0.0  # upstream MMSA loaders do the same
            neg = 0
        if nan or pos or neg:
            if fix_nonfinite:
                logger.warning("%s/%s: replacing %s values by 0", name, key, _describe_nonfinite(nan, pos, neg))
                out[key] = np.nan_to_num(out[key], nan=0.0, posinf=0.0, neginf=0.0, copy=False)
            else:
                problems.add(f"{name}/{key}", f"{_describe_nonfinite(nan, pos, neg)} values after float32 cast")

def _check_lengths(name: str, out: Arrays, problems: Problems) -> None:
    """Valid lengths as int64 whole numbers within the padded length of their modality."""
    for key, feat in LENGTH_KEYS.items():
        if key not in out:
            continue
        arr = out[key]
        where = f"{name}/{key}"
        if arr.ndim != 1:
            problems.add(where, f"expected shape (N,), found {arr.shape}")
            del out[key]
            continue
        if arr.dtype.kind not in "biuf":
            try:
                arr = _numbers(arr).astype(np.float64)
            except (TypeError, ValueError, OverflowError):
                problems.add(where, f"expected integers, found dtype {arr.dtype}")
                del out[key]
                continue
        if arr.dtype.kind == "f" and (not np.isfinite(arr).all() or (arr != np.round(arr)).any()):
            problems.add(where, "expected whole numbers (frame counts)")
            del out[key]
            continue
        if arr.size and float(np.abs(arr.astype(np.float64)).max()) > _MAX_FRAME_COUNT:
            problems.add(where, f"frame counts up to {float(np.abs(arr.astype(np.float64)).max()):.3g}, "
                                "beyond any padded length")
            del out[key]
            continue
        arr = arr.astype(np.int64)
        out[key] = arr
        if feat in out and arr.size:
            t_max = out[feat].shape[1]
            bad = int(((arr < 0) | (arr > t_max)).sum())
            if bad:
                problems.add(
                    where,
                    f"{bad} value(s) outside [0, {t_max}] (the padded {feat} length); range found "
                    f"{int(arr.min())}..{int(arr.max())}",
                )


def _check_labels(name: str, out: Arrays, problems: Problems, n: int, require_labels: bool) -> None:
    """Labels as float32 (N,); a split without labels gets NaN when labels are not required."""
    for key in (LABEL_KEY, *OPTIONAL_NUMERIC):
        if key not in out:
            continue
        arr = out[key].reshape(-1) if out[key].ndim == 2 and out[key].shape[1:] == (1,) else out[key]
        if arr.ndim != 1:
            problems.add(f"{name}/{key}", f"expected shape (N,), found {out[key].shape}")
            del out[key]
            continue
        _keep_as_float32(name, key, arr, out, problems)

    if LABEL_KEY not in out and not require_labels and n:
        out[LABEL_KEY] = np.full(n, np.nan, dtype=np.float32)  # unlabelled (prediction-only) split
    y = out.get(LABEL_KEY)
    if y is not None:
        nan, pos, neg = _nonfinite_counts(y)
        if pos or neg or (nan and require_labels):
            problems.add(f"{name}/{LABEL_KEY}", f"{_describe_nonfinite(nan, pos, neg)} labels")


def check_consistency(splits: dict[str, Arrays], problems: Problems) -> None:
    """All splits must share token length, feature widths and padded lengths."""
    first: dict[str, tuple[str, tuple]] = {}
    for name, data in splits.items():
        for key in FEATURE_KEYS:
            if key not in data:
                continue
            dims = tuple(data[key].shape[1:])
            if key not in first:
                first[key] = (name, dims)
            elif first[key][1] != dims:
                ref_split, ref = first[key]
                problems.add(f"{name}/{key}", f"per-sample shape {dims} differs from {ref_split}'s {ref}")


def check_against_config(
    splits: dict[str, dict[str, np.ndarray]], model_cfg: ModelConfig, problems: Problems
) -> None:
    """Feature widths must equal the config's; padded lengths may be shorter, never longer."""
    name, data = next(iter(splits.items()))
    checks = (
        ("text_bert", 2, "text_len", "max"),
        ("audio", 1, "audio_len", "max"),
        ("audio", 2, "audio_dim", "eq"),
        ("vision", 1, "vision_len", "max"),
        ("vision", 2, "vision_dim", "eq"),
    )
    for key, axis, field_name, kind in checks:
        want = getattr(model_cfg, field_name)
        if key not in data:
            continue
        got = int(data[key].shape[axis])
        if kind == "eq" and got != want:
            problems.add(
                f"{name}/{key}",
                f"feature width {got} does not match model config {field_name}={want} "
                "(extract with the matching config, or train with a config that fits this file)",
            )
        elif kind == "max" and got > want:
            problems.add(
                f"{name}/{key}",
                f"padded length {got} exceeds model config {field_name}={want} "
                "(use a config with a larger maximum length)",
            )
