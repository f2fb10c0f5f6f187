"""Clips scheduled on a Ray cluster: ``almt extract --engine ray``.

The runner (:mod:`.runner`) keeps everything but the per-clip work: discovery, the cache lookup,
failures, assembly and meta are the same code path as with the local engine. :func:`run_clips`
extracts the clips it is handed on a pool of Ray actors, each holding one
:class:`~.clip.ClipExtractor` (the models are loaded once per actor), and hands each clip's
outcome back as it arrives.

An actor writes a finished clip to the per-clip cache at once (:func:`~.cache.extract_cached`, as
the local worker processes do), so a killed driver or a lost node loses no finished clip, and
rerunning the command resumes from the cache. A clip whose actor is lost (its node went away) is
handed to the other actors; a clip that takes down two actors stops the batch.

On a cluster, the clips, the cache and the output must be on a path every node sees at the same
location: each actor checks this before its first clip. Ray is imported here only, and only when
the ray engine is asked for, so the package works without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import AlmtError, ConfigError, DependencyError, ExtractionError
from ..processes import start_reaper, stop_reaper
from ..utils import one_line
from .cache import extract_cached, read_entry
from .clip import ClipExtractor, ClipFailure, ClipResult
from .dataset import ClipSpec

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "almt-pipeline[ray]"'
QUEUED_PER_ACTOR = 2  # clips sent to an actor ahead: one running, one waiting (no idle gap between clips)
LOSSES_PER_CLIP = 2  # actors a clip may take down before the batch stops
WAIT_S = 0.5  # longest wait in Ray between checks for Ctrl-C / SIGTERM
CONNECT_TIMEOUT_S = 10.0  # for the head node to accept a connection
SHARED_PATHS = ("on a cluster, the clips, the cache and the output must be on a path every node sees "
                "at the same location")

Outcome = ClipResult | ClipFailure


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`DependencyError` saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise DependencyError(f"the ray engine needs Ray, which is not installed: {INSTALL_HINT}") from e
    return ray


def check(address: str | None) -> None:
    """Fail now on a Ray address that is not None, "auto" or HOST:PORT, a HOST:PORT where nothing
    answers, or when Ray is missing."""
    check_address(address)
    import_ray()
    if address is not None:
        _check_reachable(address)


def check_address(address: str | None) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT address; None for None and "auto"; ConfigError otherwise."""
    if address is None or address == "auto":
        return None
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # [IPv6]:PORT
        host = host[1:-1]
    bad_host = not host or any(c.isspace() or c in "/[]" for c in host)
    if not sep or bad_host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"Ray address {address!r} is not 'auto' or HOST:PORT (e.g. 10.0.0.5:6379)")
    return host, int(port)


