"""Where ffmpeg is and what a media file holds: executable discovery and stream probing.

The ffmpeg binary is ``$ALMT_FFMPEG``, else ``ffmpeg`` on PATH, else the one shipped in the
``imageio-ffmpeg`` wheel, so a plain ``pip install`` works with nothing from the system. That
wheel has no ``ffprobe``, so :func:`probe` reads the stream summary ffmpeg prints for
``ffmpeg -i FILE`` and uses ffprobe's JSON only when an ffprobe binary is available; both give
the same :class:`MediaInfo`. Binaries run as subprocesses with an argument list (never a shell).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DependencyError, MediaError
from .utils import one_line

PROBE_TIMEOUT_S = 120.0  # a probe only reads headers; anything slower is a broken/hostile file
# Ask ffmpeg to read local files only: a "video" that is really a playlist must not fetch URLs.
INPUT_OPTIONS = {"protocol_whitelist": "file"}
NOT_MEDIA_FORMATS = {"tty"}  # ffmpeg's text "demuxer" accepts any text file
# First box types of an ISO media file (MP4/MOV/M4A/3GP): such a file that will not open is incomplete.
ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"styp", b"sidx", b"moof", b"pnot"}
SNIFF_BYTES = 4096  # bytes read to tell what a file that ffmpeg cannot open holds
LOADER_ERROR = "error while loading shared libraries"  # the dynamic loader's message
VERSION_TIMEOUT_S = 30.0


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


def _run_probe(args: list[str], path: Path) -> tuple[subprocess.CompletedProcess[bytes], str]:
    """The finished probe process and its stderr; ``DependencyError`` when the binary cannot run."""
    try:
        proc = subprocess.run(
            args, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise MediaError(f"{path}: probing timed out after {PROBE_TIMEOUT_S:.0f} s") from e
    except OSError as e:
        raise DependencyError(f"cannot run {args[0]!r}: {one_line(e)}") from e
    stderr = proc.stderr.decode("utf-8", "replace")
    failure = binary_failure(args[0], proc.returncode, stderr)
    if failure is not None:
        raise failure
    if proc.returncode < 0:  # the binary works (it passed ``-version``): this file crashed it
        raise MediaError(f"{path}: {Path(args[0]).name} crashed on this file (signal {-proc.returncode})")
    return proc, stderr


def binary_failure(exe: str, returncode: int, stderr: str) -> DependencyError | None:
    """A ``DependencyError`` when ``exe`` itself could not run, not its input: the loader's "error
    while loading shared libraries", the shell's exit status 126/127 (cannot execute / not found;
    ffmpeg never uses them) or a signal that kills ``exe -version`` too. Else None."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    loader = next((ln for ln in lines if LOADER_ERROR in ln), None)
    if loader or returncode in (126, 127):
        why = f"{loader or (lines[-1] if lines else 'no message')} (exit status {returncode})"
    elif returncode < 0 and not _runs(exe):
        why = f"killed by signal {-returncode}, even for '-version'"
    else:
        return None
    var = "ALMT_FFPROBE (or 'none')" if "ffprobe" in Path(exe).name else "ALMT_FFMPEG"
    return DependencyError(f"{exe} cannot run: {why}; fix: reinstall it, or set {var} to a working binary")


