"""A command run in a subprocess whose processes (and their children's) carry a marker in their
environment, so a test can find every process of that run, and only those, in /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

GONE_TIMEOUT_S = 20.0  # polling limit for the processes to disappear, not a speed requirement


def proc_stat(pid: str) -> tuple[str, int]:
    """(state, parent pid) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def cmdline(pid: str) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def marked_processes(variable: str, marker: str) -> dict[int, str]:
    """Processes (not zombies) whose environment holds ``variable=marker``: pid -> command line."""
    needle = f"{variable}={marker}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and proc_stat(entry.name)[0] != "Z":
                found[int(entry.name)] = cmdline(entry.name)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


class MarkedRun:
    """``cmd`` in a subprocess, output to a log in ``out_dir``, its environment marked with
    ``variable=<a fresh marker>`` (and ``env`` as the rest of the environment)."""

    def __init__(self, cmd: list[str], out_dir: Path, variable: str, env: dict[str, str] | None = None):
        self.out_dir = out_dir
        self.variable = variable
        self.marker = uuid.uuid4().hex
        out_dir.mkdir(exist_ok=True)
        self.log = out_dir / f"log-{self.marker}.txt"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**(os.environ if env is None else env), variable: self.marker})

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def processes(self) -> dict[int, str]:
        """Live processes of this run other than the parent: pid -> command line."""
        return {pid: cmd for pid, cmd in marked_processes(self.variable, self.marker).items() if pid != self.proc.pid}

    def wait_until_no_process_left(self) -> dict[int, str]:
        deadline = time.monotonic() + GONE_TIMEOUT_S
        left = self.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.processes()
        return left

    def kill(self) -> dict[int, str]:
        """SIGKILL the command (as a crash or the out-of-memory killer would): what it left alive."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return self.wait_until_no_process_left()

    def terminate(self, timeout: float = 120.0) -> tuple[int, str, list[str]]:
        """SIGTERM the command: its exit status, its output, and the output's lines saying how to resume."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        output = self.output()
        return rc, output, [ln for ln in output.splitlines() if "run the same command again to resume" in ln]

    def clean_up(self) -> None:
        """End whatever this run left (only its own processes, one by one)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def busy(run: MarkedRun) -> Iterator[MarkedRun]:
    """A fixture's body: ``run`` once its workers are extracting, cleaned up after the test."""
    try:
        run.wait_for_busy_workers()  # each engine's subclass of MarkedRun has it
        yield run
    finally:
        run.clean_up()
