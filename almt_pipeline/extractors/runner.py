"""Folder of clips -> MMSA-format feature file.

:class:`ClipExtractor` turns one clip into unpadded features (text, audio, face) with the models
loaded once; :func:`extract` runs it over a dataset or a folder (in parallel when asked), caches
every finished clip so an interrupted run resumes, reports bad clips without stopping, pads or
pools each sequence to the configured lengths and writes the feature pickle.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..config import Config, config_to_dict, load_config
from ..errors import AlmtError, ConfigError, DependencyError, ExtractionError, MediaError
from ..utils import atomic_write, atomic_write_text, package_version, results_log
from .asr import ASR_SAMPLE_RATE
from .dataset import SPLITS, ClipSpec, discover, has_unimodal_labels

logger = logging.getLogger(__name__)

PREFETCH_SECONDS = 2.0  # decoded frames read ahead of the face featurizer (seconds of video)
PREFETCH_MIN_FRAMES = 4
CACHE_FORMAT = 1  # bump when the cached arrays change meaning
FAILURE_COLUMNS = ("path", "id", "error_type", "message")


# ---------------------------------------------------------------------------------------------
# one clip


@dataclass
class ClipResult:
    """Features of one clip, before padding."""

    text_bert: np.ndarray  # (3, L) float32: token ids, attention mask, segment ids
    text: np.ndarray  # (L, H) float32 hidden states
    audio: np.ndarray  # (T_a, d_a) float32
    vision: np.ndarray  # (T_v, d_v) float32
    raw_text: str
    transcript_source: str  # "label.csv" | "sidecar" | "asr"
    face_fraction: float  # share of sampled frames with a face
    duration: float  # seconds of media
    text_truncated: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    def to_npz(self, f: Any) -> None:
        np.savez(
            f, text_bert=self.text_bert, text=self.text, audio=self.audio, vision=self.vision,
            raw_text=np.array(self.raw_text), transcript_source=np.array(self.transcript_source),
            face_fraction=np.float64(self.face_fraction), duration=np.float64(self.duration),
            text_truncated=np.bool_(self.text_truncated), timings=np.array(json.dumps(self.timings)),
        )

    @classmethod
    def from_npz(cls, path: str | Path) -> ClipResult:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                text_bert=z["text_bert"], text=z["text"], audio=z["audio"], vision=z["vision"],
                raw_text=str(z["raw_text"].item()),
                transcript_source=str(z["transcript_source"].item()),
                face_fraction=float(z["face_fraction"]), duration=float(z["duration"]),
                text_truncated=bool(z["text_truncated"]),
                timings=json.loads(str(z["timings"].item())),
            )


class ClipExtractor:
    """Loads the text, audio and face models once; ``extractor(path)`` -> :class:`ClipResult`.

    The speech recogniser is loaded on first need (a clip with no transcript). Bad media raise
    :class:`MediaError` with one line naming the file and the cause.
    """

    def __init__(self, cfg: Config, device: str = "cpu", *, audio_featurizer: Any = None,
                 face_featurizer: Any = None, text_featurizer: Any = None, transcriber: Any = None,
                 threads: int | None = None):
        from .text import TextFeaturizer

        self.cfg = cfg
        self.device = str(device)
        self.threads = threads  # CPU threads for speech recognition (None: all cores)
        self.audio_featurizer = audio_featurizer or _make_audio_featurizer(cfg)
        self.face_featurizer = face_featurizer or _make_face_featurizer(cfg)
        check_feature_widths(cfg, self.audio_featurizer, self.face_featurizer)
        self.text_featurizer = text_featurizer or TextFeaturizer(
            cfg.model.text_model, cfg.model.text_len, device=self.device)
        # a Transcriber, a Future that yields one (loading in the background), or None: load on need
        self._transcriber: Any = transcriber
        self._transcriber_lock = threading.Lock()

    @property
    def transcriber(self) -> Any:
        with self._transcriber_lock:
            if isinstance(self._transcriber, Future):
                self._transcriber = self._transcriber.result()  # a loading error is raised here
            if self._transcriber is None:
                from .asr import Transcriber

                ex = self.cfg.extract
                self._transcriber = Transcriber(ex.asr_model, language=ex.language,
                                                device=_asr_device(self.device), cpu_threads=self.threads)
            return self._transcriber

    def __call__(self, clip_path: str | Path, transcript: str | None = None,
                 transcript_source: str | None = None) -> ClipResult:
        """Extract one clip. Without ``transcript``: sidecar file, else speech recognition."""
        from ..media import check_decoded_duration, iter_frames, load_audio, probe

        path = Path(clip_path)
        ex = self.cfg.extract
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        t = time.perf_counter()
        info = probe(path)  # MediaError for missing, empty or non-media files
        if not info.has_video:
            raise MediaError(f"{path}: no video stream")
        if not info.has_audio:
            raise MediaError(f"{path}: no audio stream (the model needs audio)")
        if info.duration is not None and info.duration < ex.min_duration:
            raise MediaError(_too_short(path, info.duration, ex.min_duration))
        timings["probe"] = time.perf_counter() - t

        # Video decoding starts now, in ffmpeg and a reader thread, so that it overlaps with the
        # audio and text work below; a bounded queue keeps memory flat.
        vis = ex.visual
        frames = _PrefetchedFrames(iter_frames(path, vis.fps, vis.max_side, info=info),
                                   depth=max(PREFETCH_MIN_FRAMES, int(PREFETCH_SECONDS * vis.fps)))
        try:
            t = time.perf_counter()
            sr = int(self.audio_featurizer.sample_rate)
            wave = load_audio(path, sr, info=info)  # (N,) float32 mono
            timings["audio_decode"] = time.perf_counter() - t
            decoded = len(wave) / sr
            check_decoded_duration(path, info.duration, decoded, "audio")
            duration = float(info.duration) if info.duration else decoded
            if duration < ex.min_duration:
                raise MediaError(_too_short(path, duration, ex.min_duration))

            t = time.perf_counter()
            audio = np.asarray(self.audio_featurizer(wave), dtype=np.float32)  # (T_a, d_a)
            timings["audio"] = time.perf_counter() - t

            if transcript is None:
                from .asr import read_sidecar_transcript

                transcript = read_sidecar_transcript(path)
                transcript_source = "sidecar" if transcript is not None else None
            if transcript is None:
                t = time.perf_counter()
                wave16 = wave if sr == ASR_SAMPLE_RATE else load_audio(path, ASR_SAMPLE_RATE, info=info)
                transcript = self.transcriber.transcribe(wave16).strip()
                transcript_source = "asr"
                del wave16
                timings["asr"] = time.perf_counter() - t
            del wave

            t = time.perf_counter()
            with _one_core_for_ffmpeg(self.device):
                tf = self.text_featurizer(transcript)
            timings["text"] = time.perf_counter() - t

            t = time.perf_counter()
            vf = self.face_featurizer(frames)  # frames are streamed, never all in memory
            timings["video_decode"] = frames.wait_seconds  # time spent waiting for frames
            timings["face"] = time.perf_counter() - t - frames.wait_seconds
        finally:
            frames.close()
        if frames.count == 0:
            raise MediaError(f"{path}: no video frame could be decoded")
        check_decoded_duration(path, info.duration, frames.count / vis.fps, "video")
        vision = np.asarray(vf.features, dtype=np.float32)  # (T_v, d_v)
        face_found = np.asarray(vf.face_found, dtype=bool)  # (T_v,)
        timings["total"] = time.perf_counter() - t_start

        return ClipResult(
            text_bert=np.asarray(tf.text_bert, dtype=np.float32),
            text=np.asarray(tf.hidden, dtype=np.float32),
            audio=audio, vision=vision, raw_text=transcript,
            transcript_source=transcript_source or "label.csv",
            face_fraction=float(face_found.mean()) if face_found.size else 0.0,
            duration=duration, text_truncated=bool(tf.truncated), timings=timings,
        )


@contextmanager
def _one_core_for_ffmpeg(device: str) -> Iterator[None]:
    """Run torch on one thread fewer while the video decoder works in parallel: busy-waiting
    torch threads competing with ffmpeg for a core make a small model many times slower."""
    import torch

    n = torch.get_num_threads()
    if device.startswith("cuda") or n <= 1:
        yield
        return
    torch.set_num_threads(n - 1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _PrefetchedFrames:
    """Iterates a frame stream that a background thread reads ahead into a bounded queue.

    Errors of the stream (e.g. a decoding failure) are raised by ``__next__`` in the caller's
    thread. ``close()`` stops the thread and the stream. ``count`` frames were handed out and
    ``wait_seconds`` were spent waiting for them.
    """

    _END = object()

    def __init__(self, frames: Any, depth: int):
        self._frames = frames
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self.count = 0
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._read, name="almt-frames", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            for item in self._frames:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer
            self._put(_StreamError(e))

    def __iter__(self) -> Iterator[tuple[float, np.ndarray]]:
        return self

    def __next__(self) -> tuple[float, np.ndarray]:
        if self._finished:
            raise StopIteration
        t = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - t
        if item is self._END:
            self._finished = True
            raise StopIteration
        if isinstance(item, _StreamError):
            self._finished = True
            raise item.error
        self.count += 1
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.name = _CLOSING_THREAD  # its "decoding stopped" warnings are expected now
        close = getattr(self._frames, "close", None)
        if close is not None:
            close()  # stops ffmpeg, which ends a blocked read in the thread
        self._thread.join(timeout=10)


@dataclass
class _StreamError:
    error: BaseException


_CLOSING_THREAD = "almt-frames-closing"


class _DropClosingReaderRecords(logging.Filter):
    """Drops log records of a frame reader that is being stopped on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != _CLOSING_THREAD


