"""Latency of `almt predict` on a 10-second clip: cold (new process) and warm (models loaded).

    python benchmarks/predict_latency.py [--checkpoint DIR] [--repeats 5] [--breakdown N]

Without --checkpoint, a small checkpoint is trained first on the bundled sample dataset (two
epochs; the weights do not matter for latency). The 10-second clip is made by looping
samples/new_clip.mp4 with ffmpeg. Two transcript cases are measured: a sidecar .txt transcript
(speech recognition skipped) and no transcript (Whisper tiny.en runs). Targets on 2 CPU cores:
cold <= 10 s, warm <= 2 s. One line per measurement, with the 1-minute load average before it
(other work on the machine slows every figure). A cold line also splits the time into the clip's
own extraction and scoring (the ``total`` timing `almt predict --json` reports) and the rest:
Python start-up, imports and model loading.

``--breakdown N`` runs N more cold processes on the clip without a transcript, each doing what
`almt predict CLIP --checkpoint D --quiet` does with every step of the main thread timed (wall
and that thread's CPU seconds), and prints the median of each step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"


def make_clip(dst: Path, seconds: float) -> None:
    from almt_pipeline.probe import ffmpeg_exe

    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-stream_loop", "-1", "-i",
           str(SAMPLES / "new_clip.mp4"), "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast",
           "-c:a", "aac", str(dst)]
    subprocess.run(cmd, check=True)


def train_checkpoint(work: Path) -> Path:
    from almt_pipeline.config import load_config, replace_config
    from almt_pipeline.extractors.runner import extract
    from almt_pipeline.train import train

    cfg = replace_config(load_config("default"), train={"epochs": 2})
    features = work / "features.pkl"
    extract(SAMPLES / "sample_dataset", features, cfg, quiet=True)
    train(cfg, features, work / "run", quiet=True)
    return work / "run" / "checkpoint"


def cold(clip: Path, checkpoint: Path, repeats: int) -> tuple[list[float], list[float]]:
    """Wall times of new `almt predict` processes, and the clip's own share of each."""
    times, clip_times = [], []
    almt = Path(sys.executable).with_name("almt")
    for _ in range(repeats):
        t = time.perf_counter()
        out = subprocess.run([str(almt), "predict", str(clip), "--checkpoint", str(checkpoint), "--quiet", "--json"],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        times.append(time.perf_counter() - t)
        clip_times.append(json.loads(out.splitlines()[-1])["timings"]["total"])
    return times, clip_times


def load_average() -> str:
    return f"load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load ?"


def warm(clip: Path, checkpoint: Path, repeats: int) -> tuple[float, list[float]]:
    from almt_pipeline import Predictor

    t = time.perf_counter()
    p = Predictor(checkpoint, device="cpu", preload_asr=not clip.with_suffix(".txt").exists())
    p.predict(clip)  # first call pays one-time costs (JIT, lazy ASR load)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        p.predict(clip)
        times.append(time.perf_counter() - t)
    return first, times


def steps(clip: Path, checkpoint: Path) -> None:
    """In this (new) process, what `almt predict CLIP --checkpoint D --quiet` runs, printing one JSON
    object: seconds (wall, main-thread CPU) per step, and the clip's own timings."""
    t0 = time.perf_counter()
    rows: dict[str, tuple[float, float]] = {}

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                rows[label] = (time.perf_counter() - t, time.thread_time() - c)
        return run

    timed("import almt_pipeline.cli (typer, config)", lambda: __import__("almt_pipeline.cli"))()
    from almt_pipeline.cli_common import setup_logging

    timed("setup_logging (imports transformers)", setup_logging)(True)
    timed("import prediction (imports torch)", lambda: __import__("almt_pipeline.prediction"))()
    from almt_pipeline import prediction
    from almt_pipeline.model import checkpoint as ckpt_module

    for module, name, label in (
        (ckpt_module, "bert_config_from_dict", "checkpoint: text model config (transformers' config code)"),
        (ckpt_module, "text_model_from_config", "checkpoint: BERT model (transformers' BERT) and its init"),
        (ckpt_module, "_load_weights", "checkpoint: weights"),
        (ckpt_module, "_load_tokenizer", "checkpoint: tokenizer"),
        (prediction, "_make_extractor", "extractors (dlib)"),
    ):
        setattr(module, name, timed(label, getattr(module, name)))
    clips = prediction.list_inputs(clip)
    asr = prediction.start_loading_asr(checkpoint) if prediction.needs_asr(clips) else None
    loaded: list[float] = []
    if asr is not None:
        asr.add_done_callback(lambda _: loaded.append(time.perf_counter() - t0))
    p = timed("Predictor (all of its loading)", prediction.Predictor)(checkpoint, transcriber=asr)
    result = timed("the clip", p.predict_many)(clips)[0]
    print(json.dumps({"steps": rows, "clip": result.timings, "score": result.score,
                      "whisper_loaded_at": loaded[0] if loaded else None,
                      "total": time.perf_counter() - t0, "main_cpu": time.thread_time()}))


def breakdown(clip: Path, checkpoint: Path, repeats: int) -> None:
    """Median seconds per step over ``repeats`` new processes (see :func:`steps`)."""
    runs, loads = [], []
    for _ in range(repeats):
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
        out = subprocess.run([sys.executable, __file__, "--steps", str(clip), "--checkpoint", str(checkpoint)],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        runs.append(json.loads(out.splitlines()[-1]))
    print(f"breakdown of a cold run, speech recognition: medians of {repeats} runs "
          f"(load {min(loads):.2f}-{max(loads):.2f}); seconds wall / main-thread CPU")
    for label in runs[0]["steps"]:
        wall = statistics.median(r["steps"][label][0] for r in runs)
        cpu = statistics.median(r["steps"][label][1] for r in runs)
        print(f"  {label:58s} {wall:6.2f} / {cpu:5.2f}")
    for key in runs[0]["clip"]:
        print(f"  {'the clip: ' + key:58s} {statistics.median(r['clip'].get(key, 0.0) for r in runs):6.2f}")
    for key in ("whisper_loaded_at", "main_cpu", "total"):
        values = [r[key] for r in runs if r[key] is not None]
        if values:
            print(f"  {key:58s} {statistics.median(values):6.2f}")
    print(f"  scores: {sorted({r['score'] for r in runs})}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: train a small one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--breakdown", type=int, default=0, metavar="N",
                    help="also time each step of N cold runs with speech recognition")
    ap.add_argument("--steps", type=Path, help=argparse.SUPPRESS)  # one timed run, in a new process
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.steps is not None:
        steps(args.steps, args.checkpoint)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or train_checkpoint(work)
        with_txt = work / "with_transcript.mp4"
        make_clip(with_txt, args.seconds)
        with_txt.with_suffix(".txt").write_text(
            "This was a wonderful film and I enjoyed every minute of it.\n")
        no_txt = work / "no_transcript.mp4"
        make_clip(no_txt, args.seconds)

        print(f"# {os.cpu_count()} CPU cores, clip {args.seconds:.0f} s, checkpoint {checkpoint}")
        for name, clip in (("sidecar transcript", with_txt), ("speech recognition", no_txt)):
            load = load_average()
            c, own = cold(clip, checkpoint, args.repeats)
            rest = statistics.median(a - b for a, b in zip(c, own, strict=True))
            print(f"cold  {name:20s} median {statistics.median(c):6.2f} s  (min {min(c):.2f}, "
                  f"{len(c)} runs, new process incl. imports and model loading; target <= 10 s; {load}; "
                  f"medians: clip {statistics.median(own):.2f} s, start-up and loading {rest:.2f} s)")
            load = load_average()
            first, w = warm(clip, checkpoint, args.repeats)
            print(f"warm  {name:20s} median {statistics.median(w):6.2f} s  (min {min(w):.2f}, "
                  f"{len(w)} runs, Predictor reused; first call incl. loading {first:.2f} s; target <= 2 s; {load})")
        if args.breakdown:
            breakdown(no_txt, checkpoint, args.breakdown)


if __name__ == "__main__":
    main()
