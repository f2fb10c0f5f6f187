"""The per-clip cache of ``almt extract``: one ``.npz`` per finished clip, so a rerun resumes.

Entries live under ``root/<settings hash>/``: changing anything that changes a clip's features
(extractor settings, text model, package version) starts a fresh folder. A clip's key includes
its path, size, modification time and transcript. Entries are written atomically and read
without pickle; a damaged entry is simply extracted again. :func:`extract_cached` writes a clip's
entry where the clip is extracted, as soon as it is finished (in the driver, a worker process or
a Ray worker), so a killed driver or worker loses no finished clip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..config import Config, config_to_dict
from ..files import atomic_write
from ..utils import package_version
from .clip import ClipExtractor, ClipFailure, ClipResult, run_guarded
from .dataset import ClipSpec

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cached arrays change meaning (2: decode_errors, audio_padded)
DEFAULT_CACHE_DIR = ".almt_cache"


def settings_hash(cfg: Config) -> str:
    """Hash of everything that changes a clip's cached (unpadded) features."""
    key = {
        "cache_format": CACHE_FORMAT,
        "version": package_version(),
        "extract": config_to_dict(cfg)["extract"],
        "text_model": cfg.model.text_model,
        "text_len": cfg.model.text_len,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class ClipCache:
    """One ``.npz`` per finished clip under ``root/<settings hash>/``; loaded without pickle."""

    def __init__(self, root: str | os.PathLike, cfg: Config):
        self.dir = Path(root) / settings_hash(cfg)

    def path_for(self, spec: ClipSpec) -> Path:
        try:
            st = spec.path.stat()
            stamp: list[int | None] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = [None, None]
        key = [spec.id, str(spec.path.resolve()), *stamp, spec.text, spec.text_source]
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
        return self.dir / f"{digest}.npz"

    def load(self, spec: ClipSpec) -> ClipResult | None:
        path = self.path_for(spec)
        if not path.is_file():
            return None
        try:
            return read_entry(path)
        except Exception as e:  # a damaged entry is simply recomputed
            logger.debug("ignoring unreadable cache entry %s (%s)", path, e)
            return None


def extract_cached(extractor: ClipExtractor, spec: ClipSpec, cache_path: Path) -> ClipResult | ClipFailure:
    """Run one clip and cache its result at once (where it runs: in the driver, a worker process
    or a Ray worker); a failure becomes a ClipFailure (:func:`~.clip.run_guarded`)."""
    outcome = run_guarded(lambda: extractor(spec.path, spec.text, spec.text_source), spec.path, spec.id)
    if isinstance(outcome, ClipResult):
        try:
            write_entry(cache_path, outcome)
        except OSError as e:
            logger.warning("could not cache %s (%s); it will be extracted again next time", spec.path, e)
    return outcome


def write_entry(path: Path, r: ClipResult) -> None:
    """Store one clip's result atomically."""
    with atomic_write(path, "wb") as f:
        np.savez(
            f, text_bert=r.text_bert, text=r.text, audio=r.audio, vision=r.vision,
            raw_text=np.array(r.raw_text), transcript_source=np.array(r.transcript_source),
            face_fraction=np.float64(r.face_fraction), duration=np.float64(r.duration),
            text_truncated=np.bool_(r.text_truncated), timings=np.array(json.dumps(r.timings)),
            decode_errors=np.int64(r.decode_errors), audio_padded=np.float64(r.audio_padded),
        )


def read_entry(path: str | os.PathLike) -> ClipResult:
    with np.load(path, allow_pickle=False) as z:
        return ClipResult(
            text_bert=z["text_bert"], text=z["text"], audio=z["audio"], vision=z["vision"],
            raw_text=str(z["raw_text"].item()),
            transcript_source=str(z["transcript_source"].item()),
            face_fraction=float(z["face_fraction"]), duration=float(z["duration"]),
            text_truncated=bool(z["text_truncated"]),
            timings=json.loads(str(z["timings"].item())),
            decode_errors=int(z["decode_errors"]), audio_padded=float(z["audio_padded"]),
        )
