"""Media I/O through ffmpeg: probe streams, decode audio into memory, stream sampled video frames.

ffmpeg runs as a subprocess with an argument list (never a shell). The binary is ``$ALMT_FFMPEG``,
else ``ffmpeg`` on PATH, else the one shipped in the ``imageio-ffmpeg`` wheel, so a plain
``pip install`` works with nothing from the system. That wheel has no ``ffprobe``, so ``probe``
reads the stream summary ffmpeg prints for ``ffmpeg -i FILE`` and uses ffprobe's JSON only when an
ffprobe binary is available; both give the same ``MediaInfo``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import DependencyError, MediaError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0  # a probe only reads headers; anything slower is a broken/hostile file
STDERR_KEEP_LINES = 40  # lines of ffmpeg's stderr kept to explain a failure
FRAME_SIDE_MULTIPLE = 2  # output frame sides are kept even (what most codecs and filters expect)
# Ask ffmpeg to read local files only: a "video" that is really a playlist must not fetch URLs.
INPUT_OPTIONS = {"protocol_whitelist": "file"}
GLOBAL_ARGS = ["-nostdin", "-hide_banner", "-loglevel", "error"]
NOT_MEDIA_FORMATS = {"tty"}  # ffmpeg's text "demuxer" accepts any text file


# --------------------------------------------------------------------------- binaries


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: ``$ALMT_FFMPEG``, else ``ffmpeg`` on PATH, else imageio-ffmpeg's."""
    env = os.environ.get("ALMT_FFMPEG")
    if env:
        found = shutil.which(env) or (env if os.path.isfile(env) else None)
        if found is None:
            raise DependencyError(f"ALMT_FFMPEG={env!r} is not an executable file")
        return found
    system = shutil.which("ffmpeg")
    if system:
        return system
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # ImportError, or the wheel has no binary for this platform
        raise DependencyError(
            "no ffmpeg found; fix: pip install imageio-ffmpeg, install ffmpeg, or set ALMT_FFMPEG"
        ) from e


def ffprobe_exe() -> str | None:
    """ffprobe to use, or None: ``$ALMT_FFPROBE`` ("" or "none" disables it), else an ffprobe
    next to the chosen ffmpeg, else ``ffprobe`` on PATH."""
    env = os.environ.get("ALMT_FFPROBE")
    if env is not None:
        if env.strip().lower() in ("", "none", "0", "off"):
            return None
        return shutil.which(env) or (env if os.path.isfile(env) else None)
    try:
        sibling = Path(ffmpeg_exe()).with_name("ffprobe")
    except DependencyError:
        sibling = None
    if sibling is not None and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("ffprobe")


# --------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class MediaInfo:
    """What a file holds. ``width``/``height`` are the stored (coded) size; ``display_size`` applies
    the sample aspect ratio and the rotation. ``rotation`` is the display-matrix angle in degrees
    (counter-clockwise, as ffmpeg reports it), 0 when none. ``fps`` is the average frame rate
    rounded to 0.01. ``duration`` (s, rounded to 0.01) is None when the container does not say."""

    path: str
    format_name: str
    duration: float | None
    has_audio: bool
    has_video: bool
    video_stream: int | None = None  # absolute stream index (ffmpeg's "#0:N")
    video_codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    sample_aspect_ratio: float = 1.0
    rotation: int = 0
    audio_stream: int | None = None
    audio_codec: str | None = None
    audio_sample_rate: int | None = None
    audio_channels: int | None = None

    @property
    def display_size(self) -> tuple[int, int] | None:
        """(width, height) as shown: SAR applied, swapped for a quarter-turn rotation."""
        if not self.width or not self.height:
            return None
        w, h = self.width * self.sample_aspect_ratio, float(self.height)
        if self.rotation % 180 == 90:
            w, h = h, w
        return max(1, round(w)), max(1, round(h))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise MediaError(f"{path}: file not found")
    if not path.is_file():
        raise MediaError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")


