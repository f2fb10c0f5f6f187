"""Latency of `almt predict` on a 10-second clip: cold (new process) and warm (models loaded).

    python benchmarks/predict_latency.py [--checkpoint DIR] [--repeats 5]

Without --checkpoint, a small checkpoint is trained first on the bundled sample dataset (two
epochs; the weights do not matter for latency). The 10-second clip is made by looping
samples/new_clip.mp4 with ffmpeg. Two transcript cases are measured: a sidecar .txt transcript
(speech recognition skipped) and no transcript (Whisper tiny.en runs). Targets on 2 CPU cores:
cold <= 10 s, warm <= 2 s. One line per measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def cold(clip: Path, checkpoint: Path, repeats: int) -> list[float]:
    times = []
    almt = Path(sys.executable).with_name("almt")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([str(almt), "predict", str(clip), "--checkpoint", str(checkpoint), "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return times


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: train a small one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
            c = cold(clip, checkpoint, args.repeats)
            print(f"cold  {name:20s} median {statistics.median(c):6.2f} s  (min {min(c):.2f}, "
                  f"{len(c)} runs, new process incl. imports and model loading; target <= 10 s)")
            first, w = warm(clip, checkpoint, args.repeats)
            print(f"warm  {name:20s} median {statistics.median(w):6.2f} s  (min {min(w):.2f}, "
                  f"{len(w)} runs, Predictor reused; first call incl. loading {first:.2f} s; target <= 2 s)")


if __name__ == "__main__":
    main()
