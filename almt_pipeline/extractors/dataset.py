"""Input discovery: what clips to extract, with their transcripts, labels and splits.

Two layouts are understood:

* an MMSA-FET dataset folder: ``label.csv`` (video_id, clip_id, text, label, mode and optionally
  label_T, label_A, label_V, annotation) next to ``Raw/<video_id>/<clip_id>.<ext>``;
* a plain folder of clips (searched recursively) or a single clip, with optional sidecar
  transcripts (``<clip>.txt`` / ``<clip>.srt``) and no labels.

Problems with single rows (a bad ``mode``, a non-numeric label, a missing clip file, a duplicate
id, a ``video_id``/``clip_id`` that is not a plain name and so could point outside ``Raw/``) do
not stop discovery: the row is returned with ``problem`` set, so the batch can report it
and go on. Problems with the whole input (no such path, a ``label.csv`` without a required
column) raise :class:`~almt_pipeline.errors.ExtractionError`.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExtractionError
from ..schema import check_split
from ..utils import one_line
from .asr import read_sidecar_transcript

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi")
ID_SEPARATOR = "$_$"
LABEL_FILE = "label.csv"
RAW_DIR = "Raw"
REQUIRED_COLUMNS = ("video_id", "clip_id", "text", "label", "mode")
UNIMODAL_COLUMNS = ("label_T", "label_A", "label_V")
MODE_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "dev": "valid",
                "validation": "valid", "test": "test"}
SKIP_DIRS = (".almt_cache",)
_SEPARATORS = ("/", "\\")  # both, whatever the platform: label.csv files travel between systems
_DRIVE = re.compile(r"^[A-Za-z]:")  # a drive letter (C:x) on Windows


@dataclass(frozen=True)
class ClipSpec:
    """One clip to extract. ``problem`` is set when the row cannot be extracted at all."""

    id: str  # "<video_id>$_$<clip_id>"
    path: Path  # the clip file (for a missing file: the expected path without extension)
    split: str  # train | valid | test
    text: str | None  # transcript, or None when speech recognition must provide it
    text_source: str | None  # "label.csv" | "sidecar" | None
    label: float  # NaN when unlabeled
    label_T: float | None = None  # noqa: N815 (MMSA column names)
    label_A: float | None = None  # noqa: N815
    label_V: float | None = None  # noqa: N815
    annotation: str = ""
    problem: str | None = None  # one-line cause when the row is unusable

    @property
    def video_id(self) -> str:
        return self.id.split(ID_SEPARATOR, 1)[0]


def discover(input_path: str | os.PathLike[str], unlabeled_split: str = "test") -> list[ClipSpec]:
    """List the clips under ``input_path`` in a deterministic order.

    A folder with a ``label.csv`` is read as an MMSA-FET dataset (rows in file order); any other
    folder is searched recursively for clips (sorted by relative path) that go to
    ``unlabeled_split`` with NaN labels; a single file is one unlabeled clip.
    """
    check_split(unlabeled_split, "the unlabeled split")
    root = Path(input_path)
    if not root.exists():
        raise ExtractionError(f"{root}: no such file or folder")
    if root.is_dir() and (root / LABEL_FILE).is_file():
        return read_label_csv(root / LABEL_FILE)
    if root.is_file() and root.name == LABEL_FILE:
        return read_label_csv(root)
    return list_plain_clips(root, unlabeled_split)


def has_unimodal_labels(specs: list[ClipSpec]) -> bool:
    return any(s.label_T is not None or s.label_A is not None or s.label_V is not None for s in specs)


# ---------------------------------------------------------------------------------------------
# MMSA-FET dataset


def read_label_csv(csv_path: str | Path) -> list[ClipSpec]:
    """Read ``label.csv`` and locate each clip under ``Raw/``; rows keep the file's order."""
    csv_path = Path(csv_path)
    raw_dir = csv_path.parent / RAW_DIR
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ExtractionError(f"{csv_path}: cannot read ({one_line(e)})") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ExtractionError(
            f"{csv_path}: missing column(s) {', '.join(missing)} "
            f"(expected {', '.join(REQUIRED_COLUMNS)}[, {', '.join(UNIMODAL_COLUMNS)}, annotation])"
        )
    if not rows:
        raise ExtractionError(f"{csv_path}: no rows")
    unimodal = [c for c in UNIMODAL_COLUMNS if c in header]

    specs: list[ClipSpec] = []
    seen: set[str] = set()
    for line_no, row in enumerate(rows, start=2):  # line 1 is the header
        specs.append(_row_to_spec(row, line_no, csv_path, raw_dir, unimodal, seen))
    n_bad = sum(s.problem is not None for s in specs)
    if n_bad:
        logger.warning("%s: %d of %d rows cannot be extracted (listed in the failures file)",
                       csv_path, n_bad, len(specs))
    return specs


