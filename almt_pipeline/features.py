"""The MMSA feature-file schema: read safely, validate, write, and fake for tests.

A feature file is a pickled dict ``{"train": {...}, "valid": {...}, "test": {...}}`` whose splits
hold equal-length arrays (README, "The feature file"). Files written here add a top-level ``"meta"`` dict of
plain builtins; MMSA's own loader only indexes ``data[split][key]`` and never sees it.

Pickle runs code on load, so files are read with a restricted unpickler that can only rebuild
numpy arrays, dtypes, numpy scalars and builtin containers/scalars.
"""

from __future__ import annotations

import codecs
import importlib
import io
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import FeatureFileError, UnsafePickleError
from .utils import atomic_write, package_version

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SCHEMA_VERSION = 1
META_KEY = "meta"
PICKLE_PROTOCOL = 4
REQUIRED = (
    "id", "raw_text", "text_bert", "text", "audio", "vision",
    "audio_lengths", "vision_lengths", "regression_labels",
)
LABEL_KEY = "regression_labels"
STRING_KEYS = ("id", "raw_text", "annotations")
FEATURE_KEYS = ("text_bert", "text", "audio", "vision")
LENGTH_KEYS = {"audio_lengths": "audio", "vision_lengths": "vision"}
OPTIONAL_NUMERIC = (
    "classification_labels", "regression_labels_T", "regression_labels_A", "regression_labels_V",
)
LABEL_RANGES = {"mosi": 3.0, "sims": 1.0}  # labels lie in [-r, r]
_LABEL_SCALE_ALIASES = {"mosi": "mosi", "mosei": "mosi", "sims": "sims"}
_BERT_CLS, _BERT_SEP = 101, 102  # bert-base-uncased special token ids
_CHUNK_ELEMENTS = 1 << 24  # finite checks in slices of ~16M values to bound temporary memory

# ---------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------

_NUMPY_MAJOR = int(np.__version__.split(".")[0])
# numpy internals that plain arrays / dtypes / scalars are rebuilt with (numpy 2 spelling).
_NUMPY_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core._multiarray_umath", "_reconstruct"),
    ("numpy._core._multiarray_umath", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
}
_BUILTINS_ALLOWED = {
    "dict", "list", "set", "frozenset", "tuple", "str", "bytes", "bytearray",
    "int", "float", "complex", "bool", "slice",
}
_LATIN1 = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``codecs.encode`` in pickles: protocol <= 2 stores ``bytes`` as latin-1 text."""
    if not isinstance(obj, str) or str(encoding).lower() not in _LATIN1 or errors != "strict":
        raise pickle.UnpicklingError(f"codecs.encode called with unexpected arguments ({encoding!r})")
    return codecs.encode(obj, "latin1")


def _canonical(module: str, name: str) -> tuple[str, str]:
    """Map py2 / numpy-1.x spellings onto the names checked against the allow-list."""
    if module == "__builtin__":
        module = "builtins"
    if module == "numpy.core" or module.startswith("numpy.core."):
        module = "numpy._core" + module[len("numpy.core"):]
    return module, name


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only hands out numpy array/dtype/scalar builders and builtins."""

    def __init__(self, file, *, source: str, **kwargs):
        super().__init__(file, **kwargs)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        mod, nm = _canonical(module, name)
        if mod in ("_codecs", "codecs") and nm == "encode":
            return _latin1_encode
        if mod == "builtins" and nm in _BUILTINS_ALLOWED:
            return getattr(__import__("builtins"), nm)
        if mod == "collections" and nm == "OrderedDict":
            import collections

            return collections.OrderedDict
        if (mod, nm) in _NUMPY_ALLOWED:
            if _NUMPY_MAJOR < 2 and mod.startswith("numpy._core"):
                mod = "numpy.core" + mod[len("numpy._core"):]
            return getattr(importlib.import_module(mod), nm)
        raise UnsafePickleError(
            f"{self._source}: refused to load: the pickle asks for {module}.{name}, which a feature "
            "file never contains (possible code execution)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self._source}: refused to load: the pickle uses a persistent id, which a feature "
            "file never contains"
        )


def safe_load_pickle(path: str | os.PathLike) -> object:
    """Unpickle ``path`` allowing only numpy arrays/dtypes/scalars and builtin containers/scalars.

    Raises ``UnsafePickleError`` (before anything runs) when the stream names any other global,
    ``FeatureFileError`` when the file is missing, truncated or not a pickle.
    """
    path = Path(path)
    try:
        f = open(path, "rb")  # streamed: a multi-GB file is not held twice in memory
    except FileNotFoundError as e:
        raise FeatureFileError(f"{path}: feature file not found") from e
    except IsADirectoryError as e:
        raise FeatureFileError(f"{path}: is a directory, not a feature file") from e
    except OSError as e:
        raise FeatureFileError(f"{path}: cannot read feature file ({e.strerror or e})") from e
    with f:
        if not f.read(1):
            raise FeatureFileError(f"{path}: feature file is empty")
        return _unpickle_stream(f, path)


