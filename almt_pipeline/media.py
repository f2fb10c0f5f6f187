"""Media decoding through ffmpeg: audio into memory, sampled video frames as a stream.

ffmpeg runs as a subprocess with an argument list (never a shell); which binary, and what a file
holds, come from :mod:`almt_pipeline.probe`; a binary that cannot run raises ``DependencyError``.
The errors ffmpeg reports while it goes on past corrupt packets are counted (:class:`FfmpegLog`).
:class:`PrefetchedFrames` reads a frame stream ahead on a background thread so decoding overlaps
with whatever consumes the frames.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import queue
import re
import subprocess
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import numpy as np

from .errors import DependencyError, MediaError
from .probe import INPUT_OPTIONS, MediaInfo, binary_failure, ffmpeg_exe, last_error_line, probe
from .utils import one_line

log = logging.getLogger(__name__)

STDERR_KEEP_LINES = 40  # lines of ffmpeg's stderr kept to explain a failure
ERROR_TEXT_CHARS = 160  # characters of the first error message kept for a warning
FRAME_SIDE_MULTIPLE = 2  # output frame sides are kept even (what most codecs and filters expect)
# Errors only, each line tagged with its level ("level"), repeats not folded into "Last message
# repeated N times" ("repeat"): what FfmpegLog needs to count them.
GLOBAL_ARGS = ["-nostdin", "-hide_banner", "-loglevel", "repeat+level+error"]
_LEVEL_TAG = re.compile(r"\[(?:panic|fatal|error|warning|info|verbose|debug|trace)\] ")
# ffmpeg's line for one packet that failed to decode (6.1 and later; older releases)
_DECODE_FAILURES = ("Error submitting packet to decoder", "Decoding error", "Error while decoding")


class FfmpegLog:
    """One ffmpeg run's stderr (with ``GLOBAL_ARGS``), fed line by line: the last lines, to explain
    a failure, and ``decode_errors``: the packets ffmpeg says it could not decode or, when it names
    none, its error messages (e.g. the demuxer's); ``first_error`` is the first of them."""

    def __init__(self) -> None:
        self.lines: deque[str] = deque(maxlen=STDERR_KEEP_LINES)
        self.failed_packets = 0
        self.error_lines = 0
        self.first_error = ""

    def add(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        tag = _LEVEL_TAG.search(line)
        if tag:  # a message of ffmpeg's own (untagged ones come from elsewhere, e.g. the loader)
            line = line[: tag.start()] + line[tag.end():]
            self.error_lines += 1
            self.failed_packets += any(s in line for s in _DECODE_FAILURES)
            if not self.first_error:
                self.first_error = re.sub(r"^(?:\[[^\]]*\]\s*)+", "", line)[:ERROR_TEXT_CHARS]
        if line:
            self.lines.append(line)

    @property
    def decode_errors(self) -> int:
        return self.failed_packets or self.error_lines

    def text(self) -> str:
        return "\n".join(self.lines)

    def check_binary(self, exe: str, returncode: int) -> None:
        """Raise ``DependencyError`` when ffmpeg itself could not run (``probe.binary_failure``)."""
        failure = binary_failure(exe, returncode, self.text())
        if failure is not None:
            raise failure


# --------------------------------------------------------------------------- audio


AUDIO_READ_BYTES = 1 << 20  # bytes per read from ffmpeg's pipe
AUDIO_SLACK_S = 1.0  # room beyond the probed duration before the sample buffer has to grow
AUDIO_UNKNOWN_S = 60.0  # first buffer size when the container gives no duration
AUDIO_MAX_FIRST_S = 4 * 3600.0  # a larger announced duration is not trusted for the first buffer
F32_BYTES = 4


@dataclass
class DecodedAudio:
    """An audio stream decoded by :func:`decode_audio`."""

    wave: np.ndarray  # (N,) float32 mono
    decode_errors: int = 0  # errors ffmpeg reported while going on (corrupt packets)
    first_error: str = ""


def load_audio(path: str | os.PathLike, sample_rate: int, *, info: MediaInfo | None = None) -> np.ndarray:
    """The (N,) float32 mono waveform of :func:`decode_audio`."""
    return decode_audio(path, sample_rate, info=info).wave


def decode_audio(path: str | os.PathLike, sample_rate: int, *, info: MediaInfo | None = None) -> DecodedAudio:
    """Decode the first audio stream to mono float32 at ``sample_rate`` Hz, in memory.

    Any channel count is downmixed and the rate converted by ffmpeg. ffmpeg's output is read
    straight into one buffer sized from the probed duration, so the waveform is held once; corrupt
    packets are skipped and counted. Raises ``MediaError`` when the file has no audio stream or
    cannot be decoded, ``DependencyError`` when ffmpeg cannot run.
    """
    import ffmpeg  # ffmpeg-python: builds the argument list

    path = Path(path)
    info = info or probe(path, need_audio=True)
    if not info.has_audio:
        raise MediaError(f"{path}: no audio stream")
    stream = ffmpeg.input(os.path.abspath(path), **INPUT_OPTIONS)[str(info.audio_stream)]
    args = stream.output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=int(sample_rate)).compile(
        cmd=ffmpeg_exe()
    )
    args[1:1] = GLOBAL_ARGS
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as e:
        raise DependencyError(f"cannot run {args[0]!r}: {one_line(e)}") from e
    stderr_log = FfmpegLog()
    stderr_thread = threading.Thread(target=_drain_lines, args=(proc.stderr, stderr_log), daemon=True)
    stderr_thread.start()
    seconds = min(info.duration + AUDIO_SLACK_S, AUDIO_MAX_FIRST_S) if info.duration else AUDIO_UNKNOWN_S
    try:
        wave = _read_f32le(cast(io.BufferedReader, proc.stdout), int(seconds * sample_rate))  # (N,)
        returncode = proc.wait()
    finally:
        _stop_process(proc, stderr_thread)  # on an error while reading: stop ffmpeg
    if returncode != 0:
        stderr_log.check_binary(args[0], returncode)
        raise MediaError(f"{path}: audio decoding failed ({last_error_line(stderr_log.text(), path)})")
    if wave.size == 0:
        raise MediaError(f"{path}: no audio could be decoded (empty or corrupt audio stream)")
    if not np.isfinite(wave).all():
        np.nan_to_num(wave, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return DecodedAudio(wave, stderr_log.decode_errors, stderr_log.first_error)


def _read_f32le(pipe: io.BufferedIOBase, expected: int) -> np.ndarray:
    """All little-endian float32 samples from ``pipe`` as one (N,) float32 array, read in place
    into a buffer of ``expected`` samples that grows (realloc) only when the stream is longer."""
    buf = np.empty(max(expected, AUDIO_READ_BYTES // F32_BYTES), dtype="<f4")  # (capacity,)
    filled = 0  # bytes
    while True:
        if filled == buf.nbytes:
            buf.resize(2 * buf.size, refcheck=False)  # no view of buf is alive here
        view = buf.view(np.uint8).data[filled : filled + AUDIO_READ_BYTES]
        got = pipe.readinto(view)
        view.release()
        if not got:
            break
        filled += got
    buf.resize(filled // F32_BYTES, refcheck=False)  # gives back the unused tail
    return buf if buf.dtype == np.float32 else buf.astype(np.float32)  # (N,), native byte order


# --------------------------------------------------------------------------- video frames


def frame_size(display_size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """Output (width, height): the longer side at most ``max_side``, aspect kept, sides even."""
    w, h = display_size
    scale = 1.0 if not max_side else min(1.0, max_side / max(w, h))
    m = FRAME_SIDE_MULTIPLE
    return max(m, int(round(w * scale / m)) * m), max(m, int(round(h * scale / m)) * m)


class FrameStream:
    """Iterator of ``(t_seconds, frame)`` with frame (H, W, 3) uint8 RGB, one frame in memory at a
    time. ``t = i / fps`` counts from the first frame. After iteration, ``n_frames`` and
    ``decoded_duration`` (= n_frames / fps) tell how much was decoded (compare with
    ``info.duration`` via ``decoded_duration_problem``) and ``log.decode_errors`` how many errors
    ffmpeg reported on the way. ``close()`` (or leaving a ``with`` block, or dropping the iterator)
    stops ffmpeg."""

    def __init__(self, path: Path, info: MediaInfo, fps: float, max_side: int | None) -> None:
        import ffmpeg

        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if info.display_size is None:
            raise MediaError(f"{path}: video stream has no frame size")
        self.path, self.info, self.fps = path, info, float(fps)
        self.width, self.height = frame_size(info.display_size, max_side)
        self.n_frames = 0
        self._frame_bytes = self.width * self.height * 3
        # ffmpeg autorotates before these filters, so the scale target is the displayed orientation.
        stream = (
            ffmpeg.input(os.path.abspath(path), **INPUT_OPTIONS)[str(info.video_stream)]
            .filter("fps", fps=self.fps, eof_action="pass")  # "pass": a one-frame input still gives a frame
            .filter("scale", self.width, self.height, flags="area")
            .filter("setsar", 1)
        )
        args = stream.output("pipe:", format="rawvideo", pix_fmt="rgb24").compile(cmd=ffmpeg_exe())
        args[1:1] = GLOBAL_ARGS
        self._exe = args[0]
        self.log = FfmpegLog()
        try:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                bufsize=self._frame_bytes,
            )
        except OSError as e:
            raise DependencyError(f"cannot run {args[0]!r}: {one_line(e)}") from e
        self._stdout = cast(io.BufferedReader, self._proc.stdout)  # stdout=PIPE with a buffer size
        # Drain stderr on a thread so a chatty ffmpeg never blocks on a full pipe. Neither the
        # thread nor the finalizer refers to self, so dropping the stream stops ffmpeg.
        self._stderr_thread = threading.Thread(
            target=_drain_lines, args=(self._proc.stderr, self.log), daemon=True
        )
        self._stderr_thread.start()
        self._finalizer = weakref.finalize(self, _stop_process, self._proc, self._stderr_thread)
        self._done = False

    @property
    def decoded_duration(self) -> float:
        return self.n_frames / self.fps

    def __iter__(self) -> FrameStream:
        return self

    def __next__(self) -> tuple[float, np.ndarray]:
        if self._done:
            raise StopIteration
        buf = bytearray(self._frame_bytes)  # a fresh buffer per frame: frames stay valid and writable
        view, got = memoryview(buf), 0
        while got < self._frame_bytes:
            n = self._stdout.readinto(view[got:])
            if not n:
                break
            got += n
        if got == self._frame_bytes:
            frame = np.frombuffer(buf, dtype=np.uint8).reshape(self.height, self.width, 3)  # (H, W, 3)
            t = self.n_frames / self.fps
            self.n_frames += 1
            return t, frame
        self._finish(partial=got)
        raise StopIteration

    def _finish(self, partial: int) -> None:
        self._done = True
        rc = self._proc.wait()
        self._finalizer()  # joins the stderr thread, closes the pipes
        if rc != 0 or (partial and self.n_frames == 0):
            self.log.check_binary(self._exe, rc)
            reason = last_error_line(self.log.text(), self.path)
            if self.n_frames == 0:
                raise MediaError(f"{self.path}: video decoding failed ({reason})")
            # Frames came out before the error: report, let the caller judge the duration.
            log.warning(
                "%s: video decoding stopped after %.1f s (%s)", self.path, self.decoded_duration, reason
            )
        elif self.n_frames == 0:
            raise MediaError(f"{self.path}: no video frame could be decoded")

    def close(self) -> None:
        """Stop ffmpeg (if still running) and release its pipes."""
        self._done = True
        self._finalizer()

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain_lines(pipe: IO[bytes], stderr_log: FfmpegLog) -> None:
    for raw in iter(pipe.readline, b""):
        stderr_log.add(raw)


def _stop_process(proc: subprocess.Popen[bytes], stderr_thread: threading.Thread) -> None:
    """Kill ffmpeg if it still runs, reap it and close its pipes (idempotent)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    stderr_thread.join(timeout=5)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def iter_frames(
    path: str | os.PathLike, fps: float, max_side: int | None = None, *, info: MediaInfo | None = None
) -> FrameStream:
    """Stream RGB frames sampled by timestamp at ``fps`` (ffmpeg's ``fps`` filter, so variable frame
    rate is handled), rotation applied, scaled so the longer side <= ``max_side``.

    Returns a ``FrameStream``: iterate it for ``(t_seconds, (H, W, 3) uint8)``; memory stays flat
    however long the clip. Raises ``MediaError`` when there is no video stream or nothing decodes.
    """
    path = Path(path)
    info = info or probe(path, need_video=True)
    if not info.has_video:
        raise MediaError(f"{path}: no video stream")
    return FrameStream(path, info, fps, max_side)


# --------------------------------------------------------------------------- read-ahead

_CLOSING_THREAD = "almt-frames-closing"  # name a reader thread takes while it is being stopped


class _DropClosingReaderRecords(logging.Filter):
    """Drops log records of a frame reader that is being stopped on purpose (e.g. the warning a
    decoder gives when its ffmpeg is killed mid-stream)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != _CLOSING_THREAD


log.addFilter(_DropClosingReaderRecords())


@dataclass
class _StreamError:
    """An exception raised by the frame source, carried through the queue to the consumer."""

    error: BaseException


class PrefetchedFrames:
    """Iterates ``frames`` while a background thread reads up to ``depth`` items ahead.

    An exception of the source (e.g. a decoding failure) is raised by ``__next__`` in the
    consumer's thread, after the items read before it. ``close()`` stops the thread, calling
    ``frames.close()`` when the source has one (a :class:`FrameStream` then stops ffmpeg, which
    ends a blocked read; a generator is closed by the reader thread itself); what the source
    logs to this module's logger while it is being closed is dropped. ``count`` items were
    handed out and ``wait_seconds`` were spent waiting for them.
    """

    _END = object()

    def __init__(self, frames: Iterable[tuple[float, np.ndarray]], depth: int) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._frames = frames
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self.count = 0
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._read, name="almt-frames", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        """Queue ``item``, waiting for room; False when ``close()`` came first."""
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
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_StreamError(e))
        finally:
            if inspect.isgenerator(self._frames):
                self._frames.close()  # only its own thread may close a generator

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
        return cast("tuple[float, np.ndarray]", item)

    def close(self) -> None:
        """Stop the reader thread and the source; iteration ends here."""
        self._finished = True
        self._stop.set()
        self._thread.name = _CLOSING_THREAD  # what the source logs from now on is expected
        close = None if inspect.isgenerator(self._frames) else getattr(self._frames, "close", None)
        if close is not None:
            close()  # e.g. stops ffmpeg, which ends a read blocked on its pipe
        self._thread.join(timeout=10)

    def __enter__(self) -> PrefetchedFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- partial decodes

DECODED_MIN_FRACTION = 0.9  # decoded / container duration below this (and below the slack) = truncated
DECODED_SLACK_S = 0.5


def decoded_duration_problem(expected: float | None, got: float) -> str | None:
    """A message like "decoded 2.1 s of 9.8 s (file truncated?)" when far less was decoded than
    the container announces; None when it looks complete or the container gives no duration."""
    if not expected or expected <= 0:
        return None
    if got < expected * DECODED_MIN_FRACTION - DECODED_SLACK_S:
        return f"decoded {got:.1f} s of {expected:.1f} s (file truncated?)"
    return None