def _row_to_spec(row: dict, line_no: int, csv_path: Path, raw_dir: Path, unimodal: list[str],
                 seen: set[str]) -> ClipSpec:
    def cell(name: str) -> str:
        value = row.get(name)
        return "" if value is None else str(value).strip()

    video_id, clip_id = cell("video_id"), cell("clip_id")
    spec_id = f"{video_id}{ID_SEPARATOR}{clip_id}"
    where = f"{csv_path.name} line {line_no}"
    problems: list[str] = []

    unsafe = [p for p in (_unsafe_name("video_id", video_id), _unsafe_name("clip_id", clip_id)) if p]
    if not video_id or not clip_id:
        problems.append("empty video_id or clip_id")
    elif unsafe:
        problems += unsafe
    elif spec_id in seen:
        problems.append(f"duplicate id {spec_id!r}")
    seen.add(spec_id)

    mode = cell("mode")
    split = MODE_ALIASES.get(mode.lower())
    if split is None:
        problems.append(f"mode {mode!r} is not one of train, valid, test")
        split = "test"

    label, err = _parse_float(cell("label"), required=True)
    if err:
        problems.append(f"label {err}")
    extra: dict[str, float | None] = {c: None for c in UNIMODAL_COLUMNS}
    for c in unimodal:
        value, err = _parse_float(cell(c), required=False)
        if err:
            problems.append(f"{c} {err}")
        extra[c] = value

    path = _find_clip(raw_dir, video_id, clip_id) if video_id and clip_id and not unsafe else None
    if unsafe:
        path = csv_path  # never a path built from the refused names
    elif path is None:
        expected = raw_dir / video_id / clip_id
        if video_id and clip_id:
            problems.append(
                f"clip file not found: {expected}.{{{','.join(e[1:] for e in VIDEO_EXTENSIONS)}}}"
            )
        path = expected

    text: str | None = cell("text") or None
    text_source: str | None = "label.csv" if text else None
    if text is None and not unsafe and path.is_file():
        text = read_sidecar_transcript(path)
        text_source = "sidecar" if text is not None else None

    return ClipSpec(
        id=spec_id, path=path, split=split, text=text, text_source=text_source,
        label=label if label is not None else math.nan,
        label_T=extra["label_T"], label_A=extra["label_A"], label_V=extra["label_V"],
        annotation=cell("annotation"),
        problem=f"{where}: {'; '.join(problems)}" if problems else None,
    )


def _unsafe_name(column: str, value: str) -> str | None:
    """Why ``value`` cannot name a folder or file directly under ``Raw/`` (None when it can).

    Only the names are checked: a symbolic link inside ``Raw/`` is followed like any file.
    """
    control = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"{column} {value!r} contains a control character ({control!r})"
    if value.startswith(_SEPARATORS) or _DRIVE.match(value):
        return f"{column} {value!r} is an absolute path"
    parts = re.split(r"[/\\]", value)
    if any(part in (".", "..") for part in parts):
        return f"{column} {value!r} has a '.' or '..' path part"
    if len(parts) > 1:
        return f"{column} {value!r} contains a path separator"
    return None


def _parse_float(text: str, required: bool) -> tuple[float | None, str | None]:
    if not text:
        return (None, "is empty") if required else (None, None)
    try:
        value = float(text)
    except ValueError:
        return None, f"{text!r} is not a number"
    if not math.isfinite(value):
        return None, f"{text!r} is not a finite number"
    return value, None


def _find_clip(raw_dir: Path, video_id: str, clip_id: str) -> Path | None:
    folder = raw_dir / video_id
    for ext in VIDEO_EXTENSIONS:
        for candidate in (folder / f"{clip_id}{ext}", folder / f"{clip_id}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


# ---------------------------------------------------------------------------------------------
# plain folder / single file


def list_plain_clips(root: str | Path, split: str = "test") -> list[ClipSpec]:
    """Clips under ``root`` (recursive; a file is taken as-is), sorted by relative path."""
    root = Path(root)
    if root.is_file():
        files = [root]
        base = root.parent
    else:
        base = root
        files = sorted(
            (p for p in root.rglob("*") if _is_clip(p, root)),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if not files:
            raise ExtractionError(
                f"{root}: no clips found (looked for {', '.join(VIDEO_EXTENSIONS)} files, "
                f"or a {LABEL_FILE} dataset)"
            )
    base_name = base.resolve().name or "clips"
    specs: list[ClipSpec] = []
    seen: set[str] = set()
    for path in files:
        rel_parent = path.parent.relative_to(base).parts if path.parent != base else ()
        video_id = "/".join((base_name, *rel_parent))
        spec_id = f"{video_id}{ID_SEPARATOR}{path.stem}"
        if spec_id in seen:  # a.mp4 and a.mkv side by side
            spec_id = f"{video_id}{ID_SEPARATOR}{path.name}"
        seen.add(spec_id)
        text = read_sidecar_transcript(path)
        specs.append(ClipSpec(
            id=spec_id, path=path, split=split, text=text,
            text_source="sidecar" if text is not None else None, label=math.nan,
        ))
    return specs


def _is_clip(path: Path, root: Path) -> bool:
    if path.suffix.lower() not in VIDEO_EXTENSIONS or not path.is_file():
        return False
    rel = path.relative_to(root).parts
    return not any(part.startswith(".") or part in SKIP_DIRS for part in rel)

