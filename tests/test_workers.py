"""Worker processes of ``almt extract --workers N`` end with the parent, however it ends.

Each test runs the real command in a subprocess on copies of the committed mini dataset clips
and kills it while its workers extract. The processes of one run are found by an environment
variable that only that run (and what it starts) carries.
"""

import contextlib
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

COPIES = 8  # 48 clips: the workers are still busy when the first one is finished
MARKER = "ALMT_TEST_RUN"
START_TIMEOUT_S = 240.0  # loading the models in two workers on a busy machine
GONE_TIMEOUT_S = 20.0  # polling limit for the processes to disappear, not a speed requirement


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, data_dir) -> Path:
    """The mini dataset's six clips, each under ``COPIES`` video ids."""
    src = data_dir / "mini_dataset"
    dst = tmp_path_factory.mktemp("workers") / "dataset"
    with open(src / "label.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out_rows = []
    for k in range(COPIES):
        for row in rows:
            video_id = f"{row['video_id']}x{k}"
            (dst / "Raw" / video_id).mkdir(parents=True, exist_ok=True)
            shutil.copy(src / "Raw" / row["video_id"] / f"{row['clip_id']}.mp4",
                        dst / "Raw" / video_id / f"{row['clip_id']}.mp4")
            out_rows.append({**row, "video_id": video_id})
    with open(dst / "label.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(out_rows)
    (dst.parent / "small.yaml").write_text(
        "model: {text_len: 16, audio_len: 64, vision_len: 4}\n"
        "extract: {visual: {fps: 2.0, max_side: 160}}\n"
    )
    return dst


class Run:
    """``almt extract DATASET --workers 2`` in a subprocess whose processes carry a marker."""

    def __init__(self, dataset: Path, out_dir: Path):
        self.out_dir = out_dir
        self.marker = uuid.uuid4().hex
        out_dir.mkdir(exist_ok=True)
        self.log = out_dir / f"log-{self.marker}.txt"
        cmd = [sys.executable, "-m", "almt_pipeline.cli", "extract", str(dataset), "--workers", "2",
               "-o", str(out_dir / "features.pkl"), "-c", str(dataset.parent / "small.yaml"), "-q"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, MARKER: self.marker})

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def finished_clips(self) -> int:
        return len(list((self.out_dir / ".almt_cache").rglob("*.npz")))

    def processes(self) -> dict[int, str]:
        """Live processes of this run other than the parent: pid -> command line."""
        return {pid: cmd for pid, cmd in _marked_processes(self.marker).items() if pid != self.proc.pid}

    def wait_for_busy_workers(self) -> None:
        """Until two worker processes exist and the first clip is finished (so the workers have
        loaded their models and are in the middle of the batch)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"extract ended early:\n{self.output()}"
            workers = [c for c in self.processes().values() if "spawn_main" in c]
            if len(workers) >= 2 and self.finished_clips() >= 1:
                return
            time.sleep(0.05)
        pytest.fail(f"no busy workers after {START_TIMEOUT_S} s:\n{self.output()}")

    def wait_until_no_process_left(self) -> dict[int, str]:
        deadline = time.monotonic() + GONE_TIMEOUT_S
        left = self.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.processes()
        return left

    def clean_up(self) -> None:
        """End whatever this run left (only its own processes, one by one)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _marked_processes(marker: str) -> dict[int, str]:
    """Processes (not zombies) whose environment holds ``MARKER=marker``: pid -> command line."""
    needle = f"{MARKER}={marker}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":
            found[int(entry.name)] = cmdline
    return found


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


@needs_proc
@pytest.mark.slow  # real worker processes load the models (~20-60 s)
def test_killed_parent_leaves_no_worker(dataset, tmp_path):
    run = Run(dataset, tmp_path / "out")
    try:
        run.wait_for_busy_workers()
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait()
        left = run.wait_until_no_process_left()
        assert left == {}, f"processes of the killed run still alive: {left}"
    finally:
        run.clean_up()


@needs_proc
@pytest.mark.slow  # real worker processes load the models, twice (~40-120 s)
def test_sigterm_stops_workers_keeps_finished_clips_and_says_how_to_resume(dataset, tmp_path):
    run = Run(dataset, tmp_path / "out")
    try:
        run.wait_for_busy_workers()
        run.proc.send_signal(signal.SIGTERM)
        rc = run.proc.wait(timeout=120)
        output = run.output()
        assert rc == 130, output  # SIGTERM takes the Ctrl-C path
        resume = [ln for ln in output.splitlines() if "run the same command again to resume" in ln]
        assert len(resume) == 1 and resume[0].startswith("received SIGTERM: "), output
        assert "Traceback" not in output and "leaked" not in output, output
        assert run.wait_until_no_process_left() == {}
        finished = run.finished_clips()
        assert re.search(rf"\b{finished} of 48 clips are finished", resume[0]), (finished, resume[0])
    finally:
        run.clean_up()

    again = Run(dataset, tmp_path / "out")
    try:
        assert again.proc.wait(timeout=600) == 0, again.output()
        assert f"48 done ({48 - finished} extracted, {finished} from cache)" in again.output()
    finally:
        again.clean_up()