logging.getLogger("almt_pipeline.media").addFilter(_DropClosingReaderRecords())


def _asr_device(device: str) -> str:
    """faster-whisper takes "cpu" or "cuda" (the index is a separate option)."""
    from ..utils import resolve_device

    return resolve_device(device).type


def _too_short(path: Path, duration: float, min_duration: float) -> str:
    return f"{path}: too short ({duration:.2f} s; extract.min_duration is {min_duration:g} s)"


def _make_audio_featurizer(cfg: Config) -> Any:
    from .audio import AudioFeaturizer

    return AudioFeaturizer(cfg.extract.audio)


def _make_face_featurizer(cfg: Config) -> Any:
    from .visual import make_face_featurizer

    return make_face_featurizer(cfg.extract.visual)


def check_feature_widths(cfg: Config, audio_featurizer: Any, face_featurizer: Any) -> None:
    """The extractors' widths must equal the model config's (the config is never changed)."""
    a, v = int(audio_featurizer.dim), int(face_featurizer.dim)
    if a != cfg.model.audio_dim:
        raise ConfigError(
            f"the audio features are {a}-d ({'+'.join(cfg.extract.audio.features)}) but "
            f"model.audio_dim is {cfg.model.audio_dim}: set model.audio_dim to {a} in the config "
            f"(or change extract.audio)"
        )
    if v != cfg.model.vision_dim:
        raise ConfigError(
            f"the '{cfg.extract.visual.backend}' face features are {v}-d but model.vision_dim is "
            f"{cfg.model.vision_dim}: use a config made for this backend (e.g. --config "
            f"{cfg.extract.visual.backend if cfg.extract.visual.backend == 'pyfeat' else 'default'}) "
            f"or set model.vision_dim to {v}"
        )


