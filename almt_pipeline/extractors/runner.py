"""Folder of clips -> MMSA-format feature file: the batch driver of ``almt extract``.

:func:`extract` discovers the clips (:mod:`.dataset`), takes finished ones from the per-clip
cache (:mod:`.cache`), runs :class:`~.clip.ClipExtractor` on the rest (in worker processes when
asked), reports bad clips without stopping, and writes the feature file (arrays laid out by
:func:`~almt_pipeline.features.assemble_split`) and the failures CSV.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..config import Config, config_to_dict, load_config
from ..errors import AlmtError, ConfigError, ExtractionError
from ..features import assemble_split, save_features
from ..metrics import canonical_scale, infer_label_scale
from ..schema import SCHEMA_VERSION, SPLITS
from ..utils import atomic_write_csv, one_line, package_version, results_log
from .cache import DEFAULT_CACHE_DIR, ClipCache, write_entry
from .clip import (
    AudioFeaturizerLike,
    ClipExtractor,
    ClipFailure,
    ClipResult,
    check_feature_widths,
    make_audio_featurizer,
    run_guarded,
)
from .dataset import ClipSpec, discover, has_unimodal_labels
from .faces import make_face_featurizer

logger = logging.getLogger(__name__)

FAILURE_COLUMNS = ("path", "id", "error_type", "message")
Outcome = ClipResult | ClipFailure


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


def extract(input_path: str | os.PathLike, out_path: str | os.PathLike = "features.pkl", cfg: Config | None = None,
            *, workers: int = 1, unlabeled_split: str = "test", cache_dir: str | os.PathLike | None = None,
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
    audio_fz, face_fz = make_audio_featurizer(cfg), make_face_featurizer(cfg.extract.visual)
    check_feature_widths(cfg, audio_fz, face_fz)
    feature_names = {"audio": list(audio_fz.feature_names), "vision": list(face_fz.feature_names)}

    cache = ClipCache(cache_dir if cache_dir is not None else out_path.parent / DEFAULT_CACHE_DIR, cfg)
    summary = ExtractSummary(out_path=None, failures_path=failures_path, total=len(specs))
    outcomes: dict[int, Outcome] = {}
    todo: list[int] = []
    for i, spec in enumerate(specs):
        if spec.problem is not None:
            failure = ClipFailure(str(spec.path), spec.id, "InvalidRow", spec.problem)
            outcomes[i] = failure
            _log_failure(failure)
        elif (cached := cache.load(spec)) is not None:
            outcomes[i] = cached
            summary.cached += 1
        else:
            todo.append(i)
    if summary.cached:
        logger.info("%d of %d clips already extracted (cache %s)", summary.cached, len(specs), cache.dir)

    def finish(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome
        if isinstance(outcome, ClipFailure):
            _log_failure(outcome)
        else:
            summary.extracted += 1
            summary.clip_seconds += outcome.duration

    extractor = None
    if todo and workers == 1:
        extractor = ClipExtractor(cfg, device, audio_featurizer=audio_fz, face_featurizer=face_fz)
    elif todo:
        _warm_up(audio_fz)
    del audio_fz, face_fz  # worker processes load their own models
    _run_batch(cfg, device, specs, todo, cache, finish, quiet, workers, extractor)
    _write_output(cfg, specs, outcomes, feature_names, summary, input_path, out_path)
    summary.total_seconds = time.perf_counter() - t0
    results_log.info("%s", summary.to_text())
    return summary


def _run_batch(cfg: Config, device: str, specs: list[ClipSpec], todo: list[int], cache: ClipCache,
               finish: Callable[[int, Outcome], None], quiet: bool, workers: int,
               extractor: ClipExtractor | None) -> None:
    """Extract the clips ``todo`` with ``extractor`` in this process, or (None) in ``workers``
    processes that load their own models."""
    redirect: AbstractContextManager[Any] = nullcontext() if quiet else logging_redirect_tqdm()
    try:
        with redirect:
            if extractor is not None:
                with _progress(len(todo), quiet) as bar:
                    for i in todo:
                        finish(i, _extract_one(extractor, specs[i], cache.path_for(specs[i])))
                        bar.update(1)
            elif todo:
                _run_parallel(cfg, device, specs, todo, cache, finish, quiet, workers)
    except KeyboardInterrupt:
        n_done = sum(s.problem is None and cache.path_for(s).is_file() for s in specs)
        logger.warning(
            "interrupted: %d of %d clips are finished and cached in %s; run the same command "
            "again to resume", n_done, len(specs), cache.dir)
        raise


def _write_output(cfg: Config, specs: list[ClipSpec], outcomes: dict[int, Outcome],
                  feature_names: dict[str, list[str]], summary: ExtractSummary, input_path: str | os.PathLike,
                  out_path: Path) -> None:
    """The failures CSV (always) and the feature file (when any clip succeeded)."""
    failures = [o for _, o in sorted(outcomes.items()) if isinstance(o, ClipFailure)]
    atomic_write_csv(summary.failures_path, FAILURE_COLUMNS,
                     ([f.path, f.id, f.error_type, f.message] for f in failures))
    summary.failures = failures
    summary.failed = len(failures)
    done = {i: o for i, o in outcomes.items() if isinstance(o, ClipResult)}
    summary.done = len(done)
    if not done:
        raise ExtractionError(
            f"{input_path}: all {len(specs)} clips failed, no feature file written "
            f"(causes in {summary.failures_path})"
        )
    splits, meta = _assemble(cfg, specs, done, feature_names, summary)
    save_features(out_path, splits, meta)
    summary.out_path = out_path


def _log_failure(f: ClipFailure) -> None:
    line = f.message if f.message.startswith(f.path) else f"{f.path}: {f.message}"
    logger.warning("%s", line)
    if f.traceback:
        logger.debug("%s", f.traceback)


def _extract_one(extractor: ClipExtractor, spec: ClipSpec, cache_path: Path) -> Outcome:
    """Run one clip and cache its result; a failure becomes a ClipFailure."""
    outcome = run_guarded(lambda: extractor(spec.path, spec.text, spec.text_source), spec.path, spec.id)
    if isinstance(outcome, ClipResult):
        try:
            write_entry(cache_path, outcome)
        except OSError as e:
            logger.warning("could not cache %s (%s); it will be extracted again next time", spec.path, e)
    return outcome


def _progress(total: int, quiet: bool) -> tqdm:
    return tqdm(total=total, unit="clip", desc="extract", disable=quiet, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# worker processes


# worker-process state (one ClipExtractor per process, built by the initializer)
_WORKER: dict[str, Any] = {}


def _init_worker(cfg: Config, device: str, threads: int, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    logging.basicConfig(level=max(log_level, logging.ERROR))
    try:
        torch.set_num_threads(threads)
        _WORKER["extractor"] = ClipExtractor(cfg, device, threads=threads)
    except BaseException as e:  # reported with the first clip instead of a broken pool
        _WORKER["error"] = e


def _worker_extract(spec: ClipSpec, cache_path: Path) -> Outcome:
    if "error" in _WORKER:
        raise _WORKER["error"]
    return _extract_one(_WORKER["extractor"], spec, cache_path)


def _warm_up(audio_featurizer: AudioFeaturizerLike) -> None:
    """Compile/load librosa's numba kernels here once, before the workers start, so they find a
    complete on-disk cache instead of all compiling at the same time."""
    warm_up = getattr(audio_featurizer, "warm_up", None)
    if warm_up is not None:
        warm_up()


def _run_parallel(cfg: Config, device: str, specs: list[ClipSpec], todo: list[int], cache: ClipCache,
                  finish: Callable[[int, Outcome], None], quiet: bool, workers: int) -> None:
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
                    raise ExtractionError(f"a worker process died ({one_line(e)}); rerun to resume") from e
                except Exception as e:
                    raise ExtractionError(
                        f"a worker process could not start: {type(e).__name__}: {one_line(e)}"
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


def _assemble(cfg: Config, specs: list[ClipSpec], done: dict[int, ClipResult],
              feature_names: dict[str, list[str]], summary: ExtractSummary) -> tuple[dict[str, Any], dict[str, Any]]:
    """The splits' arrays and the file's meta (settings, names, per-clip provenance)."""
    m = cfg.model
    unimodal = has_unimodal_labels(specs)
    splits: dict[str, Any] = {}
    sources: dict[str, list[str]] = {}
    transcript_sources: dict[str, list[str]] = {}
    face_fraction: dict[str, list[float]] = {}
    for split in SPLITS:
        rows = [(specs[i], r) for i, r in sorted(done.items()) if specs[i].split == split]
        if not rows:  # an empty split is left out (readers reject 0-sample splits)
            continue
        splits[split] = assemble_split(rows, m, unimodal)
        sources[split] = [str(spec.path) for spec, _ in rows]
        transcript_sources[split] = [r.transcript_source for _, r in rows]
        face_fraction[split] = [round(r.face_fraction, 4) for _, r in rows]
    _count(summary, list(done.values()), m.audio_len, m.vision_len)
    summary.split_counts = {s: len(v) for s, v in sources.items()}
    first = next(iter(done.values()))
    meta = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"almt-pipeline {package_version()}",
        "text_model": m.text_model,
        "text_dim": int(first.text.shape[1]),
        "label_scale": _label_scale(cfg, specs),
        "extract": config_to_dict(cfg)["extract"],
        "feature_names": feature_names,
        "lengths": {"text": m.text_len, "audio": m.audio_len, "vision": m.vision_len},
        "sources": sources,
        "transcript_sources": transcript_sources,
        "face_fraction": face_fraction,
    }
    return splits, meta


def _count(summary: ExtractSummary, results: Sequence[ClipResult], audio_len: int, vision_len: int) -> None:
    for r in results:
        summary.pooled_audio += r.audio.shape[0] > audio_len
        summary.pooled_vision += r.vision.shape[0] > vision_len
        summary.asr_clips += r.transcript_source == "asr"
        summary.truncated_texts += r.text_truncated
        frames = r.vision.shape[0]
        summary.frames += frames
        summary.face_frames += int(round(r.face_fraction * frames))
        summary.no_face_clips += r.face_fraction == 0.0


def _label_scale(cfg: Config, specs: list[ClipSpec]) -> str:
    """The config's choice, else inferred from the labels (see metrics.infer_label_scale)."""
    if cfg.train.label_scale != "auto":
        return canonical_scale(cfg.train.label_scale)
    return infer_label_scale(np.array([s.label for s in specs if s.problem is None], dtype=np.float64))
