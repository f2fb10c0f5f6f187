"""Restricted unpickling for feature files.

Pickle runs code on load, so feature files are read with an unpickler whose ``find_class`` can
only hand out numpy array, dtype and scalar builders, builtin containers and scalars (and
``codecs.encode`` for latin-1 text, which protocol <= 2 pickles use for ``bytes``). Any other
global or a persistent id is refused before it is called.
"""

from __future__ import annotations

import builtins
import codecs
import collections
import importlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FeatureFileError, UnsafePickleError
from .utils import one_line

_NUMPY_MAJOR = int(np.__version__.split(".")[0])
# numpy internals that plain arrays / dtypes / scalars are rebuilt with (numpy 2 spelling).
_NUMPY_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core._multiarray_umath", "_reconstruct"),
    ("numpy._core._multiarray_umath", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
}
_BUILTINS_ALLOWED = {
    "dict", "list", "set", "frozenset", "tuple", "str", "bytes", "bytearray",
    "int", "float", "complex", "bool", "slice",
}
_LATIN1 = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``codecs.encode`` in pickles: protocol <= 2 stores ``bytes`` as latin-1 text."""
    if not isinstance(obj, str) or str(encoding).lower() not in _LATIN1 or errors != "strict":
        raise pickle.UnpicklingError(f"codecs.encode called with unexpected arguments ({encoding!r})")
    return codecs.encode(obj, "latin1")


def _canonical(module: str, name: str) -> tuple[str, str]:
    """Map py2 / numpy-1.x spellings onto the names checked against the allow-list."""
    if module == "__builtin__":
        module = "builtins"
    if module == "numpy.core" or module.startswith("numpy.core."):
        module = "numpy._core" + module[len("numpy.core"):]
    return module, name


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only hands out numpy array/dtype/scalar builders and builtins."""

    def __init__(self, file: io.BufferedReader, *, source: str, encoding: str = "ASCII") -> None:
        super().__init__(file, encoding=encoding)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        mod, nm = _canonical(module, name)
        if mod in ("_codecs", "codecs") and nm == "encode":
            return _latin1_encode
        if mod == "builtins" and nm in _BUILTINS_ALLOWED:
            return getattr(builtins, nm)
        if mod == "collections" and nm == "OrderedDict":
            return collections.OrderedDict
        if (mod, nm) in _NUMPY_ALLOWED:
            if _NUMPY_MAJOR < 2 and mod.startswith("numpy._core"):
                mod = "numpy.core" + mod[len("numpy._core"):]
            return getattr(importlib.import_module(mod), nm)
        raise UnsafePickleError(
            f"{self._source}: refused to load: the pickle asks for {module}.{name}, which a feature "
            "file never contains (possible code execution)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self._source}: refused to load: the pickle uses a persistent id, which a feature "
            "file never contains"
        )


def safe_load_pickle(path: str | os.PathLike) -> object:
    """Unpickle ``path`` allowing only numpy arrays/dtypes/scalars and builtin containers/scalars.

    Raises ``UnsafePickleError`` (before anything runs) when the stream names any other global,
    ``FeatureFileError`` when the file is missing, truncated or not a pickle.
    """
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the `with f` below, once open errors are mapped
    except FileNotFoundError as e:
        raise FeatureFileError(f"{path}: feature file not found") from e
    except IsADirectoryError as e:
        raise FeatureFileError(f"{path}: is a directory, not a feature file") from e
    except OSError as e:
        raise FeatureFileError(f"{path}: cannot read feature file ({e.strerror or e})") from e
    with f:
        if not f.read(1):
            raise FeatureFileError(f"{path}: feature file is empty")
        return _unpickle_stream(f, path)


def _unpickle_stream(f: io.BufferedReader, path: Path) -> object:
    last_error: Exception | None = None
    # py2-era pickles store raw array bytes as py2 ``str``: numpy documents encoding="latin1".
    for encoding in ("ASCII", "latin1"):
        f.seek(0)
        try:
            return _RestrictedUnpickler(f, source=str(path), encoding=encoding).load()
        except UnsafePickleError:
            raise
        except UnicodeDecodeError as e:
            last_error = e
            continue
        except MemoryError as e:
            raise FeatureFileError(f"{path}: out of memory while loading the feature file") from e
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt/foreign file
            raise FeatureFileError(
                f"{path}: not a readable feature pickle (truncated or corrupt?): "
                f"{type(e).__name__}: {one_line(e)}"
            ) from e
    raise FeatureFileError(f"{path}: not a readable feature pickle: {last_error}") from last_error

