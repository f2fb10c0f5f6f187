"""The lifetime of worker processes: ending with their parent however it ends, and SIGTERM
handled like Ctrl-C so that a terminated command stops cleanly and can resume."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