def _check_reachable(address: str) -> None:
    """Fail at once, in one line, where nothing answers at HOST:PORT (Ray would retry for minutes)."""
    host_port = check_address(address)
    if host_port is None:
        return
    try:
        socket.create_connection(host_port, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ExtractionError(f"no Ray cluster answers at {address} ({one_line(e)}); start one with "
                              f"`ray start --head` there, or check the address") from e


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[Any]:
    """Yield ``ray`` connected to a cluster: the one this process is already connected to, the one
    at ``address``, or (None) a new local Ray with ``num_cpus`` CPUs (None: all). This call ends
    what it started (the local Ray and its processes, or the connection) however the block ends.
    A local Ray also ends with this process when it is killed: Ray ties the lives of its main
    processes to the driver's (on Linux), and a reaper ends the agents they leave behind."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    reaper = None
    if address is None:
        options.update(address="local", num_cpus=num_cpus, include_dashboard=False)
        # Ray runs its workers at niceness 15: on a machine with other work they would get what is
        # left of the CPUs (10x slower under load here); a local Ray's workers run like this process
        os.environ.setdefault("RAY_worker_niceness", "0")
        reaper = start_reaper()
    else:
        options["address"] = address  # "auto" or HOST:PORT: that cluster, never a new local one
    try:
        with _keep_signal_handlers():  # ray.init installs a SIGTERM handler that would skip the cleanup
            try:
                ray.init(**options)
            except Exception as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise ExtractionError(f"could not start or reach {where}: {one_line(e)}") from e
        yield ray
    finally:
        # the reaper stands down only once Ray is down: a second Ctrl-C that cuts the shutdown
        # short leaves it to end the agents when this process exits
        ray.shutdown()
        stop_reaper(reaper)


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class ClipWorker:
    """A Ray actor's state: one ClipExtractor, loaded once; clips are cached as they finish.

    Errors never leave a method as exceptions (Ray would wrap them with a remote traceback): a
    worker that could not start returns its error, as a one-line :class:`AlmtError`, for every
    clip, and the driver raises it.
    """

    def __init__(self, cfg: Config, device: str, threads: int, cwd: str, first_clip: str, cache_dir: str):
        self.node = socket.gethostname()
        self.extractor: ClipExtractor | None = None
        self.error: AlmtError | None = None
        logging.basicConfig(level=logging.WARNING)  # into Ray's worker log files
        try:
            if Path(cwd).is_dir():  # relative clip and cache paths mean what they mean to the driver
                os.chdir(cwd)
            self._check_shared_paths(Path(first_clip), Path(cache_dir))
            import torch
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            torch.set_num_threads(threads)
            self.extractor = ClipExtractor(cfg, device, threads=threads)
        except AlmtError as e:
            self.error = e if self.node in str(e) else type(e)(f"{e} (on Ray node {self.node})")
        except Exception as e:
            self.error = ExtractionError(
                f"a Ray worker could not start on {self.node}: {type(e).__name__}: {one_line(e)}")

    def _check_shared_paths(self, first_clip: Path, cache_dir: Path) -> None:
        for what, path in (("clip", first_clip), ("cache folder", cache_dir)):
            if not path.exists():
                raise ExtractionError(f"the {what} {path} is not there on Ray node {self.node}: {SHARED_PATHS}")

    def ready(self) -> str:
        """The node's name, once the models are loaded."""
        return self.node

    def extract(self, spec: ClipSpec, cache_path: Path) -> Outcome | AlmtError:
        if self.extractor is None:
            return self.error or ExtractionError(f"a Ray worker on {self.node} has no extractor")
        try:
            return extract_cached(self.extractor, spec, cache_path)
        except AlmtError as e:  # a missing dependency fails every clip: the driver stops
            return e


def run_clips(ray: Any, cfg: Config, device: str, clips: dict[int, tuple[ClipSpec, Path]],
              finish: Callable[[int, Outcome], None], workers: int | None = None) -> None:
    """Extract ``clips`` (index -> spec, cache entry path) on ``workers`` Ray actors (default: one
    per CPU of the cluster, or per GPU with a CUDA ``device``), calling ``finish(index, outcome)``
    in this thread as each clip arrives."""
    if not clips:
        return
    gpu = device.startswith("cuda")
    resource = "GPU" if gpu else "CPU"
    available = int(ray.cluster_resources().get(resource, 0))
    if available < 1:  # workers would wait for a resource that is not there
        raise ExtractionError(f"the Ray cluster has no {resource}" + (" (--device cuda)" if gpu else ""))
    n = min(workers or available, len(clips))
    if workers is not None and workers > available:
        logger.warning("%d Ray workers asked for, the cluster has %d %s(s) now: the others start when "
                       "there is room", workers, available, resource)
    # Ray sets CUDA_VISIBLE_DEVICES for each actor to the GPU it was given: that GPU is "cuda" there
    actor_class = ray.remote(ClipWorker).options(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0)
    first_spec, first_cache = next(iter(clips.values()))
    args = (cfg, "cuda" if gpu else device, 1, os.getcwd(), str(first_spec.path), str(first_cache.parent))
    actors = [actor_class.remote(*args) for _ in range(n)]
    try:
        _Scheduler(ray, actors, clips, finish).run()
    finally:
        for actor in actors:  # ends the clips in flight too (after Ctrl-C or an error)
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


class _Scheduler:
    """Hands clips to actors that are ready and have room; a lost actor's clips go to the others."""

    def __init__(self, ray: Any, actors: list[Any], clips: dict[int, tuple[ClipSpec, Path]],
                 finish: Callable[[int, Outcome], None]):
        self.ray = ray
        self.clips = clips
        self.finish = finish
        self.queue = deque(clips)
        self.losses: Counter[int] = Counter()
        self.live = set(range(len(actors)))  # actors not lost (started or starting)
        self.sent: dict[int, deque[int]] = {}  # ready actors -> clips sent and not yet back, oldest first
        self.running_when_lost: dict[int, int | None] = {}  # lost actors -> the clip they were on
        self.actors = actors
        # object ref -> (actor number, clip index; None for the actor's ready() call)
        self.pending: dict[Any, tuple[int, int | None]] = {a.ready.remote(): (k, None) for k, a in enumerate(actors)}
        self.nodes: set[str] = set()
        self.last_loss: Exception | None = None

    def run(self) -> None:
        while self.queue or any(i is not None for _, i in self.pending.values()):
            if not self.live:
                cause = f" (last: {_first_sentence(self.last_loss)})" if self.last_loss else ""
                raise ExtractionError(f"every Ray worker was lost{cause}; finished clips are cached: rerun to resume")
            done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=WAIT_S)
            for ref in done:
                self._collect(ref)
            self._send()
        logger.info("extracted on %d Ray worker(s) on %d node(s)", len(self.live), len(self.nodes))

    def _collect(self, ref: Any) -> None:
        k, i = self.pending.pop(ref)
        try:
            value = self.ray.get(ref)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ObjectLostError) as e:
            self._lost(k, i, e)
            return
        except self.ray.exceptions.RayError as e:
            raise ExtractionError(f"Ray failed: {_first_sentence(e)}") from e
        if i is None:  # the actor has loaded its models
            self.sent[k] = deque()
            self.nodes.add(value)
            logger.debug("Ray worker %d ready on %s", k, value)
            return
        if k in self.sent:  # (an actor may be lost with a clip it finished still to be read)
            self.sent[k].remove(i)
        if isinstance(value, AlmtError):
            raise value
        self.finish(i, value)

    def _lost(self, k: int, i: int | None, e: Exception) -> None:
        """Actor ``k`` is gone (its node was lost, or it crashed): its clip ``i`` goes back in the
        queue, unless the actor cached it before it went. The clip it was working on counts the
        loss (not the one waiting behind it)."""
        self.last_loss = e
        if k in self.live:
            self.live.discard(k)
            sent = self.sent.pop(k, deque())
            self.running_when_lost[k] = sent[0] if sent else None
            logger.warning("a Ray worker was lost (%s); %d left", _first_sentence(e), len(self.live))
        if i is None:
            return
        spec, cache_path = self.clips[i]
        try:
            cached: ClipResult | None = read_entry(cache_path)
        except Exception:  # not finished (or not fully written) before the actor went
            cached = None
        if cached is not None:
            self.finish(i, cached)
            return
        self.losses[i] += self.running_when_lost.get(k) == i
        if self.losses[i] >= LOSSES_PER_CLIP:
            raise ExtractionError(f"{spec.path}: {self.losses[i]} Ray workers were lost while extracting this "
                                  f"clip ({_first_sentence(e)}); finished clips are cached: rerun to resume") from e
        self.queue.appendleft(i)

    def _send(self) -> None:
        for k, sent in self.sent.items():
            while self.queue and len(sent) < QUEUED_PER_ACTOR:
                i = self.queue.popleft()
                spec, cache_path = self.clips[i]
                self.pending[self.actors[k].extract.remote(spec, cache_path)] = (k, i)
                sent.append(i)


def _first_sentence(e: BaseException) -> str:
    """The first sentence of an error (Ray's run to a paragraph)."""
    text = one_line(e)
    return text.split(". ", 1)[0].rstrip(".")[:200]
