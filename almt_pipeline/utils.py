"""Small shared helpers: atomic file writes (and their leftovers), one-line error text, device
selection, seeding, and the lifetime of worker processes (ending with their parent, SIGTERM).

torch is imported inside the two functions that need it, so that loading a config or a
feature file (and the CLI's start-up) does not pay for importing it.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import io
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .errors import ConfigError

try:
    import fcntl

    HAVE_FLOCK = True
except ImportError:  # not POSIX: stale temporary files are recognised by their age alone
    HAVE_FLOCK = False

if TYPE_CHECKING:
    import torch

# Final results (metrics, summaries) are logged here: the CLI shows them even with --quiet.
results_log = logging.getLogger("almt_pipeline.results")

# A temporary file of atomic_write is locked (flock) by its writer from just after its creation
# until it is renamed or removed. One that nobody holds was left by a killed writer, unless it is
# younger than TEMP_GRACE_S (the instant between creation and lock, or between the last write
# and the rename). Without flock, a temporary file is taken as left over after STALE_TEMP_AGE_S.
TEMP_GRACE_S = 10.0
STALE_TEMP_AGE_S = 600.0


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success fsync it and rename it over ``path``.

    A crash or kill at any moment leaves either the old file or the complete new one, never a
    truncated file. On an exception the temporary file is removed and ``path`` is untouched; an
    ``OSError`` (full disk, no permission, ...) is raised again as one of the same class whose
    message is ``<path>: cannot write (<reason>)``. The temporary file
    (``.<name>.<random>.tmp``) is locked while it is written, so that
    :func:`remove_stale_temp_files` can tell the leftovers of a killed writer.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', not {mode!r}")
    path = Path(path)
    try:
        _make_folder(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from e
    _lock_quietly(fd)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not str(e).startswith(f"{path}: "):
            raise write_error(path, e) from e
        raise


def write_error(path: str | os.PathLike, e: OSError) -> OSError:
    """``e`` as an error of the same class (errno kept) saying ``<path>: cannot write (<reason>)``."""
    cls = type(e) if type(e).__module__ == "builtins" else OSError
    err = cls(f"{path}: cannot write ({e.strerror or one_line(e)})")
    err.errno = e.errno
    return err


def check_writable(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Fail now, with an ``OSError`` naming ``path``, when :func:`atomic_write` could not write the
    file ``path`` (or, with ``folder``, files inside the folder ``path``): creates the missing
    folders, then creates and removes a temporary file where the real one will go."""
    path = Path(path)
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; a file name is needed here")
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: is a file; a folder is needed here")
    target_dir = path if folder else path.parent
    try:
        _make_folder(target_dir)
        fd, tmp = tempfile.mkstemp(prefix=f".{'probe' if folder else path.name}.", suffix=".tmp",
                                   dir=target_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise write_error(path, e) from e


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # the name is taken by a file
        raise NotADirectoryError(errno.ENOTDIR, f"{folder} is not a folder") from e


def remove_stale_temp_files(folder: str | os.PathLike, name: str | None = None) -> int:
    """Remove the temporary files that interrupted :func:`atomic_write` calls left in ``folder``
    (only those for the file ``name`` when given: ``.<name>.<random>.tmp``). A temporary file
    still locked by its writer, or younger than ``TEMP_GRACE_S``, is kept. Returns the number
    removed; a folder that cannot be read is left alone."""
    prefix = f".{name}." if name else "."
    try:
        entries = list(os.scandir(os.fspath(folder)))
    except OSError:
        return 0
    removed = 0
    for entry in entries:
        middle = entry.name[len(prefix):-len(".tmp")]
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp") and middle):
            continue
        if (name is not None and "." in middle) or not entry.is_file(follow_symlinks=False):
            continue  # another file's temporary file, or not a file at all
        with contextlib.suppress(OSError):
            if _left_over(entry.path):
                os.unlink(entry.path)
                removed += 1
    return removed


def _left_over(tmp: str) -> bool:
    """Whether no writer holds the temporary file ``tmp`` (see ``TEMP_GRACE_S``)."""
    age = time.time() - os.stat(tmp).st_mtime
    if age < TEMP_GRACE_S:
        return False
    if not HAVE_FLOCK:
        return age > STALE_TEMP_AGE_S
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live writer holds it
    except OSError:  # no flock on this file system: fall back to the age
        return age > STALE_TEMP_AGE_S
    finally:
        os.close(fd)
    return True


def _lock_quietly(fd: int) -> None:
    if HAVE_FLOCK:
        with contextlib.suppress(OSError):  # a file system without flock: the age rule remains
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file (header row, then ``rows``) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; otherwise the named device (checked)."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


ONE_LINE_LIMIT = 500  # characters of an exception's message kept on one line


def one_line(e: BaseException) -> str:
    """An exception's message on one line: whitespace folded, cut to ``ONE_LINE_LIMIT``
    characters (its type name when the message is empty)."""
    text = " ".join(str(e).split())
    if len(text) > ONE_LINE_LIMIT:
        text = text[: ONE_LINE_LIMIT - 3].rstrip() + "..."
    return text or type(e).__name__


def package_version() -> str:
    return __version__


# ---------------------------------------------------------------------------------------------
# process lifetime

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
    """Within the block, SIGTERM raises ``KeyboardInterrupt("received SIGTERM")`` in the main
    thread, so that a terminated command stops the way Ctrl-C stops it (and the CLI exits with
    130). Does nothing outside the main thread (only it may set signal handlers) or when SIGTERM
    is ignored. The previous handler is restored afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")