def _unpickle_stream(f: io.BufferedReader, path: Path) -> object:
    last_error: Exception | None = None
    # py2-era pickles store raw array bytes as py2 ``str``: numpy documents encoding="latin1".
    for encoding in ("ASCII", "latin1"):
        f.seek(0)
        try:
            return _RestrictedUnpickler(f, source=str(path), encoding=encoding).load()
        except UnsafePickleError:
            raise
        except UnicodeDecodeError as e:
            last_error = e
            continue
        except MemoryError as e:
            raise FeatureFileError(f"{path}: out of memory while loading the feature file") from e
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt/foreign file
            raise FeatureFileError(
                f"{path}: not a readable feature pickle (truncated or corrupt?): "
                f"{type(e).__name__}: {e}"
            ) from e
    raise FeatureFileError(f"{path}: not a readable feature pickle: {last_error}") from last_error


# ---------------------------------------------------------------------------------------------
# Loading + validation
# ---------------------------------------------------------------------------------------------


@dataclass
class FeatureFile:
    """A validated feature file: float32 features, int64 lengths, str ids/texts per split."""

    path: Path
    splits: dict[str, dict[str, np.ndarray]]
    meta: dict = field(default_factory=dict)
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

    def has_labels(self, split: str) -> bool:
        """True when every label of ``split`` is a finite number."""
        y = self.splits[split].get(LABEL_KEY)
        return y is not None and len(y) > 0 and bool(np.isfinite(y).all())


class _Problems:
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


