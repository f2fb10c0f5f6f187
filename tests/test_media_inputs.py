"""Awkward media inputs: an audio track shorter than the video, corrupt packets, an ffmpeg that
cannot run, and files that are no media at all (or only part of one).

The clips are made on the fly in a temporary folder with the ffmpeg the package finds
(``probe.ffmpeg_exe()``: the imageio-ffmpeg binary when there is no system one), from its lavfi
sources ``testsrc`` and ``sine``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from almt_pipeline import media
from almt_pipeline import probe as probing
from almt_pipeline.config import config_from_dict
from almt_pipeline.errors import DependencyError, MediaError
from almt_pipeline.extractors.cache import read_entry, write_entry
from almt_pipeline.extractors.clip import ClipExtractor
from almt_pipeline.extractors.runner import extract

FFMPEG = probing.ffmpeg_exe()
SYSTEM_FFPROBE = shutil.which("ffprobe")
W, H, FPS, SR = 160, 90, 25, 22050
VIDEO_S, SHORT_S = 4.0, 1.2  # the clip's length; the short track's
CORRUPT_BYTES = 4096
LOADER_MESSAGE = "error while loading shared libraries: libfoo.so: cannot open shared object file"
posix_only = pytest.mark.skipif(os.name != "posix", reason="the fake ffmpeg is a shell script")


def _make(out: Path, *args: str) -> Path:
    subprocess.run([FFMPEG, "-nostdin", "-y", "-loglevel", "error", *args, str(out)], check=True)
    return out


def _av(out: Path, video_s: float, audio_s: float, *extra: str) -> Path:
    return _make(
        out, "-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate={FPS}:duration={video_s}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={SR}:duration={audio_s}",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "1", *extra,
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    faststart = ("-movflags", "+faststart")
    c = {
        "good": _av(d / "good.mp4", VIDEO_S, VIDEO_S, *faststart),
        "short_audio": _av(d / "short_audio.mp4", VIDEO_S, SHORT_S, *faststart),
        "short_video": _av(d / "short_video.mp4", SHORT_S, VIDEO_S, *faststart),
        "moov_at_end": _av(d / "moov_at_end.mp4", VIDEO_S, VIDEO_S),
    }
    # written to a pipe, so the Matroska header cannot say how long the clip is
    with open(d / "short_audio_no_duration.mkv", "wb") as out:
        subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-i", str(c["short_audio"]),
                        "-c", "copy", "-f", "matroska", "pipe:"], stdout=out, check=True)
    c["short_audio_no_duration"] = d / "short_audio_no_duration.mkv"
    rng = random.Random(0)
    data = bytearray(c["good"].read_bytes())
    mid = len(data) // 2  # inside the media data: the header (moov first) stays intact
    data[mid : mid + CORRUPT_BYTES] = bytes(rng.randrange(256) for _ in range(CORRUPT_BYTES))
    c["corrupt"] = d / "corrupt.mp4"
    c["corrupt"].write_bytes(bytes(data))
    whole = c["good"].read_bytes()
    c["cut_faststart"] = d / "cut_faststart.mp4"  # header intact, media data cut
    c["cut_faststart"].write_bytes(whole[: len(whole) // 2])
    tail = c.pop("moov_at_end").read_bytes()
    c["cut_moov_at_end"] = d / "cut_moov_at_end.mp4"  # the header (at the end) is cut off
    c["cut_moov_at_end"].write_bytes(tail[: len(tail) // 2])
    c["text"] = d / "notes.mp4"
    c["text"].write_text("this is not a video\nsecond line\n", encoding="utf-8")
    c["json"] = d / "data.mp4"
    c["json"].write_text('{"clip": 1, "label": 0.5}\n', encoding="utf-8")
    c["png"] = d / "image.mp4"
    _make(d / "image.png", "-f", "lavfi", "-i", "testsrc=size=32x32", "-frames:v", "1")
    shutil.copy(d / "image.png", c["png"])
    c["random"] = d / "random.mp4"
    c["random"].write_bytes(bytes(rng.randrange(256) for _ in range(20_000)))
    c["empty"] = d / "empty.mp4"
    c["empty"].write_bytes(b"")
    return c


def _cfg():
    from almt_pipeline.extractors.visual import LANDMARKS_FEATURE_NAMES

    model = {"text_len": 16, "audio_len": 64, "vision_len": 4, "audio_dim": 33,
             "vision_dim": len(LANDMARKS_FEATURE_NAMES)}
    return config_from_dict({"model": model, "extract": {"visual": {"fps": 2.0, "max_side": 160}}})


@pytest.fixture(scope="module")
def extractor() -> ClipExtractor:
    return ClipExtractor(_cfg())


def _warnings(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and str(path) in r.getMessage()]


# ------------------------------------------------------------------ short audio track


@pytest.mark.parametrize("name", ["short_audio", "short_audio_no_duration"])
def test_short_audio_track_is_padded_to_the_video(extractor, clips, caplog, name):
    path = clips[name]
    with caplog.at_level(logging.WARNING):
        r = extractor(path, "a transcript")
    sr, hop = extractor.audio_featurizer.sample_rate, extractor.cfg.extract.audio.hop_length
    assert r.duration == pytest.approx(VIDEO_S, abs=0.05)
    assert r.audio.shape[0] * hop / sr == pytest.approx(VIDEO_S, abs=0.1)  # features cover the clip
    assert np.isfinite(r.audio).all()
    assert r.audio_padded == pytest.approx(VIDEO_S - SHORT_S, abs=0.1)
    full = extractor(clips["good"], "a transcript")
    assert r.audio.shape == full.audio.shape and full.audio_padded == 0.0
    warned = _warnings(caplog, path)
    assert len(warned) == 1 and "padded 2.8 s" in warned[0], warned


def test_truncated_or_short_video_is_still_rejected(extractor, clips):
    with pytest.raises(MediaError, match="file truncated") as err:
        extractor(clips["cut_faststart"], "a transcript")  # both streams stop at the cut
    assert str(clips["cut_faststart"]) in str(err.value)
    with pytest.raises(MediaError, match=r"video decoded 1\.\d s of 4\.0 s while the audio goes on"):
        extractor(clips["short_video"], "a transcript")


# ------------------------------------------------------------------ corrupt packets


def test_corrupt_packets_are_counted_and_the_clip_kept(extractor, clips, caplog, tmp_path):
    path = clips["corrupt"]
    with caplog.at_level(logging.WARNING):
        r = extractor(path, "a transcript")
    assert r.decode_errors > 0 and r.vision.shape[0] > 0
    assert r.duration == pytest.approx(VIDEO_S, abs=0.05)
    warned = _warnings(caplog, path)
    assert len(warned) == 1 and f"{r.decode_errors} decode error" in warned[0], warned
    entry = tmp_path / "entry.npz"  # the count survives the per-clip cache
    write_entry(entry, r)
    cached = read_entry(entry)
    assert (cached.decode_errors, cached.audio_padded) == (r.decode_errors, r.audio_padded)


def test_decoders_count_errors(clips):
    info = probing.probe(clips["corrupt"])
    audio = media.decode_audio(clips["corrupt"], 16000, info=info)
    with media.iter_frames(clips["corrupt"], 5, 64, info=info) as frames:
        n = sum(1 for _ in frames)
    assert n == VIDEO_S * 5 and audio.decode_errors + frames.log.decode_errors > 0
    assert (audio.first_error or frames.log.first_error) and "\n" not in audio.first_error
    assert media.decode_audio(clips["good"], 16000).decode_errors == 0
    with media.iter_frames(clips["good"], 5, 64) as frames:
        assert sum(1 for _ in frames) == VIDEO_S * 5 and frames.log.decode_errors == 0


def test_ffmpeg_log_counts_repeated_errors():
    log = media.FfmpegLog()
    for line in [b"[h264 @ 0x1] [error] Invalid NAL unit size (12 > 5).\n",
                 *[b"[vist#0:0/h264 @ 0x2] [dec:h264 @ 0x3] [error] Error submitting packet to decoder: "
                   b"Invalid data found when processing input\n"] * 3,
                 b"some untagged line\n"]:
        log.add(line)
    assert (log.decode_errors, log.error_lines) == (3, 4)
    assert log.first_error == "Invalid NAL unit size (12 > 5)."
    assert log.lines[-1] == "some untagged line" and "[error]" not in log.text()


# ------------------------------------------------------------------ ffmpeg that cannot run


def _fake(tmp_path: Path, name: str, body: str, mode: int = 0o755) -> Path:
    exe = tmp_path / name
    exe.write_text(f'#!/bin/sh\necho "$0" >> "{tmp_path}/calls"\n{body}\n', encoding="utf-8")
    exe.chmod(mode)
    return exe


FAKES = {
    "missing-library": (f'echo "$0: {LOADER_MESSAGE}" >&2; exit 127', 0o755, "libfoo.so"),
    "killed-at-start": ("kill -SEGV $$", 0o755, "signal 11"),
    "not-executable": ("exit 0", 0o644, "Permission denied"),
}


@posix_only
@pytest.mark.parametrize("kind", list(FAKES))
def test_ffmpeg_that_cannot_run_is_a_dependency_error(clips, tmp_path, monkeypatch, kind):
    body, mode, message = FAKES[kind]
    info = probing.probe(clips["good"])  # with the working ffmpeg
    monkeypatch.setenv("ALMT_FFMPEG", str(_fake(tmp_path, "ffmpeg", body, mode)))
    monkeypatch.setenv("ALMT_FFPROBE", "none")
    with pytest.raises(DependencyError, match=message):
        probing.probe(clips["good"])
    with pytest.raises(DependencyError, match=message):
        media.load_audio(clips["good"], 16000, info=info)
    with pytest.raises(DependencyError, match=message):
        list(media.iter_frames(clips["good"], 5, 64, info=info))


@posix_only
def test_ffprobe_that_cannot_run_is_a_dependency_error(clips, tmp_path, monkeypatch):
    monkeypatch.setenv("ALMT_FFPROBE", str(_fake(tmp_path, "ffprobe", FAKES["missing-library"][0])))
    with pytest.raises(DependencyError, match="libfoo.so.*ALMT_FFPROBE") as err:
        probing.probe(clips["good"])
    assert "\n" not in str(err.value)


@posix_only
def test_unrunnable_ffmpeg_stops_the_batch_once(clips, tmp_path, monkeypatch):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        shutil.copy(clips["good"], folder / f"{name}.mp4")
        (folder / f"{name}.txt").write_text("a transcript", encoding="utf-8")
    fakes = tmp_path / "bin"
    fakes.mkdir()
    monkeypatch.setenv("ALMT_FFMPEG", str(_fake(fakes, "ffmpeg", FAKES["missing-library"][0])))
    monkeypatch.setenv("ALMT_FFPROBE", "none")
    with pytest.raises(DependencyError, match="libfoo.so"):
        extract(folder, tmp_path / "out" / "features.pkl", _cfg(), quiet=True)
    # the first clip stopped the batch: one call for it, and at most one for the next clip, which
    # is opened ahead while the first is extracted
    assert 1 <= len((fakes / "calls").read_text().splitlines()) <= 2


# ------------------------------------------------------------------ not media, or part of one


BINARIES = [pytest.param((FFMPEG, "none"), id="ffmpeg-only")]
if SYSTEM_FFPROBE:
    BINARIES.append(pytest.param((FFMPEG, SYSTEM_FFPROBE), id="ffprobe"))


@pytest.mark.parametrize("binaries", BINARIES)
@pytest.mark.parametrize(
    "name, message",
    [
        ("text", r"not a media file \(a text file starting 'this is not a video'\)"),
        ("json", r"not a media file \(a JSON file starting '\{\"clip\": 1"),
        ("png", r"not a media file \(a PNG image, not a video\)"),
        ("random", r"not a media file or unreadable \(no audio or video format recognised\)"),
        ("empty", r"empty file \(0 bytes\)"),
        ("cut_moov_at_end", r"incomplete MP4/MOV file \(moov atom not found; truncated"),
    ],
)
def test_unusable_files_get_a_precise_message(clips, monkeypatch, binaries, name, message):
    exe, ffprobe = binaries
    monkeypatch.setenv("ALMT_FFMPEG", exe)
    monkeypatch.setenv("ALMT_FFPROBE", ffprobe)
    path = clips[name]
    with pytest.raises(MediaError, match=message) as err:
        probing.probe(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text
    if name in ("text", "json", "png", "random"):
        assert "truncated" not in text and "MP4" not in text
