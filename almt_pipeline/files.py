"""Writing files so that a crash never leaves a partial one: atomic writes (binary, text, JSON,
CSV) that name the file on failure, checks that an output location is writable before work
starts, and removal of what interrupted writes left behind."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from .utils import one_line

try:
    import fcntl

    HAVE_FLOCK = True
except ImportError:  # not POSIX: stale temporary files are recognised by their age alone
    HAVE_FLOCK = False

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
    path = write_target(path)
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


def write_target(path: str | os.PathLike) -> Path:
    """The file an atomic write of ``path`` replaces: a symbolic link's target (the link stays),
    never a device, FIFO or socket (``OSError`` naming ``path``: renaming over one would destroy
    it, e.g. ``/dev/null``)."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.exists() and not target.is_file() and not target.is_dir():
        err = OSError(f"{path}: not a regular file (a device, FIFO or socket); give the path of a file to write")
        err.errno = errno.EINVAL
        raise err
    return target


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
    path = Path(path) if folder else write_target(path)
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