def probe(path: str | os.PathLike, *, need_audio: bool = False, need_video: bool = False) -> MediaInfo:
    """Read the container header: streams, duration, size, frame rate, rotation.

    Uses ffprobe's JSON when an ffprobe binary is available, else parses ``ffmpeg -i``. Raises
    ``MediaError`` (one line naming the file) for a missing, empty or non-media file, or when a
    stream asked for with ``need_audio``/``need_video`` is absent.
    """
    path = Path(path)
    _check_file(path)
    ffprobe = ffprobe_exe()
    info = _probe_ffprobe(path, ffprobe) if ffprobe else _probe_ffmpeg(path, ffmpeg_exe())
    if need_video and not info.has_video:
        raise MediaError(f"{path}: no video stream")
    if need_audio and not info.has_audio:
        raise MediaError(f"{path}: no audio stream")
    return info


def _run_probe(args: list[str], path: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            args, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise MediaError(f"{path}: probing timed out after {PROBE_TIMEOUT_S:.0f} s") from e
    except OSError as e:
        raise DependencyError(f"cannot run {args[0]!r}: {e}") from e


def _last_error_line(stderr: str, path: Path) -> str:
    """The most telling line of ffmpeg's stderr, without the file name prefix."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "output file must be specified" not in ln]
    if not lines:
        return "unknown ffmpeg error"
    for needle, reason in (("moov atom not found", "moov atom not found: incomplete or truncated MP4?"),
                           ("Invalid data found", "invalid data found")):
        if any(needle in ln for ln in lines):
            return reason
    line = lines[-1]
    for prefix in (f"{path}: ", f"{os.path.abspath(path)}: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    return re.sub(r"^\[[^\]]*\]\s*", "", line)


def _not_media(path: Path, why: str) -> MediaError:
    return MediaError(f"{path}: not a media file or unreadable ({why})")


def _round2(x: float | None) -> float | None:
    """Round to 0.01 half-up, the way ffmpeg prints durations (so both probe paths agree)."""
    if x is None:
        return None
    micro = int(round(float(x) * 1_000_000))
    return ((micro + 5_000) // 10_000) / 100


def _ratio(text: str | None) -> float | None:
    """'24000/1001' or '16:9' -> float; None for missing or zero denominators."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[/:]\s*(\d+(?:\.\d+)?)\s*", text)
    if m:
        num, den = float(m.group(1)), float(m.group(2))
        return num / den if den else None
    try:
        return float(text)
    except ValueError:
        return None


def _norm_rotation(deg: float) -> int:
    """Angle -> int in (-180, 180]."""
    r = int(round(deg)) % 360
    return r - 360 if r > 180 else r


def _probe_ffprobe(path: Path, exe: str) -> MediaInfo:
    args = [exe, "-v", "error", "-print_format", "json", "-show_format", "-show_streams"]
    for key, value in INPUT_OPTIONS.items():
        args += [f"-{key}", value]
    args.append(os.path.abspath(path))
    proc = _run_probe(args, path)
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise _not_media(path, _last_error_line(stderr, path))
    try:
        data = json.loads(proc.stdout.decode("utf-8", "replace") or "{}")
    except json.JSONDecodeError as e:
        raise MediaError(f"{path}: ffprobe printed unreadable output") from e
    fmt = data.get("format", {})
    fields: dict[str, Any] = {"path": str(path), "format_name": fmt.get("format_name", "")}
    dur = fmt.get("duration")
    fields["duration"] = _round2(float(dur)) if dur not in (None, "N/A") else None
    for s in data.get("streams", []):
        kind = s.get("codec_type")
        if kind == "video" and "video_stream" not in fields:
            if s.get("disposition", {}).get("attached_pic"):
                continue  # cover art, not a video
            rotation = 0.0
            for sd in s.get("side_data_list", []) or []:
                if "rotation" in sd:
                    rotation = float(sd["rotation"])
            if not rotation and "rotate" in s.get("tags", {}):
                rotation = -float(s["tags"]["rotate"])  # legacy tag is clockwise
            fps = _ratio(s.get("avg_frame_rate")) or _ratio(s.get("r_frame_rate"))
            fields.update(
                video_stream=int(s["index"]),
                video_codec=s.get("codec_name"),
                width=int(s["width"]) if s.get("width") else None,
                height=int(s["height"]) if s.get("height") else None,
                fps=_round2(fps),
                sample_aspect_ratio=_ratio(s.get("sample_aspect_ratio")) or 1.0,
                rotation=_norm_rotation(rotation),
            )
        elif kind == "audio" and "audio_stream" not in fields:
            fields.update(
                audio_stream=int(s["index"]),
                audio_codec=s.get("codec_name"),
                audio_sample_rate=int(s["sample_rate"]) if s.get("sample_rate") else None,
                audio_channels=int(s["channels"]) if s.get("channels") else None,
            )
    return _finish_info(path, fields)