def _as_array(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else np.asarray(value)


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


def _to_str_array(arr: np.ndarray) -> np.ndarray:
    """Object array of Python ``str`` (bytes decoded as UTF-8), as MMSA files store ids/texts."""
    out = np.empty(len(arr), dtype=object)
    for i, v in enumerate(arr):
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        out[i] = str(v)
    return out


def _to_float32(where: str, arr: np.ndarray, problems: _Problems) -> np.ndarray | None:
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind == "O":
        try:
            return arr.astype(np.float32)
        except (TypeError, ValueError):
            pass
    problems.add(where, f"expected numbers, found dtype {arr.dtype}")
    return None


def _resolve_scale(name: str | None) -> str | None:
    if name in (None, "", "auto"):
        return None
    scale = _LABEL_SCALE_ALIASES.get(str(name).lower())
    if scale is None:
        raise FeatureFileError(f"unknown label scale {name!r} (use mosi or sims)")
    return scale


def _validate_split(
    name: str, raw: Any, problems: _Problems, *, require_labels: bool, fix_nonfinite: bool
) -> dict[str, np.ndarray] | None:
    """Check one split's keys, lengths, shapes, dtypes and values; return normalised arrays."""
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
            out[key] = _as_array(value)
        except Exception as e:  # noqa: BLE001 - ragged lists and the like
            problems.add(f"{name}/{key}", f"not an array ({type(e).__name__}: {e})")
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
        out[key] = _to_str_array(out[key])

    expected_ndim = {"text_bert": 3, "text": 3, "audio": 3, "vision": 3}
    for key, ndim in expected_ndim.items():
        if key not in out:
            continue
        arr = out[key]
        if arr.ndim != ndim:
            problems.add(f"{name}/{key}", f"expected {ndim} dims (N, T, D), found shape {arr.shape}")
            del out[key]
            continue
        cast = _to_float32(f"{name}/{key}", arr, problems)
        if cast is None:
            del out[key]
            continue
        out[key] = cast

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
                arr = arr.astype(np.float64)
            except (TypeError, ValueError):
                problems.add(where, f"expected integers, found dtype {arr.dtype}")
                del out[key]
                continue
        if arr.dtype.kind == "f" and (not np.isfinite(arr).all() or (arr != np.round(arr)).any()):
            problems.add(where, "expected whole numbers (frame counts)")
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

    for key in (LABEL_KEY, *OPTIONAL_NUMERIC):
        if key not in out:
            continue
        arr = out[key].reshape(-1) if out[key].ndim == 2 and out[key].shape[1:] == (1,) else out[key]
        if arr.ndim != 1:
            problems.add(f"{name}/{key}", f"expected shape (N,), found {out[key].shape}")
            del out[key]
            continue
        cast = _to_float32(f"{name}/{key}", arr, problems)
        if cast is None:
            del out[key]
            continue
        out[key] = cast

    if LABEL_KEY not in out and not require_labels and n:
        out[LABEL_KEY] = np.full(n, np.nan, dtype=np.float32)  # unlabelled (prediction-only) split
    y = out.get(LABEL_KEY)
    if y is not None:
        nan, pos, neg = _nonfinite_counts(y)
        if pos or neg or (nan and require_labels):
            problems.add(f"{name}/{LABEL_KEY}", f"{_describe_nonfinite(nan, pos, neg)} labels")
    return out


def _check_consistency(splits: dict[str, dict[str, np.ndarray]], problems: _Problems) -> None:
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


def _check_against_config(
    splits: dict[str, dict[str, np.ndarray]], model_cfg: Any, problems: _Problems
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
        want = getattr(model_cfg, field_name, None)
        if key not in data or want is None:
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


def _infer_label_scale(splits: dict[str, dict[str, np.ndarray]], path: Path) -> str:
    peak = 0.0
    seen = False
    for data in splits.values():
        y = data.get(LABEL_KEY)
        if y is None:
            continue
        finite = y[np.isfinite(y)]
        if finite.size:
            seen = True
            peak = max(peak, float(np.abs(finite).max()))
    if not seen:
        logger.info("%s: no labels; assuming the MOSI/MOSEI label scale [-3, 3]", path)
        return "mosi"
    scale = "mosi" if peak > LABEL_RANGES["sims"] else "sims"
    logger.info(
        "%s: label scale inferred from the labels (max |y| = %.3g): %s; set label_scale to "
        "override", path, peak, scale,
    )
    return scale


def load_features(
    path: str | os.PathLike,
    *,
    model_cfg: Any = None,
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
    meta = obj.get(META_KEY) or {}
    if not isinstance(meta, Mapping):
        raise FeatureFileError(f"{path}: top-level '{META_KEY}' is a {type(meta).__name__}, expected a dict")
    meta = dict(meta)

    cfg_scale = None
    if model_cfg is not None and hasattr(model_cfg, "model"):  # a full Config
        cfg_scale = getattr(getattr(model_cfg, "train", None), "label_scale", None)
        model_cfg = model_cfg.model
    cfg_scale = _resolve_scale(label_scale) or _resolve_scale(cfg_scale)

    present = [k for k in obj if k != META_KEY and isinstance(k, str)]
    problems = _Problems(path)
    if splits is None:
        wanted = [s for s in SPLITS if s in obj]
        if not wanted:
            raise FeatureFileError(
                f"{path}: no train/valid/test split in the file "
                f"(top-level keys: {', '.join(map(str, present)) or 'none'})"
            )
    else:
        wanted = list(splits)
        for s in wanted:
            if s not in obj:
                problems.add(s, f"split missing (the file has: {', '.join(present) or 'nothing'})")

    loaded: dict[str, dict[str, np.ndarray]] = {}
    for s in wanted:
        if s not in obj:
            continue
        data = _validate_split(s, obj[s], problems, require_labels=require_labels, fix_nonfinite=fix_nonfinite)
        if data is not None:
            loaded[s] = data
    del obj
    _check_consistency(loaded, problems)
    if model_cfg is not None and loaded:
        _check_against_config(loaded, model_cfg, problems)

    meta_scale = meta.get("label_scale")
    try:
        meta_scale = _resolve_scale(meta_scale)
    except FeatureFileError:
        problems.add(META_KEY, f"unknown label_scale {meta_scale!r} (use mosi or sims)")
        meta_scale = None
    if meta_scale and cfg_scale and meta_scale != cfg_scale:
        logger.warning(
            "%s: the file says label_scale=%s; ignoring the configured %s", path, meta_scale, cfg_scale
        )
    scale = meta_scale or cfg_scale or _infer_label_scale(loaded, path)
    bound = LABEL_RANGES[scale]
    for s, data in loaded.items():
        y = data.get(LABEL_KEY)
        if y is None:
            continue
        finite = y[np.isfinite(y)]
        bad = int((np.abs(finite) > bound + 1e-6).sum())
        if bad:
            problems.add(
                f"{s}/{LABEL_KEY}",
                f"{bad} label(s) outside [-{bound:g}, {bound:g}] for label scale {scale} "
                f"(range found {float(finite.min()):.3g}..{float(finite.max()):.3g})",
            )
    problems.raise_if_any()
    sizes = ", ".join(f"{s} {len(d['id'])}" for s, d in loaded.items())
    logger.info("%s: loaded %s samples (label scale %s)", path, sizes, scale)
    return FeatureFile(path=path, splits=loaded, meta=meta, label_scale=scale)


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
            arr = _as_array(value)
            if key in STRING_KEYS:
                arr = _to_str_array(arr)
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
# Synthetic data
# ---------------------------------------------------------------------------------------------


def _synthetic_split(
    rng: np.random.Generator, n: int, split: str, *, text_len: int, text_dim: int,
    audio: tuple[int, int], vision: tuple[int, int], vocab: int, scale: str,
) -> dict[str, np.ndarray]:
    t_a, d_a = audio
    t_v, d_v = vision
    min_tokens = 2  # [CLS] [SEP]
    n_tok = rng.integers(min(min_tokens + 1, text_len), text_len + 1, size=n)  # real tokens incl. specials
    text_bert = np.zeros((n, 3, text_len), dtype=np.float32)  # (N, 3, L): ids, mask, segments
    text = np.zeros((n, text_len, text_dim), dtype=np.float32)  # (N, L, H)
    first_word = min(1000, max(vocab - 1, _BERT_SEP + 1))
    words: list[str] = []
    for i, k in enumerate(n_tok):
        ids = rng.integers(first_word, max(vocab, first_word + 1), size=k)
        ids[0], ids[k - 1] = _BERT_CLS, _BERT_SEP
        text_bert[i, 0, :k] = ids
        text_bert[i, 1, :k] = 1.0
        text[i, :k] = rng.standard_normal((k, text_dim), dtype=np.float32)
        words.append(" ".join(f"w{int(t)}" for t in ids[1:k - 1]))
    audio_lengths = rng.integers(1, t_a + 1, size=n)
    vision_lengths = rng.integers(1, t_v + 1, size=n)
    audio_arr = np.zeros((n, t_a, d_a), dtype=np.float32)  # (N, T_a, d_a)
    vision_arr = np.zeros((n, t_v, d_v), dtype=np.float32)  # (N, T_v, d_v)
    for i in range(n):
        audio_arr[i, :audio_lengths[i]] = rng.standard_normal((audio_lengths[i], d_a), dtype=np.float32)
        vision_arr[i, :vision_lengths[i]] = rng.standard_normal((vision_lengths[i], d_v), dtype=np.float32)
    # official COVAREP features carry a few -inf values (log of zero energy)
    holes = rng.random(audio_arr.shape) < 1e-3
    holes &= np.arange(t_a)[None, :, None] < audio_lengths[:, None, None]
    audio_arr[holes] = -np.inf
    bound = LABEL_RANGES[scale]
    step = 0.2 if scale == "sims" else 1.0 / 3.0  # SIMS: multiples of 0.2; MOSI: thirds
    labels = np.round(rng.uniform(-bound, bound, size=n) / step) * step
    labels = np.clip(labels, -bound, bound).astype(np.float32)
    annotations = np.where(labels > 0, "Positive", np.where(labels < 0, "Negative", "Neutral"))
    return {
        "id": np.array([f"{split}{i // 4:04d}$_${i % 4 + 1}" for i in range(n)], dtype=object),
        "raw_text": np.array(words, dtype=object),
        "text_bert": text_bert,
        "text": text,
        "audio": audio_arr,
        "vision": vision_arr,
        "audio_lengths": audio_lengths.astype(np.int64),
        "vision_lengths": vision_lengths.astype(np.int64),
        "regression_labels": labels,
        "annotations": annotations.astype(object),
    }


def make_synthetic(
    path: str | os.PathLike | None = None,
    n: tuple[int, int, int] = (16, 8, 8),
    text_len: int = 50,
    audio: tuple[int, int] = (375, 5),
    vision: tuple[int, int] = (500, 20),
    vocab: int = 30522,
    scale: str = "mosi",
    seed: int = 0,
    text_dim: int = 768,
) -> dict:
    """Random data shaped like an official MMSA file (defaults: CMU-MOSI unaligned_50).

    ``n``: samples per (train, valid, test); ``audio``/``vision``: (padded length, width).
    Returns ``{"train", "valid", "test", "meta"}``; writes it to ``path`` when given.
    """
    scale = _resolve_scale(scale) or "mosi"
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {
        split: _synthetic_split(
            rng, int(k), split, text_len=text_len, text_dim=text_dim, audio=tuple(audio),
            vision=tuple(vision), vocab=vocab, scale=scale,
        )
        for split, k in zip(SPLITS, n)
    }
    data[META_KEY] = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"almt-pipeline {package_version()} (synthetic)",
        "label_scale": scale,
        "lengths": {"text": int(text_len), "audio": int(audio[0]), "vision": int(vision[0])},
        "synthetic": {"seed": int(seed), "vocab": int(vocab), "text_dim": int(text_dim)},
    }
    if path is not None:
        save_features(path, {s: data[s] for s in SPLITS}, data[META_KEY])
    return data


__all__ = [
    "SPLITS", "SCHEMA_VERSION", "META_KEY", "REQUIRED", "FeatureFile", "safe_load_pickle",
    "load_features", "save_features", "make_synthetic",
]
