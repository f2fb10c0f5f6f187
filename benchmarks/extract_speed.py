"""Extraction speed and memory.

Speed: per-stage and total real-time factor (clip seconds / processing seconds; model loading and
the first, warming call excluded) of ``ClipExtractor`` on a 640x360 clip with speech, with the
transcript given (the default path) and through speech recognition.
Memory: peak RSS of a fresh process extracting a 1-minute and a 10-minute clip (the 640x360 clip
looped), to show that memory does not grow with clip length.

Usage: python benchmarks/extract_speed.py [--threads 2] [--repeats 3] [--config default]
       [--video PATH] [--skip-memory] [--skip-asr]
Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_VIDEO = REPO.parent / "shared" / "media" / "WolfgangLanger_Pexels.mp4"
SPEECH_TEXT = (
    "I went to see the new film last night and honestly I did not expect much. "
    "The first half was slow and a little sad, and I almost left. "
    "But then the story turned around, the acting was wonderful, and by the end "
    "I was laughing with everyone else in the room. I would happily watch it again."
)
TARGET_RTF = 10.0
TARGET_PEAK_MB = 2048.0
FLAT_TOLERANCE_MB = 100.0  # growth from 1 to 10 minutes still called flat
STAGES = ("probe", "audio_decode", "audio", "text", "video_decode", "face")


def _run(args: list[str]) -> None:
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL, capture_output=True)


def build_speech_clip(video: Path, out: Path) -> Path:
    """The video with espeak-ng speech as its audio track (speech padded with silence)."""
    from almt_pipeline.probe import ffmpeg_exe

    wav = out.with_suffix(".wav")
    _run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), SPEECH_TEXT])
    _run([ffmpeg_exe(), "-y", "-nostdin", "-loglevel", "error", "-i", str(video), "-i", str(wav),
          "-filter_complex", "[1:a]apad[a]", "-map", "0:v:0", "-map", "[a]", "-c:v", "copy",
          "-c:a", "aac", "-b:a", "96k", "-shortest", str(out)])
    return out


def loop_clip(clip: Path, seconds: float, out: Path) -> Path:
    from almt_pipeline.probe import ffmpeg_exe

    _run([ffmpeg_exe(), "-y", "-nostdin", "-loglevel", "error", "-stream_loop", "-1", "-i", str(clip),
          "-t", f"{seconds:g}", "-c", "copy", str(out)])
    return out


def bench_config(name: str, quiet: bool = False):
    """The named config, with model widths set to what the extractors produce (a benchmark only
    measures extraction, so a width mismatch in the config must not stop it)."""
    from almt_pipeline.config import load_config, replace_config
    from almt_pipeline.extractors.audio import AudioFeaturizer
    from almt_pipeline.extractors.faces import make_face_featurizer

    cfg = load_config(name)
    a = AudioFeaturizer(cfg.extract.audio).dim
    v = make_face_featurizer(cfg.extract.visual).dim
    if (a, v) != (cfg.model.audio_dim, cfg.model.vision_dim):
        if not quiet:
            print(f"note: config {name!r} has audio_dim {cfg.model.audio_dim}, vision_dim "
                  f"{cfg.model.vision_dim}; the extractors give {a}, {v} (used here)")
        cfg = replace_config(cfg, model={"audio_dim": a, "vision_dim": v})
    return cfg


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    import cv2

    cv2.setNumThreads(n)


def speed(cfg, clip: Path, repeats: int, threads: int, asr: bool) -> None:
    from almt_pipeline.extractors.clip import ClipExtractor
    from almt_pipeline.probe import probe

    duration = float(probe(clip).duration)
    t = time.perf_counter()
    ex = ClipExtractor(cfg, threads=threads)
    print(f"load models: {time.perf_counter() - t:.1f} s (excluded below)")
    ex(clip, SPEECH_TEXT)  # warm-up: numba kernels, first model calls
    runs, cpu_self, cpu_children = [], [], []
    for _ in range(repeats):
        c0, k0 = time.process_time(), _children_cpu()
        runs.append(ex(clip, SPEECH_TEXT).timings)
        cpu_self.append(time.process_time() - c0)
        cpu_children.append(_children_cpu() - k0)
    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in (*STAGES, "total")}
    w, h = _size(clip)
    vis = cfg.extract.visual
    print(f"clip: {clip.name} {w}x{h} {duration:.1f} s; visual {vis.backend} at {vis.fps:g} fps, "
          f"max_side {vis.max_side}; {threads} threads; median of {repeats}")
    for k in STAGES:
        rtf = duration / med[k] if med[k] > 0 else float("inf")
        print(f"stage {k:<13} {med[k]:7.3f} s  {rtf:8.1f}x real time")
    total_rtf = duration / med["total"]
    ok = "meets" if total_rtf >= TARGET_RTF else "MISSES"
    print(f"total (transcript given) {med['total']:7.3f} s  {total_rtf:8.1f}x real time "
          f"({ok} the {TARGET_RTF:g}x target)")
    py, ff = statistics.median(cpu_self), statistics.median(cpu_children)
    print(f"cpu time (transcript given): python {py:.3f} s, ffmpeg {ff:.3f} s; on otherwise idle "
          f"cores the python process bounds the wall time: ~{duration / py:.1f}x real time")
    if asr:
        _ = ex.transcriber  # load outside the timing
        ex(clip)  # warm-up
        runs = [ex(clip).timings for _ in range(repeats)]
        t_asr = statistics.median(r["asr"] for r in runs)
        t_tot = statistics.median(r["total"] for r in runs)
        print(f"stage asr           {t_asr:7.3f} s  {duration / t_asr:8.1f}x real time "
              f"({cfg.extract.asr_model})")
        print(f"total (with ASR)         {t_tot:7.3f} s  {duration / t_tot:8.1f}x real time")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # ffmpeg processes that have exited
    return r.ru_utime + r.ru_stime


def _size(clip: Path) -> tuple[int, int]:
    from almt_pipeline.probe import probe

    info = probe(clip)
    return info.width or 0, info.height or 0


def memory_child(clip: Path, config: str, threads: int) -> None:
    """Runs in a fresh process: extract one clip, print peak RSS as JSON."""
    from almt_pipeline.extractors.clip import ClipExtractor

    _set_threads(threads)
    cfg = bench_config(config, quiet=True)
    ex = ClipExtractor(cfg, threads=threads)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    r = ex(clip, SPEECH_TEXT)
    secs = time.perf_counter() - t
    print(json.dumps({
        "after_load_mb": base,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": secs, "duration": r.duration,
        "audio_frames": int(r.audio.shape[0]), "vision_frames": int(r.vision.shape[0]),
    }))


def memory(clip: Path, tmp: Path, config: str, threads: int) -> None:
    peaks = {}
    for minutes in (1, 10):
        long_clip = loop_clip(clip, 60 * minutes, tmp / f"loop_{minutes}min.mp4")
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(long_clip), "--config", config,
             "--threads", str(threads)],
            check=True, capture_output=True, text=True,
        )
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        peaks[minutes] = m["peak_mb"]
        print(f"memory {minutes:>2}-minute clip: peak RSS {m['peak_mb']:.0f} MB (after model load "
              f"{m['after_load_mb']:.0f} MB); extracted in {m['seconds']:.1f} s = "
              f"{m['duration'] / m['seconds']:.1f}x real time (cold process, first call)")
    growth = peaks[10] - peaks[1]
    ok = "meets" if peaks[10] < TARGET_PEAK_MB else "MISSES"
    flat = "flat" if growth < FLAT_TOLERANCE_MB else "NOT flat"
    print(f"memory growth 1 -> 10 minutes: {growth:+.0f} MB ({flat}; peak {ok} the "
          f"{TARGET_PEAK_MB / 1024:g} GB target)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="640x360 video to put speech on")
    p.add_argument("--config", default="default")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the target is for 2 cores)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-asr", action="store_true")
    p.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.memory_child:
        memory_child(args.memory_child, args.config, args.threads)
        return

    _set_threads(args.threads)
    cfg = bench_config(args.config)
    print(f"cpu cores visible: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="almt-bench-") as d:
        tmp = Path(d)
        clip = build_speech_clip(args.video, tmp / "speech_640x360.mp4")
        speed(cfg, clip, args.repeats, args.threads, asr=not args.skip_asr)
        if not args.skip_memory:
            memory(clip, tmp, args.config, args.threads)


if __name__ == "__main__":
    main()
