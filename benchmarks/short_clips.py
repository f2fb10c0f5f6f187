"""Batch extraction speed on short clips, the length MOSI and CH-SIMS utterances have.

Builds a dataset of ``--clips`` clips of 2-5 s (seeded lengths and offsets) cut from a 640x360
video with an espeak-ng speech track, with transcripts in ``label.csv``, then runs ``almt
extract``'s code (:func:`almt_pipeline.extractors.runner.extract`, landmarks backend) on it with
``--workers`` 1 and 2, each in a fresh process and with an empty cache. The figure is the batch's
real-time factor: clip seconds over the wall time of the extraction, model loading excluded (the
summary's ``extract_seconds``: from the first clip's start to the last clip's end). The whole
command's wall time, loading included, is printed too. The 20 s source clip is measured the same
way, as a batch of three copies.

Usage: python benchmarks/short_clips.py [--clips 80] [--workers 1,2] [--config default] [--keep DIR]
Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from extract_speed import DEFAULT_VIDEO, SPEECH_TEXT, build_speech_clip  # noqa: E402

TARGET_RTF = 10.0
SEED = 20261130
LONG_COPIES = 3  # the 20 s clip is extracted as a batch of this many copies


def make_batch(source: Path, root: Path, n: int, lo: float = 2.0, hi: float = 5.0) -> float:
    """``n`` clips of ``lo``-``hi`` s cut (re-encoded, H.264 + AAC) from ``source`` into an MMSA
    raw layout under ``root``; returns their total duration in seconds."""
    from almt_pipeline.probe import ffmpeg_exe, probe

    rng = random.Random(SEED)
    length = float(probe(source).duration or 0.0)
    words = SPEECH_TEXT.split()
    rows, total = [], 0.0
    for i in range(n):
        seconds = round(rng.uniform(lo, hi), 2)
        start = round(rng.uniform(0.0, max(0.0, length - seconds)), 2)
        video_id = f"v{i // 10:02d}"
        out = root / "Raw" / video_id / f"{i % 10}.mp4"
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([ffmpeg_exe(), "-y", "-nostdin", "-loglevel", "error", "-ss", f"{start}", "-i", str(source),
                        "-t", f"{seconds}", "-c:v", "libx264", "-preset", "veryfast", "-crf", "23",
                        "-c:a", "aac", "-b:a", "96k", str(out)], check=True, capture_output=True)
        total += float(probe(out).duration or seconds)
        first = rng.randrange(0, len(words) - 12)
        text = " ".join(words[first:first + rng.randint(6, 12)])
        rows.append({"video_id": video_id, "clip_id": str(i % 10), "text": text,
                     "label": f"{rng.uniform(-3, 3):.1f}", "mode": ("train", "valid", "test")[i % 3]})
    with open(root / "label.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return total


def child(data: Path, config: str, workers: int, out: Path) -> None:
    """Runs in a fresh process: one extraction, its summary as JSON on the last line."""
    from almt_pipeline.config import load_config
    from almt_pipeline.extractors.runner import extract

    t = time.perf_counter()
    s = extract(data, out / "features.pkl", load_config(config), workers=workers, cache_dir=out / "cache",
                quiet=True)
    wall = time.perf_counter() - t
    print(json.dumps({"clip_seconds": s.clip_seconds, "extract_seconds": s.extract_seconds,
                      "total_seconds": wall, "done": s.done, "failed": s.failed}))


def measure(data: Path, config: str, workers: int, tmp: Path, label: str) -> float:
    out = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(data), "--config", config,
                           "--workers", str(workers), "--out", str(out)],
                          check=True, capture_output=True, text=True)
    process_wall = time.perf_counter() - t
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    rtf = r["clip_seconds"] / r["extract_seconds"]
    ok = "meets" if rtf >= TARGET_RTF else "MISSES"
    print(f"{label}, workers {workers}: {r['done']} clips ({r['failed']} failed), {r['clip_seconds']:.1f} clip-s "
          f"in {r['extract_seconds']:.2f} s = {rtf:.1f}x real time ({ok} the {TARGET_RTF:g}x target); "
          f"whole command {process_wall:.1f} s with start-up and model loading", flush=True)
    return rtf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=80)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--config", default="default")
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    p.add_argument("--keep", type=Path, help="build the clips here and keep them")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    counts = [int(w) for w in args.workers.split(",")]
    if args.child:
        child(args.child, args.config, counts[0], args.out)
        return
    print(f"cpu cores visible: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="almt-short-") as d:
        tmp = Path(d)
        root = args.keep or tmp / "short"
        clip = build_speech_clip(args.video, tmp / "speech_640x360.mp4")
        if not (root / "label.csv").is_file():
            total = make_batch(clip, root, args.clips)
            print(f"batch: {args.clips} clips of 2-5 s, {total:.1f} s in all, 640x360 H.264 + AAC")
        long_root = tmp / "long"
        (long_root / "Raw" / "v").mkdir(parents=True)
        rows = "".join(f"v,{i},\"{SPEECH_TEXT}\",1.0,test\n" for i in range(LONG_COPIES))
        for i in range(LONG_COPIES):
            os.link(clip, long_root / "Raw" / "v" / f"{i}.mp4")
        (long_root / "label.csv").write_text(f"video_id,clip_id,text,label,mode\n{rows}")
        for w in counts:
            measure(root, args.config, w, tmp, f"short clips ({args.clips})")
        measure(long_root, args.config, 1, tmp, f"20 s clip ({LONG_COPIES} copies)")
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
