"""probe.py and media.py: probing with and without ffprobe, audio decoding, frame streaming,
read-ahead, bad files.

Clips are generated on the fly with ffmpeg's lavfi sources through imageio-ffmpeg's binary (the
one a plain pip install has), so these tests need nothing from the system.
"""

from __future__ import annotations

import gc
import logging
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from almt_pipeline import media
from almt_pipeline import probe as probing
from almt_pipeline.errors import DependencyError, MediaError

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
BUNDLED = imageio_ffmpeg.get_ffmpeg_exe()
SYSTEM_FFMPEG = shutil.which("ffmpeg")
SYSTEM_FFPROBE = shutil.which("ffprobe")

W, H, FPS, SECONDS, SR = 160, 90, 25, 2, 44100


def _make(out: Path, *args: str) -> Path:
    subprocess.run([BUNDLED, "-nostdin", "-y", "-loglevel", "error", *args, str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    video = ["-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate={FPS}:duration={SECONDS}"]
    audio = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={SR}:duration={SECONDS}"]
    enc = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    c = {}
    c["av"] = _make(d / "av.mp4", *video, *audio, *enc, "-c:a", "aac", "-ac", "2", "-movflags", "+faststart")
    c["rotated"] = _make(d / "rotated.mp4", "-display_rotation", "90", "-i", str(c["av"]), "-c", "copy")
    c["video_only"] = _make(d / "video_only.mp4", *video, *enc)
    c["audio_only"] = _make(d / "audio_only.m4a", *audio, "-c:a", "aac")
    c["six_channels"] = _make(d / "six.wav", *audio, "-ac", "6")
    c["vfr"] = _make(  # 1 s at 30 fps then 2 s at 5 fps: 40 frames over 3 s
        d / "vfr.mkv", "-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate=30:duration=1",
        "-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate=5:duration=2",
        "-filter_complex", "[0:v][1:v]concat=n=2:v=1[v]", "-map", "[v]", "-fps_mode", "vfr", *enc,
    )
    data = c["av"].read_bytes()
    c["truncated"] = d / "truncated.mp4"
    c["truncated"].write_bytes(data[: len(data) // 3])  # header intact (faststart), data cut
    c["empty"] = d / "empty.mp4"
    c["empty"].write_bytes(b"")
    c["text"] = d / "notes.mp4"
    c["text"].write_text("this is not a video\n")
    return c


BINARIES = [pytest.param((BUNDLED, "none"), id="bundled-no-ffprobe")]
if SYSTEM_FFMPEG and SYSTEM_FFPROBE:
    BINARIES.append(pytest.param((SYSTEM_FFMPEG, SYSTEM_FFPROBE), id="system-ffprobe"))


@pytest.fixture(params=BINARIES)
def ffmpeg_bin(request, monkeypatch):
    exe, probe_exe = request.param
    monkeypatch.setenv("ALMT_FFMPEG", exe)
    monkeypatch.setenv("ALMT_FFPROBE", probe_exe)
    return exe


def test_ffmpeg_exe_env_and_fallback(monkeypatch):
    monkeypatch.setenv("ALMT_FFMPEG", BUNDLED)
    assert probing.ffmpeg_exe() == BUNDLED
    monkeypatch.setenv("ALMT_FFMPEG", "/nonexistent/ffmpeg")
    with pytest.raises(DependencyError, match="ALMT_FFMPEG"):
        probing.ffmpeg_exe()
    monkeypatch.delenv("ALMT_FFMPEG")
    monkeypatch.setenv("PATH", "/nonexistent")  # no system ffmpeg: the bundled one is used
    assert probing.ffmpeg_exe() == BUNDLED
    monkeypatch.setenv("ALMT_FFPROBE", "none")
    assert probing.ffprobe_exe() is None


def test_probe_good_clip(clips, ffmpeg_bin):
    info = probing.probe(clips["av"], need_audio=True, need_video=True)
    assert (info.has_audio, info.has_video) == (True, True)
    assert (info.width, info.height, info.fps, info.rotation) == (W, H, FPS, 0)
    assert info.duration == pytest.approx(SECONDS, abs=0.1)
    assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    assert (info.audio_sample_rate, info.audio_channels) == (SR, 2)
    rot = probing.probe(clips["rotated"])
    assert rot.rotation in (90, -90) and (rot.width, rot.height) == (W, H)
    assert rot.display_size == (H, W)
    assert probing.probe(clips["six_channels"]).audio_channels == 6


@pytest.mark.skipif(not SYSTEM_FFPROBE, reason="no ffprobe on PATH")
def test_ffprobe_and_ffmpeg_parsing_agree(clips):
    names = ["av", "rotated", "video_only", "audio_only", "six_channels", "vfr", "truncated"]
    for name in names:
        path = clips[name]
        via_ffprobe = probing._probe_ffprobe(path, SYSTEM_FFPROBE)
        for exe in filter(None, {BUNDLED, SYSTEM_FFMPEG}):
            assert probing._probe_ffmpeg(path, exe) == via_ffprobe, (name, exe)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("missing", {}, "file not found"),
        ("empty", {}, "empty file"),
        ("text", {}, "not a media file"),
        ("video_only", {"need_audio": True}, "no audio stream"),
        ("audio_only", {"need_video": True}, "no video stream"),
    ],
)
def test_probe_errors_name_the_file(clips, ffmpeg_bin, tmp_path, name, kwargs, message):
    path = clips.get(name, tmp_path / "missing.mp4")
    with pytest.raises(MediaError, match=message) as err:
        probing.probe(path, **kwargs)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_audio_mono_resampled(clips, ffmpeg_bin):
    sr = 16000
    wave = media.load_audio(clips["av"], sr)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) / sr == pytest.approx(SECONDS, abs=0.1)
    assert 0.05 < np.abs(wave).max() < 1.0
    six = media.load_audio(clips["six_channels"], sr)  # 6 channels downmixed to one
    assert six.ndim == 1 and len(six) / sr == pytest.approx(SECONDS, abs=0.05)
    assert np.isfinite(six).all() and np.abs(six).max() > 0.01


def test_load_audio_errors(clips, ffmpeg_bin):
    with pytest.raises(MediaError, match="no audio stream"):
        media.load_audio(clips["video_only"], 16000)
    with pytest.raises(MediaError, match="not a media file"):
        media.load_audio(clips["text"], 16000)


def test_iter_frames_sampling_and_size(clips, ffmpeg_bin):
    fps, max_side = 10, 64
    with media.iter_frames(clips["av"], fps, max_side) as stream:
        frames = list(stream)
    assert len(frames) == SECONDS * fps and stream.n_frames == len(frames)
    assert stream.decoded_duration == pytest.approx(SECONDS)
    times = [t for t, _ in frames]
    assert times == pytest.approx([i / fps for i in range(len(frames))])
    h, w, c = frames[0][1].shape
    assert (w, h, c) == (64, 36, 3) and frames[0][1].dtype == np.uint8  # 160x90 scaled, even sides
    assert media.frame_size((W, H), None) == (W, H)
    w_odd, h_odd = media.frame_size((101, 51), 1000)
    assert w_odd % 2 == h_odd % 2 == 0 and abs(w_odd - 101) <= 1 and abs(h_odd - 51) <= 1


def test_iter_frames_rotation_applied(clips, ffmpeg_bin):
    upright = [f for _, f in media.iter_frames(clips["av"], 5, None)]
    rotated = [f for _, f in media.iter_frames(clips["rotated"], 5, None)]
    assert rotated[0].shape == (W, H, 3)
    k = 1 if probing.probe(clips["rotated"]).rotation == 90 else 3
    diff = np.abs(np.rot90(upright[3], k).astype(int) - rotated[3].astype(int)).mean()
    assert diff < 1.0


def test_iter_frames_variable_frame_rate(clips, ffmpeg_bin):
    stream = media.iter_frames(clips["vfr"], 10, None)
    n = sum(1 for _ in stream)
    assert abs(n - 30) <= 2  # by timestamp: 3 s at 10 fps, not the 40 source frames


def test_iter_frames_stops_ffmpeg_early(clips, ffmpeg_bin):
    stream = media.iter_frames(clips["av"], 25, None)
    next(stream)
    proc = stream._proc
    stream.close()
    assert proc.poll() is not None and proc.stdout.closed
    stream2 = media.iter_frames(clips["av"], 25, None)
    for _ in stream2:
        break
    proc2 = stream2._proc
    del stream2  # consumer dropped the iterator: ffmpeg is stopped too
    gc.collect()
    assert proc2.poll() is not None


def test_iter_frames_errors(clips, ffmpeg_bin):
    with pytest.raises(MediaError, match="no video stream"):
        media.iter_frames(clips["audio_only"], 10, 64)
    with pytest.raises(MediaError, match="empty file"):
        media.iter_frames(clips["empty"], 10, 64)


def test_truncated_file_is_detected(clips, ffmpeg_bin):
    info = probing.probe(clips["truncated"])
    assert info.duration == pytest.approx(SECONDS, abs=0.1)  # the header still says 2 s
    stream = media.iter_frames(clips["truncated"], 10, 64, info=info)
    n = sum(1 for _ in stream)
    assert 0 < n < SECONDS * 10
    problem = media.decoded_duration_problem(info.duration, stream.decoded_duration)
    assert problem is not None and "truncated" in problem
    audio = media.load_audio(clips["truncated"], 16000, info=info)
    assert media.decoded_duration_problem(info.duration, len(audio) / 16000) is not None


def test_decoded_duration_tolerance():
    assert media.decoded_duration_problem(9.8, 9.7) is None
    assert media.decoded_duration_problem(None, 1.0) is None
    assert media.decoded_duration_problem(9.8, 2.1) == "decoded 2.1 s of 9.8 s (file truncated?)"


# ------------------------------------------------------------------------------- read-ahead


def _three_then_fail():
    for i in range(3):
        yield float(i), np.full((2, 2, 3), i, np.uint8)
    raise MediaError("decoding failed")


def test_prefetched_frames_hands_out_items_then_the_error():
    frames = media.PrefetchedFrames(_three_then_fail(), depth=2)
    got = []
    with pytest.raises(MediaError, match="decoding failed"):
        for t, frame in frames:
            got.append((t, int(frame[0, 0, 0])))
    assert got == [(0.0, 0), (1.0, 1), (2.0, 2)] and frames.count == 3
    assert frames.wait_seconds >= 0.0
    assert next(frames, None) is None  # finished: no further items, no second error
    frames.close()


def test_prefetched_frames_end_of_stream():
    with media.PrefetchedFrames(iter([(0.0, np.zeros((1, 1, 3), np.uint8))]), depth=4) as frames:
        assert [t for t, _ in frames] == [0.0]
    assert frames.count == 1
    with pytest.raises(ValueError, match="depth"):
        media.PrefetchedFrames(iter([]), depth=0)


class BlockingSource:
    """A frame source whose reads block until ``close()``, like ffmpeg's pipe with no data yet;
    after being closed it logs a warning, as a decoder killed mid-stream does."""

    def __init__(self):
        self.released = threading.Event()
        self.reads = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.reads:
            self.released.wait(timeout=30)
            logging.getLogger("almt_pipeline.media").warning("decoding stopped (closing)")
            raise StopIteration
        self.reads += 1
        return 0.0, np.zeros((1, 1, 3), np.uint8)

    def close(self):
        self.released.set()


def test_prefetched_frames_close_stops_a_blocked_reader(caplog):
    source = BlockingSource()
    frames = media.PrefetchedFrames(source, depth=1)
    assert next(frames)[0] == 0.0
    time.sleep(0.05)  # the reader is now blocked inside the source
    with caplog.at_level(logging.WARNING, logger="almt_pipeline.media"):
        start = time.perf_counter()
        frames.close()
    assert time.perf_counter() - start < 5 and not frames._thread.is_alive()
    assert source.released.is_set()
    assert not [r for r in caplog.records if "closing" in r.getMessage()]
    assert next(frames, None) is None and frames.count == 1


def test_prefetched_frames_close_stops_a_producer_waiting_for_room():
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield 0.0, np.zeros((1, 1, 3), np.uint8)
        finally:
            closed.set()

    frames = media.PrefetchedFrames(endless(), depth=1)
    next(frames)
    frames.close()  # the reader waits for room in the queue: the stop flag ends it
    assert not frames._thread.is_alive() and closed.is_set()


def test_prefetched_frames_over_a_frame_stream(clips, ffmpeg_bin):
    stream = media.iter_frames(clips["av"], 10, 64)
    frames = media.PrefetchedFrames(stream, depth=4)
    first = next(frames)
    assert first[1].shape == (36, 64, 3)
    proc = stream._proc
    frames.close()  # stops ffmpeg early
    assert proc.poll() is not None and frames.count == 1
