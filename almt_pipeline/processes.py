"""The lifetime of worker processes: ending with their parent however it ends, and SIGTERM
handled like Ctrl-C so that a terminated command stops cleanly and can resume.

Processes this one starts run :func:`exit_with_parent`. Processes that another program starts
for this one and that outlive their own parents (the agents of a local Ray) are ended by a
:func:`start_reaper` helper once this process is killed."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

PR_SET_PDEATHSIG = 1  # linux/prctl.h
REAPER_POLL_S = 0.5  # how often a reaper notes the processes it would have to end
REAPER_DISMISSED = b"dismissed\n"


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Make this (child) process end when its parent ``parent_pid`` ends, however it ends.

    On Linux the kernel kills it with SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``;
    this fires when the parent's *thread* that started this process ends, so the parent must
    start it from a thread that outlives it). Everywhere, a daemon thread checks every
    ``poll_s`` seconds whether this process was given to another parent and then exits it. A
    parent that died before this call (the kernel would not signal any more) ends it at once.
    """
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, poll_s), name="watch-parent",
                     daemon=True).start()


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent_pid:
            os._exit(1)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (and SIGHUP: a closed terminal or ssh session) raises
    ``KeyboardInterrupt("received SIGTERM")`` in the main thread, so that a terminated command
    stops the way Ctrl-C stops it (and the CLI exits with 130). Does nothing outside the main
    thread (only it may set signal handlers); a signal that is ignored stays ignored. The previous
    handlers are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = ("SIGTERM", "SIGHUP")
    signals = [getattr(signal, n) for n in names if hasattr(signal, n)]
    previous = {s: signal.getsignal(s) for s in signals}
    for s, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(s, _raise_interrupt)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")



def start_reaper() -> subprocess.Popen[bytes] | None:
    """Start a helper that, should this process end without :func:`stop_reaper` (killed, or
    crashed), kills every process descended from it, also those that outlive their own parents
    (e.g. the agents of a local Ray, which a program other than this one starts and which
    :func:`exit_with_parent` cannot reach). Linux only (it reads /proc); elsewhere None."""
    if not Path("/proc/self/stat").exists():
        return None
    code = "from almt_pipeline.processes import _reap; _reap()"
    # its own session: a Ctrl-C in the terminal must not end it before this process ends
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop_reaper(reaper: subprocess.Popen[bytes] | None) -> None:
    """Dismiss the reaper: this process ended its descendants itself and lives on."""
    if reaper is None:
        return
    try:
        if reaper.stdin is not None:
            reaper.stdin.write(REAPER_DISMISSED)
            reaper.stdin.close()
        reaper.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        reaper.kill()
        reaper.wait()


def _reap() -> None:
    """The reaper: note the parent's descendants while it lives; when its pipe closes without
    being dismissed (the parent died), kill those still running (the same processes: same pid
    and start time)."""
    parent, me = os.getppid(), os.getpid()
    known: dict[int, str] = {}  # pid -> start time
    fd = sys.stdin.fileno()
    while True:
        if select.select([fd], [], [], REAPER_POLL_S)[0]:
            data = os.read(fd, 64)
            if REAPER_DISMISSED in data:
                return
            if not data:
                break
        known.update(_descendants(parent, me))
    for pid, started in known.items():
        if _start_time(pid) == started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _descendants(root: int, skip: int) -> dict[int, str]:
    """Live descendants of process ``root`` but ``skip``: pid -> start time."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = [c for c in children.get(root, []) if c != skip]
    while todo:
        pid = todo.pop()
        if (started := _start_time(pid)) is not None:
            found[pid] = started
        todo.extend(children.get(pid, []))
    return found


def _start_time(pid: int) -> str | None:
    """When a process started (clock ticks after boot), None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]