def _finish_info(path: Path, fields: dict[str, Any]) -> MediaInfo:
    if fields["format_name"] in NOT_MEDIA_FORMATS:
        raise _not_media(path, f"detected as {fields['format_name']!r}")
    fields["has_video"] = "video_stream" in fields
    fields["has_audio"] = "audio_stream" in fields
    if not (fields["has_video"] or fields["has_audio"]):
        raise _not_media(path, "no audio or video stream")
    return MediaInfo(**fields)


_INPUT_RE = re.compile(r"^Input #0, (.+?), from '")
_DURATION_RE = re.compile(r"^\s+Duration: (?:(\d+):(\d+):(\d+(?:\.\d+)?)|N/A)")
_STREAM_RE = re.compile(r"^\s+Stream #0:(\d+)[^:]*: (Video|Audio|Subtitle|Data|Attachment): (.*)$")
_SIZE_RE = re.compile(r", (\d+)x(\d+)(?=[, \[]|$)")
_SAR_RE = re.compile(r"\[SAR (\d+):(\d+) DAR \d+:\d+\]")
_FPS_RE = re.compile(r", (\d+(?:\.\d+)?)(k?) fps")
_TBR_RE = re.compile(r", (\d+(?:\.\d+)?)(k?) tbr")
_ROT_RE = re.compile(r"(?:display ?matrix): rotation of (-?\d+(?:\.\d+)?) degrees", re.I)
_ROTATE_TAG_RE = re.compile(r"^\s+rotate\s*:\s*(-?\d+(?:\.\d+)?)\s*$")
_HZ_RE = re.compile(r", (\d+) Hz")
_NAMED_LAYOUTS = {"mono": 1, "stereo": 2, "downmix": 2, "quad": 4, "hexagonal": 6, "octagonal": 8,
                  "hexadecagonal": 16}


def _channels_from_layout(text: str) -> int | None:
    """Channel count from the layout field ffmpeg prints after the sample rate."""
    m = re.match(r"(\d+) channels", text)
    if m:
        return int(m.group(1))
    name = re.sub(r"\(.*\)$", "", text.strip())
    if name in _NAMED_LAYOUTS:
        return _NAMED_LAYOUTS[name]
    m = re.fullmatch(r"(\d+)\.(\d+)", name)
    if m:
        return int(m.group(1)) + int(m.group(2))
    if "+" in name:
        return name.count("+") + 1
    return None


def _codec_name(desc: str) -> str:
    return re.split(r"[\s,(]", desc.strip(), maxsplit=1)[0]


