"""Folder of clips -> MMSA-format feature file: the batch driver of ``almt extract``.

:func:`extract` discovers the clips (:mod:`.dataset`), takes finished ones from the per-clip
cache (:mod:`.cache`), runs :class:`~.clip.ClipExtractor` on the rest (in worker processes, or on
Ray workers with :mod:`.ray_engine`, when asked), reports bad clips without stopping, and writes
the feature file (arrays laid out by :func:`~almt_pipeline.features.assemble_split`) and the
failures CSV.

Output locations and labels are checked before the first clip; workers end with the parent even
when it is killed; SIGTERM stops like Ctrl-C; leftovers of interrupted writes are removed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..config import Config, config_to_dict, load_config
from ..errors import AlmtError, ConfigError, ExtractionError
from ..features import assemble_split, save_features
from ..files import atomic_write_csv, check_writable, remove_stale_temp_files
from ..metrics import LABEL_RANGES, canonical_scale, infer_label_scale, outside_label_range
from ..processes import exit_with_parent, sigterm_as_interrupt
from ..schema import SCHEMA_VERSION, SPLITS
from ..utils import one_line, package_version, results_log
from . import ray_engine
from .cache import DEFAULT_CACHE_DIR, ClipCache, extract_cached
from .clip import (
    AudioFeaturizerLike,
    ClipExtractor,
    ClipFailure,
    ClipResult,
    check_feature_widths,
    make_audio_featurizer,
)
from .dataset import ClipSpec, discover, has_unimodal_labels
from .faces import make_face_featurizer
from .summary import ExtractSummary

logger = logging.getLogger(__name__)

FAILURE_COLUMNS = ("path", "id", "error_type", "message")
ENGINES = ("local", "ray")
Outcome = ClipResult | ClipFailure


def extract(input_path: str | os.PathLike, out_path: str | os.PathLike = "features.pkl", cfg: Config | None = None,
            *, workers: int | None = None, unlabeled_split: str = "test",
            cache_dir: str | os.PathLike | None = None, quiet: bool = False, device: str = "cpu",
            engine: str = "local", ray_address: str | None = None) -> ExtractSummary:
    """Extract every clip under ``input_path`` into an MMSA-format pickle at ``out_path``.

    Bad clips (and rows whose label lies outside the label scale) are logged, one line each,
    listed in ``<out stem>.failures.csv`` and skipped. Finished clips are cached under
    ``cache_dir`` (default ``<out dir>/.almt_cache``) so a rerun resumes.

    ``engine="local"`` runs the clips in this process, or in ``workers`` (default 1) worker
    processes; ``engine="ray"`` runs them on ``workers`` Ray workers (default: one per CPU of the
    cluster) that each load the models once (:mod:`.ray_engine`), on the Ray cluster at
    ``ray_address`` ("auto" or HOST:PORT; None starts a local Ray with ``workers`` CPUs).

    An output location that cannot be written raises ``OSError`` naming it before any clip is
    extracted; a bad engine or Ray address, a Ray head that does not answer and a missing ``ray``
    package are errors before any clip too (:class:`AlmtError`). Raises
    :class:`ExtractionError` when no clip could be extracted, and ``KeyboardInterrupt`` on Ctrl-C
    or, when called in the main thread, SIGTERM (so ``almt extract`` exits with 130 for both).
    """
    with sigterm_as_interrupt():
        return _extract(input_path, Path(out_path), cfg if cfg is not None else load_config("default"),
                        workers, unlabeled_split, cache_dir, quiet, device, engine, ray_address)


def _extract(input_path: str | os.PathLike, out_path: Path, cfg: Config, workers: int | None, unlabeled_split: str,
             cache_dir: str | os.PathLike | None, quiet: bool, device: str, engine: str,
             ray_address: str | None) -> ExtractSummary:
    t0 = time.perf_counter()
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if engine not in ENGINES:
        raise ConfigError(f"engine must be {' or '.join(ENGINES)}, got {engine!r}")
    if engine == "ray":
        ray_engine.check(ray_address)  # a bad or dead address, or a missing ray, fails before any clip
    elif ray_address is not None:
        raise ConfigError(f"a Ray address ({ray_address}) is only used with the ray engine")
    failures_path = out_path.with_name(f"{out_path.stem}.failures.csv")
    specs = discover(input_path, unlabeled_split)

    # widths, output locations and labels are checked before any clip is touched
    audio_fz, face_fz = make_audio_featurizer(cfg), make_face_featurizer(cfg.extract.visual)
    check_feature_widths(cfg, audio_fz, face_fz)
    feature_names = {"audio": list(audio_fz.feature_names), "vision": list(face_fz.feature_names)}
    cache = ClipCache(cache_dir if cache_dir is not None else out_path.parent / DEFAULT_CACHE_DIR, cfg)
    _prepare_output_locations(out_path, failures_path, cache.dir)
    label_scale = _label_scale(cfg, specs)
    specs = _flag_labels_out_of_range(specs, label_scale, inferred=cfg.train.label_scale == "auto")

    summary = ExtractSummary(out_path=None, failures_path=failures_path, total=len(specs),
                             text_len=cfg.model.text_len)
    outcomes, todo = _sort_out(specs, cache, summary)

    def finish(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome
        if isinstance(outcome, ClipFailure):
            _log_failure(outcome)
        else:
            summary.extracted += 1
            summary.clip_seconds += outcome.duration
            summary.clip_done(outcome.started or time.time(), time.time())

    try:
        extractor = None
        if todo and engine == "local" and (workers or 1) == 1:
            extractor = ClipExtractor(cfg, device, audio_featurizer=audio_fz, face_featurizer=face_fz)
        if todo:  # part of loading the models: the first clip's timing does not pay for it
            _warm_up(audio_fz)
        del audio_fz, face_fz  # worker processes load their own models
        _run_batch(cfg, device, specs, todo, cache, finish, quiet, workers, extractor, engine, ray_address)
        _write_output(cfg, specs, outcomes, feature_names, summary, input_path, out_path, label_scale)
    except KeyboardInterrupt as e:
        n_done = sum(s.problem is None and cache.path_for(s).is_file() for s in specs)
        logger.warning(
            "%s: %d of %d clips are finished and cached in %s; run the same command again to resume",
            str(e) or "interrupted", n_done, len(specs), cache.dir)
        raise
    summary.total_seconds = time.perf_counter() - t0
    results_log.info("%s", summary.to_text())
    return summary


def _sort_out(specs: list[ClipSpec], cache: ClipCache, summary: ExtractSummary) -> tuple[dict[int, Outcome], list[int]]:
    """Unusable rows (reported now) and cached clips, by index; the indices left to extract."""
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
    return outcomes, todo


def _prepare_output_locations(out_path: Path, failures_path: Path, cache_dir: Path) -> None:
    """Fail now when the feature file, the failures file or the cache cannot be written there;
    remove the temporary files that writes interrupted in an earlier run left there."""
    check_writable(out_path)
    check_writable(failures_path)
    check_writable(cache_dir, folder=True)
    removed = (remove_stale_temp_files(out_path.parent, out_path.name)
               + remove_stale_temp_files(failures_path.parent, failures_path.name)
               + remove_stale_temp_files(cache_dir))
    if removed:
        logger.info("removed %d temporary file(s) left by interrupted writes", removed)


def _flag_labels_out_of_range(specs: list[ClipSpec], scale: str, inferred: bool) -> list[ClipSpec]:
    """Rows whose label lies outside ``[-r, r]`` of the label scale become unusable rows (so they
    are reported now, and ``train`` does not reject the whole file later)."""
    bound = LABEL_RANGES[scale]
    how = "inferred from the labels" if inferred else "train.label_scale"
    flagged = []
    for s in specs:
        if s.problem is None and outside_label_range(np.array([s.label]), scale)[0]:
            s = replace(s, problem=f"{s.id}: label {s.label:g} is outside [-{bound:g}, {bound:g}], "
                                   f"the range of label scale {scale} ({how})")
        flagged.append(s)
    return flagged


def _run_batch(cfg: Config, device: str, specs: list[ClipSpec], todo: list[int], cache: ClipCache,
               finish: Callable[[int, Outcome], None], quiet: bool, workers: int | None,
               extractor: ClipExtractor | None, engine: str, ray_address: str | None) -> None:
    """Extract the clips ``todo`` with ``extractor`` in this process, or (None) in ``workers``
    processes, or on Ray workers, that load their own models."""
    redirect: AbstractContextManager[Any] = nullcontext() if quiet else logging_redirect_tqdm()
    with redirect:
        if extractor is not None:
            with _progress(len(todo), quiet) as bar:
                for n, i in enumerate(todo):
                    if n + 1 < len(todo):  # ffmpeg opens the next clip while this one is computed
                        extractor.look_ahead(specs[todo[n + 1]].path)
                    finish(i, extract_cached(extractor, specs[i], cache.path_for(specs[i])))
                    bar.update(1)
        elif todo and engine == "ray":
            _run_on_ray(cfg, device, specs, todo, cache, finish, quiet, workers, ray_address)
        elif todo:
            _run_parallel(cfg, device, specs, todo, cache, finish, quiet, workers or 1)


def _run_on_ray(cfg: Config, device: str, specs: list[ClipSpec], todo: list[int], cache: ClipCache,
                finish: Callable[[int, Outcome], None], quiet: bool, workers: int | None,
                ray_address: str | None) -> None:
    """The clips ``todo`` on Ray workers (:mod:`.ray_engine`); the bar starts once Ray is up."""
    clips = {i: (specs[i], cache.path_for(specs[i])) for i in todo}
    with ray_engine.ray_session(ray_address, workers) as ray, _progress(len(todo), quiet) as bar:
        def finish_one(i: int, outcome: Outcome) -> None:
            finish(i, outcome)
            bar.update(1)

        ray_engine.run_clips(ray, cfg, device, clips, finish_one, workers)


def _write_output(cfg: Config, specs: list[ClipSpec], outcomes: dict[int, Outcome],
                  feature_names: dict[str, list[str]], summary: ExtractSummary, input_path: str | os.PathLike,
                  out_path: Path, label_scale: str) -> None:
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
    splits, meta = _assemble(cfg, specs, done, feature_names, summary, label_scale)
    save_features(out_path, splits, meta)
    summary.out_path = out_path


def _log_failure(f: ClipFailure) -> None:
    line = f.message if f.message.startswith(f.path) else f"{f.path}: {f.message}"
    logger.warning("%s", line)
    if f.traceback:
        logger.debug("%s", f.traceback)


def _progress(total: int, quiet: bool) -> tqdm:
    return tqdm(total=total, unit="clip", desc="extract", disable=quiet, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# worker processes


# worker-process state (one ClipExtractor per process, built by the initializer)
_WORKER: dict[str, Any] = {}


def _init_worker(cfg: Config, device: str, threads: int, log_level: int, parent_pid: int) -> None:
    exit_with_parent(parent_pid)  # a killed parent must not leave workers holding their models
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    logging.basicConfig(level=max(log_level, logging.ERROR))
    # tqdm's default lock holds a named semaphore that a terminated worker would leave behind
    # (multiprocessing then warns of leaked semaphores): progress bars here need a thread lock only.
    tqdm.set_lock(threading.RLock())
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # as the CLI does: N workers' bars would mix with ours
        torch.set_num_threads(threads)
        _WORKER["extractor"] = ClipExtractor(cfg, device, threads=threads)
    except BaseException as e:  # reported with the first clip instead of a broken pool
        _WORKER["error"] = e


def _worker_extract(spec: ClipSpec, cache_path: Path) -> Outcome:
    if "error" in _WORKER:
        raise _WORKER["error"]
    return extract_cached(_WORKER["extractor"], spec, cache_path)


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
    # The workers are started by submit() in this thread, which outlives them: the kernel's
    # parent-death signal (see exit_with_parent) follows the starting thread, not the process.
    executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(cfg, device, threads, log_level, os.getpid()))
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
        # graceful pool shutdown after Ctrl-C (or SIGTERM) can hang, so the workers are terminated.
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


def _assemble(cfg: Config, specs: list[ClipSpec], done: dict[int, ClipResult], feature_names: dict[str, list[str]],
              summary: ExtractSummary, label_scale: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The splits' arrays and the file's meta (settings, names, per-clip provenance)."""
    m = cfg.model
    unimodal = has_unimodal_labels(specs)
    splits: dict[str, Any] = {}
    sources: dict[str, list[str]] = {}
    transcript_sources: dict[str, list[str]] = {}
    face_fraction: dict[str, list[float]] = {}
    decode_errors: dict[str, list[int]] = {}  # errors ffmpeg decoded past, per clip
    audio_padded: dict[str, list[float]] = {}  # seconds of silence added to a short audio track
    for split in SPLITS:
        rows = [(specs[i], r) for i, r in sorted(done.items()) if specs[i].split == split]
        if not rows:  # an empty split is left out (readers reject 0-sample splits)
            continue
        splits[split] = assemble_split(rows, m, unimodal)
        sources[split] = [str(spec.path) for spec, _ in rows]
        transcript_sources[split] = [r.transcript_source for _, r in rows]
        face_fraction[split] = [round(r.face_fraction, 4) for _, r in rows]
        decode_errors[split] = [r.decode_errors for _, r in rows]
        audio_padded[split] = [round(r.audio_padded, 3) for _, r in rows]
    summary.count([(specs[i].id, r) for i, r in sorted(done.items())], m.audio_len, m.vision_len)
    summary.split_counts = {s: len(v) for s, v in sources.items()}
    first = next(iter(done.values()))
    meta = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"almt-pipeline {package_version()}",
        "text_model": m.text_model,
        "text_dim": int(first.text.shape[1]),
        "label_scale": label_scale,
        "extract": config_to_dict(cfg)["extract"],
        "feature_names": feature_names,
        "lengths": {"text": m.text_len, "audio": m.audio_len, "vision": m.vision_len},
        "sources": sources,
        "transcript_sources": transcript_sources,
        "face_fraction": face_fraction,
        "decode_errors": decode_errors,
        "audio_padded": audio_padded,
    }
    return splits, meta


def _label_scale(cfg: Config, specs: list[ClipSpec]) -> str:
    """The config's choice, else inferred from all usable rows' labels (metrics.infer_label_scale:
    "mosi" as soon as one |label| > 1, so a stray 5 is then out of range of mosi)."""
    if cfg.train.label_scale != "auto":
        return canonical_scale(cfg.train.label_scale)
    return infer_label_scale(np.array([s.label for s in specs if s.problem is None], dtype=np.float64))
