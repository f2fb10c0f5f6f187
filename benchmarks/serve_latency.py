"""Latency of `almt serve` (warm: models loaded once) on a 10-second clip, and its start-up time.

    python benchmarks/serve_latency.py [--checkpoint DIR] [--repeats 7] [--seconds 10]

Starts `almt serve` in a subprocess on 127.0.0.1 (a free port), waits for /api/health, then POSTs the clip
to /api/predict --repeats times with a transcript in the request (no sidecar: speech recognition skipped)
and --repeats times without one (Whisper tiny.en runs). Without --checkpoint, a small checkpoint is trained
first on the bundled sample dataset, and the clip is made by looping samples/new_clip.mp4, both as
benchmarks/predict_latency.py does. Target on 2 CPU cores: <= 2 s per clip with a given transcript. The
load average is printed with the results: other work on the machine slows every figure.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from predict_latency import make_clip, train_checkpoint

TRANSCRIPT = "This was a wonderful film and I enjoyed every minute of it."
START_TIMEOUT_S = 600.0


def start(checkpoint: Path, work: Path) -> tuple[subprocess.Popen[str], str, float]:
    """`almt serve` on 127.0.0.1, any free port: the process, its URL and seconds until /api/health answered."""
    t = time.perf_counter()
    log = work / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "almt_pipeline.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", "0", "--quiet"], cwd=work, stdout=subprocess.PIPE, text=True,
                            stderr=open(log, "w"), env={**os.environ, "PYTHONUNBUFFERED": "1"})  # noqa: SIM115
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout or []], daemon=True).start()
    while True:
        try:
            url = lines.get(timeout=1.0).split()[2]  # "serving on <url> ..."
            break
        except queue.Empty:
            if proc.poll() is not None or time.perf_counter() - t > START_TIMEOUT_S:
                proc.kill()
                sys.exit(f"the server did not start (exit status {proc.poll()}):\n{log.read_text()}")
    while httpx.get(url + "api/health", timeout=30).status_code != 200:
        time.sleep(0.1)
    return proc, url, time.perf_counter() - t


def post(url: str, clip: Path, transcript: str | None) -> tuple[float, float]:
    """Seconds for one request as the client sees it, and the server's own total for the clip."""
    t = time.perf_counter()
    with open(clip, "rb") as f:
        r = httpx.post(url + "api/predict", files={"clip": (clip.name, f)},
                       data={"transcript": transcript} if transcript else {}, timeout=300)
    seconds = time.perf_counter() - t
    r.raise_for_status()
    return seconds, float(r.json()["timings"]["total"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: train a small one)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = (args.checkpoint or train_checkpoint(work)).resolve()
        clip = work / "clip.mp4"
        make_clip(clip, args.seconds)
        proc, url, startup = start(checkpoint, work)
        try:
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"# {os.cpu_count()} CPU cores, load average {load}, clip {args.seconds:.0f} s, checkpoint "
                  f"{checkpoint}")
            print(f"start-up  {startup:6.2f} s  (process start to /api/health answering: imports, checkpoint and "
                  "extractors, speech recogniser, one warm-up clip)")
            for name, transcript in (("given transcript", TRANSCRIPT), ("speech recognition", None)):
                first = post(url, clip, transcript)[0]
                runs = [post(url, clip, transcript) for _ in range(args.repeats)]
                client, server = [r[0] for r in runs], [r[1] for r in runs]
                target = "; target <= 2 s" if transcript else ""
                print(f"warm  {name:20s} median {statistics.median(client):6.2f} s  (min {min(client):.2f}, "
                      f"max {max(client):.2f}, {len(runs)} requests after a first of {first:.2f} s; the server's "
                      f"own time median {statistics.median(server):.2f} s{target})")
            print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