def _probe_ffmpeg(path: Path, exe: str) -> MediaInfo:
    """Parse the header summary that ``ffmpeg -i FILE`` prints (no ffprobe needed)."""
    args = [exe, "-nostdin", "-hide_banner"]
    for key, value in INPUT_OPTIONS.items():
        args += [f"-{key}", value]
    args += ["-i", os.path.abspath(path)]
    proc = _run_probe(args, path)  # exits 1 ("no output file") even when the input is fine
    stderr = proc.stderr.decode("utf-8", "replace")
    lines = stderr.splitlines()
    start = next((i for i, ln in enumerate(lines) if _INPUT_RE.match(ln)), None)
    if start is None:
        raise _not_media(path, _last_error_line(stderr, path))
    fields: dict[str, Any] = {"path": str(path), "format_name": _INPUT_RE.match(lines[start]).group(1),
                              "duration": None}
    current: str | None = None  # kind of the stream whose indented block we are in
    for ln in lines[start + 1:]:
        if not ln.startswith(" "):
            break  # end of the input summary
        m = _DURATION_RE.match(ln)
        if m:
            if m.group(1) is not None:
                secs = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
                fields["duration"] = _round2(secs)
            continue
        m = _STREAM_RE.match(ln)
        if m:
            index, kind, desc = int(m.group(1)), m.group(2), m.group(3)
            current = None
            if kind == "Video" and "video_stream" not in fields and "(attached pic)" not in desc:
                current = "video"
                size = _SIZE_RE.search(desc)
                sar = _SAR_RE.search(desc)
                fps = _FPS_RE.search(desc) or _TBR_RE.search(desc)
                fps_val = None
                if fps:
                    fps_val = float(fps.group(1)) * (1000 if fps.group(2) else 1)
                sar_val = int(sar.group(1)) / int(sar.group(2)) if sar and int(sar.group(2)) else 0
                fields.update(
                    video_stream=index,
                    video_codec=_codec_name(desc),
                    width=int(size.group(1)) if size else None,
                    height=int(size.group(2)) if size else None,
                    fps=_round2(fps_val),
                    sample_aspect_ratio=sar_val or 1.0,
                    rotation=0,
                )
            elif kind == "Audio" and "audio_stream" not in fields:
                current = "audio"
                hz = _HZ_RE.search(desc)
                channels = None
                if hz:
                    rest = desc[hz.end():].lstrip(", ")
                    channels = _channels_from_layout(rest.split(",")[0])
                fields.update(
                    audio_stream=index,
                    audio_codec=_codec_name(desc),
                    audio_sample_rate=int(hz.group(1)) if hz else None,
                    audio_channels=channels,
                )
            continue
        if current == "video":
            m = _ROT_RE.search(ln)
            if m:
                fields["rotation"] = _norm_rotation(float(m.group(1)))
                continue
            m = _ROTATE_TAG_RE.match(ln)
            if m and not fields.get("rotation"):
                fields["rotation"] = _norm_rotation(-float(m.group(1)))
    return _finish_info(path, fields)


# --------------------------------------------------------------------------- audio


AUDIO_READ_BYTES = 1 << 20  # bytes per read from ffmpeg's pipe
AUDIO_SLACK_S = 1.0  # room beyond the probed duration before the sample buffer has to grow
AUDIO_UNKNOWN_S = 60.0  # first buffer size when the container gives no duration
AUDIO_MAX_FIRST_S = 4 * 3600.0  # a larger announced duration is not trusted for the first buffer
F32_BYTES = 4


