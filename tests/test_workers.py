"""Worker processes of ``almt extract --workers N`` end with the parent, however it ends.

Each test runs the real command in a subprocess on copies of the committed mini dataset clips
and kills it while its workers extract. The processes of one run are found by an environment
variable that only that run (and what it starts) carries.
"""

import csv
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from marked_runs import MarkedRun, busy

COPIES = 8  # 48 clips: the workers are still busy when the first one is finished
MARKER = "ALMT_TEST_RUN"
START_TIMEOUT_S = 240.0  # loading the models in two workers on a busy machine


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


class Run(MarkedRun):
    """``almt extract DATASET --workers 2`` in a subprocess whose processes carry a marker."""

    def __init__(self, dataset: Path, out_dir: Path):
        cmd = [sys.executable, "-m", "almt_pipeline.cli", "extract", str(dataset), "--workers", "2",
               "-o", str(out_dir / "features.pkl"), "-c", str(dataset.parent / "small.yaml"), "-q"]
        super().__init__(cmd, out_dir, MARKER)

    def finished_clips(self) -> int:
        return len(list((self.out_dir / ".almt_cache").rglob("*.npz")))

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


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


@pytest.fixture
def busy_run(dataset, tmp_path):
    """An `almt extract --workers 2` subprocess whose workers are extracting; cleaned up after."""
    yield from busy(Run(dataset, tmp_path / "out"))


@needs_proc
@pytest.mark.slow  # real worker processes load the models (~20-60 s)
def test_killed_parent_leaves_no_worker(busy_run):
    left = busy_run.kill()
    assert left == {}, f"processes of the killed run still alive: {left}"


@needs_proc
@pytest.mark.slow  # real worker processes load the models, twice (~40-120 s)
def test_sigterm_stops_workers_keeps_finished_clips_and_says_how_to_resume(busy_run, dataset, tmp_path):
    run = busy_run
    rc, output, resume = run.terminate()
    assert rc == 130, output  # SIGTERM takes the Ctrl-C path
    assert len(resume) == 1 and resume[0].startswith("received SIGTERM: "), output
    assert "Traceback" not in output and "leaked" not in output, output
    assert run.wait_until_no_process_left() == {}
    finished = run.finished_clips()
    assert re.search(rf"\b{finished} of 48 clips are finished", resume[0]), (finished, resume[0])
    run.clean_up()  # before the rerun (the fixture cleans up again, harmlessly)

    again = Run(dataset, tmp_path / "out")
    try:
        assert again.proc.wait(timeout=600) == 0, again.output()
        assert f"48 done ({48 - finished} extracted, {finished} from cache)" in again.output()
    finally:
        again.clean_up()