def _runs(exe: str) -> bool:
    """Whether ``exe -version`` exits 0."""
    try:
        return subprocess.run([exe, "-version"], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=VERSION_TIMEOUT_S, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def last_error_line(stderr: str, path: Path) -> str:
    """The most telling line of ffmpeg's stderr, without the file name prefix."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "output file must be specified" not in ln]
    if not lines:
        return "unknown ffmpeg error"
    for needle, reason in (("moov atom not found", "moov atom not found"),
                           ("Invalid data found", "invalid data found")):
        if any(needle in ln for ln in lines):
            return reason
    line = lines[-1]
    for prefix in (f"{path}: ", f"{os.path.abspath(path)}: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    return re.sub(r"^(?:\[[^\]]*\]\s*)?(?:Error opening input files?: )?", "", line)


def _unreadable(path: Path, why: str) -> MediaError:
    """The error for a file ffmpeg cannot use, worded from its first bytes (MP4 box, text...)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        return MediaError(f"{path}: cannot read ({one_line(e)})")
    if head[4:8] in ISO_BOXES:
        return MediaError(f"{path}: incomplete MP4/MOV file ({why}; truncated, or still being written?)")
    text = _as_text(head)
    if text is not None:
        kind = "JSON" if text[0] in "{[" else "text"
        return MediaError(f"{path}: not a media file (a {kind} file starting {text.splitlines()[0][:40]!r})")
    if why in ("invalid data found", "moov atom not found"):  # the .mp4 name made ffmpeg try MP4
        why = "no audio or video format recognised"
    return MediaError(f"{path}: not a media file or unreadable ({why})")


def _as_text(head: bytes) -> str | None:
    """``head`` stripped, when it reads as text (UTF-8 without control characters); else None."""
    text = head.decode("utf-8", "ignore")
    if len(text.encode("utf-8")) < len(head) - 3:  # more lost than a character cut at the end
        return None
    text = text.lstrip("\ufeff").strip()
    if not text or any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return None
    return text


def _input_options() -> list[str]:
    return [a for key, value in INPUT_OPTIONS.items() for a in (f"-{key}", value)]


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
    args += [*_input_options(), os.path.abspath(path)]
    proc, stderr = _run_probe(args, path)
    if proc.returncode != 0:
        raise _unreadable(path, last_error_line(stderr, path))
    try:
        data = json.loads(proc.stdout.decode("utf-8", "replace") or "{}")
    except json.JSONDecodeError as e:
        raise MediaError(f"{path}: ffprobe printed unreadable output") from e
    fmt = data.get("format", {})
    fields: dict[str, Any] = {"path": str(path), "format_name": fmt.get("format_name", "")}
    dur = fmt.get("duration")
    fields["duration"] = _round2(float(dur)) if dur not in (None, "N/A") else None
    for stream in data.get("streams", []):
        kind = stream.get("codec_type")
        if kind == "video" and "video_stream" not in fields:
            if not stream.get("disposition", {}).get("attached_pic"):  # cover art is not a video
                fields.update(_ffprobe_video_fields(stream))
        elif kind == "audio" and "audio_stream" not in fields:
            fields.update(_ffprobe_audio_fields(stream))
    return _finish_info(path, fields)


def _ffprobe_video_fields(s: dict[str, Any]) -> dict[str, Any]:
    """MediaInfo fields of one video stream of ffprobe's JSON."""
    rotation = 0.0
    for sd in s.get("side_data_list", []) or []:
        if "rotation" in sd:
            rotation = float(sd["rotation"])
    if not rotation and "rotate" in s.get("tags", {}):
        rotation = -float(s["tags"]["rotate"])  # legacy tag is clockwise
    fps = _ratio(s.get("avg_frame_rate")) or _ratio(s.get("r_frame_rate"))
    return {
        "video_stream": int(s["index"]),
        "video_codec": s.get("codec_name"),
        "width": int(s["width"]) if s.get("width") else None,
        "height": int(s["height"]) if s.get("height") else None,
        "fps": _round2(fps),
        "sample_aspect_ratio": _ratio(s.get("sample_aspect_ratio")) or 1.0,
        "rotation": _norm_rotation(rotation),
    }


def _ffprobe_audio_fields(s: dict[str, Any]) -> dict[str, Any]:
    """MediaInfo fields of one audio stream of ffprobe's JSON."""
    return {
        "audio_stream": int(s["index"]),
        "audio_codec": s.get("codec_name"),
        "audio_sample_rate": int(s["sample_rate"]) if s.get("sample_rate") else None,
        "audio_channels": int(s["channels"]) if s.get("channels") else None,
    }


def _finish_info(path: Path, fields: dict[str, Any]) -> MediaInfo:
    fmt = fields["format_name"]
    if fmt in NOT_MEDIA_FORMATS:
        raise _unreadable(path, f"detected as {fmt!r}")
    if fmt == "image2" or fmt.endswith("_pipe"):  # ffmpeg's still-image demuxers
        kind = fmt.removesuffix("_pipe").upper() if fmt != "image2" else "still"
        raise MediaError(f"{path}: not a media file (a {kind} image, not a video)")
    fields["has_video"] = "video_stream" in fields
    fields["has_audio"] = "audio_stream" in fields
    if not (fields["has_video"] or fields["has_audio"]):
        raise _unreadable(path, "no audio or video stream")
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
    args += [*_input_options(), "-i", os.path.abspath(path)]
    _, stderr = _run_probe(args, path)  # exits 1 ("no output file") even when the input is fine
    lines = stderr.splitlines()
    header = _input_header(lines)
    if header is None:
        raise _unreadable(path, last_error_line(stderr, path))
    start, format_name = header
    fields: dict[str, Any] = {"path": str(path), "format_name": format_name, "duration": None}
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
            current = _add_ffmpeg_stream(int(m.group(1)), m.group(2), m.group(3), fields)
        elif current == "video":
            _add_ffmpeg_rotation(ln, fields)
    return _finish_info(path, fields)


def _input_header(lines: list[str]) -> tuple[int, str] | None:
    """(line index, format name) of the "Input #0" line of ffmpeg's banner, None if absent."""
    for i, ln in enumerate(lines):
        m = _INPUT_RE.match(ln)
        if m:
            return i, m.group(1)
    return None


def _add_ffmpeg_stream(index: int, kind: str, desc: str, fields: dict[str, Any]) -> str | None:
    """Add the fields of the first video / audio stream line to ``fields``; returns "video" or
    "audio" when this line was taken, None when it is skipped."""
    if kind == "Video" and "video_stream" not in fields and "(attached pic)" not in desc:
        size = _SIZE_RE.search(desc)
        sar = _SAR_RE.search(desc)
        fps = _FPS_RE.search(desc) or _TBR_RE.search(desc)
        fps_val = float(fps.group(1)) * (1000 if fps.group(2) else 1) if fps else None
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
        return "video"
    if kind == "Audio" and "audio_stream" not in fields:
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
        return "audio"
    return None


def _add_ffmpeg_rotation(line: str, fields: dict[str, Any]) -> None:
    """Rotation from a line inside the video stream's block: the display matrix wins over the
    legacy (clockwise) ``rotate`` tag."""
    m = _ROT_RE.search(line)
    if m:
        fields["rotation"] = _norm_rotation(float(m.group(1)))
        return
    m = _ROTATE_TAG_RE.match(line)
    if m and not fields.get("rotation"):
        fields["rotation"] = _norm_rotation(-float(m.group(1)))