def load_audio(path: str | os.PathLike, sample_rate: int, *, info: MediaInfo | None = None) -> np.ndarray:
    """Decode the first audio stream to mono float32 at ``sample_rate`` Hz, in memory.

    Any channel count is downmixed and the rate converted by ffmpeg. Returns (N,) float32.
    ffmpeg's output is read straight into one buffer sized from the probed duration, so the
    waveform is held once. Raises ``MediaError`` when the file has no audio stream or cannot be
    decoded.
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
        raise DependencyError(f"cannot run {args[0]!r}: {e}") from e
    stderr: deque[str] = deque(maxlen=STDERR_KEEP_LINES)
    stderr_thread = threading.Thread(target=_drain_lines, args=(proc.stderr, stderr), daemon=True)
    stderr_thread.start()
    seconds = min(info.duration + AUDIO_SLACK_S, AUDIO_MAX_FIRST_S) if info.duration else AUDIO_UNKNOWN_S
    try:
        wave = _read_f32le(proc.stdout, int(seconds * sample_rate))  # (N,)
        returncode = proc.wait()
    finally:
        _stop_process(proc, stderr_thread)  # on an error while reading: stop ffmpeg
    if returncode != 0:
        reason = _last_error_line("\n".join(stderr), path)
        raise MediaError(f"{path}: audio decoding failed ({reason})")
    if wave.size == 0:
        raise MediaError(f"{path}: no audio could be decoded (empty or corrupt audio stream)")
    if not np.isfinite(wave).all():
        np.nan_to_num(wave, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return wave


def _read_f32le(pipe: IO[bytes], expected: int) -> np.ndarray:
    """All little-endian float32 samples from ``pipe`` as one (N,) float32 array, read in place
    into a buffer of ``expected`` samples that grows (realloc) only when the stream is longer."""
    buf = np.empty(max(expected, AUDIO_READ_BYTES // F32_BYTES), dtype="<f4")  # (capacity,)
    filled = 0  # bytes
    while True:
        if filled == buf.nbytes:
            buf.resize(2 * buf.size, refcheck=False)  # no view of buf is alive here
        view = memoryview(buf.view(np.uint8))[filled : filled + AUDIO_READ_BYTES]
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
    ``decoded_duration`` (= n_frames / fps) tell how much was decoded; compare with
    ``info.duration`` via ``check_decoded_duration``. ``close()`` (or leaving a ``with`` block, or
    dropping the iterator) stops ffmpeg."""

    def __init__(self, path: Path, info: MediaInfo, fps: float, max_side: int | None):
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
        self._stderr: deque[str] = deque(maxlen=STDERR_KEEP_LINES)
        try:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                bufsize=self._frame_bytes,
            )
        except OSError as e:
            raise DependencyError(f"cannot run {args[0]!r}: {e}") from e
        # Drain stderr on a thread so a chatty ffmpeg never blocks on a full pipe. Neither the
        # thread nor the finalizer refers to self, so dropping the stream stops ffmpeg.
        self._stderr_thread = threading.Thread(
            target=_drain_lines, args=(self._proc.stderr, self._stderr), daemon=True
        )
        self._stderr_thread.start()
        self._finalizer = weakref.finalize(self, _stop_process, self._proc, self._stderr_thread)
        self._done = False

    @property
    def decoded_duration(self) -> float:
        return self.n_frames / self.fps

    def __iter__(self) -> "FrameStream":
        return self

    def __next__(self) -> tuple[float, np.ndarray]:
        if self._done:
            raise StopIteration
        buf = bytearray(self._frame_bytes)  # a fresh buffer per frame: frames stay valid and writable
        view, got = memoryview(buf), 0
        while got < self._frame_bytes:
            n = self._proc.stdout.readinto(view[got:])
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
            reason = _last_error_line("\n".join(self._stderr), self.path)
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

    def __enter__(self) -> "FrameStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain_lines(pipe: IO[bytes], keep: deque) -> None:
    for raw in iter(pipe.readline, b""):
        keep.append(raw.decode("utf-8", "replace").rstrip())


def _stop_process(proc: subprocess.Popen, stderr_thread: threading.Thread) -> None:
    """Kill ffmpeg if it still runs, reap it and close its pipes (idempotent)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    stderr_thread.join(timeout=5)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


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


def check_decoded_duration(
    path: str | os.PathLike, expected: float | None, got: float, what: str = "media"
) -> None:
    """Raise ``MediaError`` naming the file when ``decoded_duration_problem`` finds a short decode."""
    problem = decoded_duration_problem(expected, got)
    if problem:
        raise MediaError(f"{path}: {what} {problem}")