# ---------------------------------------------------------------------------------------------
# padding / pooling


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


# ---------------------------------------------------------------------------------------------
# cache


def settings_hash(cfg: Config) -> str:
    """Hash of everything that changes a clip's cached (unpadded) features."""
    d = config_to_dict(cfg)
    key = {
        "cache_format": CACHE_FORMAT,
        "version": package_version(),
        "extract": d["extract"],
        "text_model": cfg.model.text_model,
        "text_len": cfg.model.text_len,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class ClipCache:
    """One ``.npz`` per finished clip under ``root/<settings hash>/``; loaded without pickle."""

    def __init__(self, root: str | Path, cfg: Config):
        self.dir = Path(root) / settings_hash(cfg)

    def path_for(self, spec: ClipSpec) -> Path:
        try:
            st = spec.path.stat()
            stamp = [st.st_size, st.st_mtime_ns]
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
            return ClipResult.from_npz(path)
        except Exception as e:  # a damaged entry is simply recomputed
            logger.debug("ignoring unreadable cache entry %s (%s)", path, e)
            return None

    @staticmethod
    def save(path: Path, result: ClipResult) -> None:
        with atomic_write(path, "wb") as f:
            result.to_npz(f)


# ---------------------------------------------------------------------------------------------
# batch


@dataclass
class ClipFailure:
    path: str
    id: str
    error_type: str
    message: str
    traceback: str = ""


@dataclass
class ExtractSummary:
    out_path: Path | None
    failures_path: Path
    total: int = 0  # clips found
    done: int = 0  # clips in the output (extracted now + from cache)
    extracted: int = 0
    cached: int = 0
    failed: int = 0
    asr_clips: int = 0  # transcripts made by speech recognition
    truncated_texts: int = 0  # transcripts longer than model.text_len tokens
    pooled_audio: int = 0  # audio sequences pooled to model.audio_len
    pooled_vision: int = 0  # vision sequences pooled to model.vision_len
    frames: int = 0  # sampled video frames (all done clips)
    face_frames: int = 0  # ... with a face
    no_face_clips: int = 0  # clips where no frame had a face
    clip_seconds: float = 0.0  # media seconds extracted in this run (not cached)
    total_seconds: float = 0.0
    split_counts: dict[str, int] = field(default_factory=dict)
    failures: list[ClipFailure] = field(default_factory=list)

    @property
    def no_face_fraction(self) -> float:
        return 1.0 - self.face_frames / self.frames if self.frames else 0.0

    @property
    def speed(self) -> float:
        """Clip seconds extracted per second of wall time."""
        return self.clip_seconds / self.total_seconds if self.total_seconds > 0 else 0.0

    def to_text(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in self.split_counts.items() if v)
        lines = [
            f"clips: {self.total} found, {self.done} done ({self.extracted} extracted, "
            f"{self.cached} from cache), {self.failed} failed",
            f"splits: {splits or 'none'}",
            f"no-face frames: {100 * self.no_face_fraction:.1f}% ({self.no_face_clips} clips "
            f"without any face)",
            f"transcripts: {self.asr_clips} by speech recognition, {self.truncated_texts} truncated",
            f"pooled to max length: {self.pooled_audio} audio, {self.pooled_vision} vision",
            f"time: {self.total_seconds:.1f} s, {self.clip_seconds:.1f} clip-seconds extracted "
            f"({self.speed:.1f} clip-s/s)",
        ]
        if self.failed:
            lines.append(f"failures listed in {self.failures_path}")
        return "\n".join(lines)


def extract(input_path: str | Path, out_path: str | Path = "features.pkl", cfg: Config | None = None,
            *, workers: int = 1, unlabeled_split: str = "test", cache_dir: str | Path | None = None,
            quiet: bool = False, device: str = "cpu") -> ExtractSummary:
    """Extract every clip under ``input_path`` into an MMSA-format pickle at ``out_path``.

    Bad clips are logged (one line each), listed in ``<out stem>.failures.csv`` and skipped.
    Finished clips are cached under ``cache_dir`` (default ``<out dir>/.almt_cache``) so a rerun
    resumes. Raises :class:`ExtractionError` when no clip could be extracted.
    """
    t0 = time.perf_counter()
    cfg = cfg if cfg is not None else load_config("default")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    out_path = Path(out_path)
    failures_path = out_path.with_name(f"{out_path.stem}.failures.csv")
    specs = discover(input_path, unlabeled_split)

    # widths are checked before any clip is touched
    audio_fz, face_fz = _make_audio_featurizer(cfg), _make_face_featurizer(cfg)
    check_feature_widths(cfg, audio_fz, face_fz)
    feature_names = {"audio": list(audio_fz.feature_names), "vision": list(face_fz.feature_names)}

    cache = ClipCache(cache_dir if cache_dir is not None else out_path.parent / ".almt_cache", cfg)
    summary = ExtractSummary(out_path=None, failures_path=failures_path, total=len(specs))
    results: list[ClipResult | None] = [None] * len(specs)
    failures: dict[int, ClipFailure] = {}
    todo: list[int] = []
    for i, spec in enumerate(specs):
        if spec.problem is not None:
            failures[i] = ClipFailure(str(spec.path), spec.id, "InvalidRow", spec.problem)
            _log_failure(failures[i])
        elif (cached := cache.load(spec)) is not None:
            results[i] = cached
            summary.cached += 1
        else:
            todo.append(i)
    if summary.cached:
        logger.info("%d of %d clips already extracted (cache %s)", summary.cached, len(specs), cache.dir)

    def finish(i: int, outcome: ClipResult | ClipFailure) -> None:
        if isinstance(outcome, ClipFailure):
            failures[i] = outcome
            _log_failure(outcome)
        else:
            results[i] = outcome
            summary.extracted += 1
            summary.clip_seconds += outcome.duration

    redirect = nullcontext()
    if not quiet:
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()
    try:
        with redirect:
            if todo and workers == 1:
                _run_serial(cfg, device, specs, todo, cache, finish, quiet, audio_fz, face_fz)
            elif todo:
                _warm_up(audio_fz)
                del audio_fz, face_fz
                _run_parallel(cfg, device, specs, todo, cache, finish, quiet, workers)
    except KeyboardInterrupt:
        n_done = sum(s.problem is None and cache.path_for(s).is_file() for s in specs)
        logger.warning(
            "interrupted: %d of %d clips are finished and cached in %s; run the same command "
            "again to resume", n_done, len(specs), cache.dir)
        raise

    ordered_failures = [failures[i] for i in sorted(failures)]
    _write_failures(failures_path, ordered_failures)
    summary.failures = ordered_failures
    summary.failed = len(ordered_failures)
    ok = [i for i, r in enumerate(results) if r is not None]
    summary.done = len(ok)
    if not ok:
        raise ExtractionError(
            f"{input_path}: all {len(specs)} clips failed, no feature file written "
            f"(causes in {failures_path})"
        )

    splits, meta, stats = _assemble(cfg, specs, results, feature_names)
    for k, v in stats.items():
        setattr(summary, k, v)
    from ..features import save_features

    save_features(out_path, splits, meta)
    summary.out_path = out_path
    summary.total_seconds = time.perf_counter() - t0
    results_log.info("%s", summary.to_text())
    return summary


def _log_failure(f: ClipFailure) -> None:
    line = f.message if f.message.startswith(f.path) else f"{f.path}: {f.message}"
    logger.warning("%s", line)
    if f.traceback:
        logger.debug("%s", f.traceback)


def _extract_one(extractor: ClipExtractor, spec: ClipSpec, cache_path: Path) -> ClipResult | ClipFailure:
    """Run one clip; every exception becomes a ClipFailure (KeyboardInterrupt passes through)."""
    try:
        result = extractor(spec.path, spec.text, spec.text_source)
    except DependencyError:
        raise  # a missing package or model fails every clip: stop the batch with one message
    except AlmtError as e:
        return ClipFailure(str(spec.path), spec.id, type(e).__name__, _one_line(e))
    except Exception as e:
        return ClipFailure(
            str(spec.path), spec.id, type(e).__name__,
            f"{spec.path}: unexpected {type(e).__name__}: {_one_line(e)}",
            traceback.format_exc(),
        )
    try:
        ClipCache.save(cache_path, result)
    except OSError as e:
        logger.warning("could not cache %s (%s); it will be extracted again next time", spec.path, e)
    return result


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _progress(total: int, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="clip", desc="extract", disable=quiet, dynamic_ncols=True)


def _run_serial(cfg: Config, device: str, specs: list[ClipSpec], todo: list[int], cache: ClipCache,
                finish: Any, quiet: bool, audio_fz: Any, face_fz: Any) -> None:
    extractor = ClipExtractor(cfg, device, audio_featurizer=audio_fz, face_featurizer=face_fz)
    with _progress(len(todo), quiet) as bar:
        for i in todo:
            finish(i, _extract_one(extractor, specs[i], cache.path_for(specs[i])))
            bar.update(1)


# worker-process state (one ClipExtractor per process, built by the initializer)
_WORKER: dict[str, Any] = {}


def _init_worker(cfg: Config, device: str, threads: int, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    logging.basicConfig(level=max(log_level, logging.ERROR))
    try:
        import torch

        torch.set_num_threads(threads)
        _WORKER["extractor"] = ClipExtractor(cfg, device, threads=threads)
    except BaseException as e:  # reported with the first clip instead of a broken pool
        _WORKER["error"] = e


def _worker_extract(spec: ClipSpec, cache_path: Path) -> ClipResult | ClipFailure:
    if "error" in _WORKER:
        raise _WORKER["error"]
    return _extract_one(_WORKER["extractor"], spec, cache_path)


def _warm_up(audio_featurizer: Any) -> None:
    """Compile/load librosa's numba kernels here once, before the workers start, so they find a
    complete on-disk cache instead of all compiling at the same time."""
    warm_up = getattr(audio_featurizer, "warm_up", None)
    if warm_up is not None:
        warm_up()


def _run_parallel(cfg: Config, device: str, specs: list[ClipSpec], todo: list[int],
                  cache: ClipCache, finish: Any, quiet: bool, workers: int) -> None:
    workers = min(workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    log_level = logging.getLogger().getEffectiveLevel()
    executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(cfg, device, threads, log_level))
    try:
        with _progress(len(todo), quiet) as bar:
            futures = {executor.submit(_worker_extract, specs[i], cache.path_for(specs[i])): i
                       for i in todo}
            for fut in as_completed(futures):
                try:
                    outcome = fut.result()
                except AlmtError:
                    raise
                except BrokenProcessPool as e:
                    raise ExtractionError(f"a worker process died ({e}); rerun to resume") from e
                except Exception as e:
                    raise ExtractionError(
                        f"a worker process could not start: {type(e).__name__}: {_one_line(e)}"
                    ) from e
                finish(futures[fut], outcome)
                bar.update(1)
    except BaseException:
        # Stop now: finished clips are already cached (atomically) by the workers; waiting for a
        # graceful pool shutdown after Ctrl-C can hang, so the workers are terminated.
        _terminate_workers(executor)
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


def _terminate_workers(executor: ProcessPoolExecutor) -> None:
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# output


def _assemble(cfg: Config, specs: list[ClipSpec], results: list[ClipResult | None],
              feature_names: dict[str, list[str]]) -> tuple[dict, dict, dict]:
    from ..features import SCHEMA_VERSION

    m = cfg.model
    first = next(r for r in results if r is not None)
    text_dim = int(first.text.shape[1])
    unimodal = has_unimodal_labels(specs)
    stats = {"asr_clips": 0, "truncated_texts": 0, "pooled_audio": 0, "pooled_vision": 0,
             "frames": 0, "face_frames": 0, "no_face_clips": 0}
    splits: dict[str, dict[str, np.ndarray]] = {}
    sources: dict[str, list[str]] = {}
    transcript_sources: dict[str, list[str]] = {}
    face_fraction: dict[str, list[float]] = {}
    for split in SPLITS:
        rows = [i for i, r in enumerate(results) if r is not None and specs[i].split == split]
        n = len(rows)
        if n == 0:  # an empty split is left out (readers reject 0-sample splits)
            continue
        d_a, d_v = m.audio_dim, m.vision_dim
        arr = {
            "text_bert": np.zeros((n, 3, m.text_len), np.float32),  # (N, 3, L)
            "text": np.zeros((n, m.text_len, text_dim), np.float32),  # (N, L, H)
            "audio": np.zeros((n, m.audio_len, d_a), np.float32),  # (N, T_a, d_a)
            "vision": np.zeros((n, m.vision_len, d_v), np.float32),  # (N, T_v, d_v)
            "audio_lengths": np.zeros(n, np.int64),
            "vision_lengths": np.zeros(n, np.int64),
        }
        done = [results[i] for i in rows]
        for j, r in enumerate(done):
            assert r is not None
            arr["text_bert"][j] = r.text_bert
            arr["text"][j] = r.text
            arr["audio"][j], arr["audio_lengths"][j] = fit_length(r.audio, m.audio_len)
            arr["vision"][j], arr["vision_lengths"][j] = fit_length(r.vision, m.vision_len)
            stats["pooled_audio"] += r.audio.shape[0] > m.audio_len
            stats["pooled_vision"] += r.vision.shape[0] > m.vision_len
            stats["asr_clips"] += r.transcript_source == "asr"
            stats["truncated_texts"] += r.text_truncated
            frames = r.vision.shape[0]
            stats["frames"] += frames
            stats["face_frames"] += int(round(r.face_fraction * frames))
            stats["no_face_clips"] += r.face_fraction == 0.0
        arr["id"] = np.array([specs[i].id for i in rows], dtype=object)
        arr["raw_text"] = np.array([r.raw_text for r in done], dtype=object)
        arr["regression_labels"] = np.array([specs[i].label for i in rows], np.float32).reshape(n)
        arr["annotations"] = np.array([specs[i].annotation for i in rows], dtype=object)
        if unimodal:
            for mod in ("T", "A", "V"):
                values = [getattr(specs[i], f"label_{mod}") for i in rows]
                arr[f"regression_labels_{mod}"] = np.array(
                    [math.nan if v is None else v for v in values], np.float32).reshape(n)
        splits[split] = arr
        sources[split] = [str(specs[i].path) for i in rows]
        transcript_sources[split] = [r.transcript_source for r in done]
        face_fraction[split] = [round(r.face_fraction, 4) for r in done]

    meta = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"almt-pipeline {package_version()}",
        "text_model": m.text_model,
        "text_dim": text_dim,
        "label_scale": _label_scale(cfg, specs),
        "extract": config_to_dict(cfg)["extract"],
        "feature_names": feature_names,
        "lengths": {"text": m.text_len, "audio": m.audio_len, "vision": m.vision_len},
        "sources": sources,
        "transcript_sources": transcript_sources,
        "face_fraction": face_fraction,
    }
    stats["split_counts"] = {s: len(v) for s, v in sources.items()}
    return splits, meta, stats


def _label_scale(cfg: Config, specs: list[ClipSpec]) -> str:
    """The config's choice, else "sims" when every label lies in [-1, 1], else "mosi"."""
    if cfg.train.label_scale != "auto":
        return cfg.train.label_scale
    labels = np.array([s.label for s in specs if s.problem is None], dtype=np.float64)
    labels = labels[np.isfinite(labels)]
    if labels.size and np.abs(labels).max() <= 1.0:
        return "sims"
    return "mosi"


def _write_failures(path: Path, failures: list[ClipFailure]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FAILURE_COLUMNS)
    for f in failures:
        writer.writerow([f.path, f.id, f.error_type, f.message])
    atomic_write_text(path, buf.getvalue())
