"""The reaper of :mod:`almt_pipeline.processes`: a killed parent's descendants end with it, even
those already orphaned (as Ray's agents are when its raylet dies); a dismissed reaper ends none."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

GONE_TIMEOUT_S = 10.0  # polling limit, not a speed requirement

# Starts a reaper and a child that starts a grandchild and ends, so the grandchild is orphaned
# while this parent still runs; prints the grandchild's pid, then stops the reaper (or not) and
# waits to be killed (or exits).
PARENT = """
import subprocess, sys, time
from almt_pipeline.processes import start_reaper, stop_reaper
reaper = start_reaper()
child = subprocess.Popen([sys.executable, "-c",
    "import subprocess, time; p = subprocess.Popen(['sleep', '120']); print(p.pid, flush=True); time.sleep(1.5)"],
    stdout=subprocess.PIPE, text=True)
pid = child.stdout.readline().strip()
child.wait()
if sys.argv[1] == "dismiss":
    stop_reaper(reaper)
print(pid, flush=True)
if sys.argv[1] == "dismiss":
    sys.exit(0)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _run_parent(mode: str) -> tuple[subprocess.Popen[str], int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    return parent, int(parent.stdout.readline())


def test_killed_parent_takes_its_orphaned_descendants_along():
    parent, orphan = _run_parent("keep")
    try:
        assert _alive(orphan)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while _alive(orphan) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(orphan)
    finally:
        parent.kill()
        parent.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)


def test_dismissed_reaper_ends_nothing():
    parent, orphan = _run_parent("dismiss")
    try:
        assert parent.wait(timeout=30) == 0
        time.sleep(1.0)  # longer than the reaper's poll interval
        assert _alive(orphan)
    finally:
        parent.kill()
        parent.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
