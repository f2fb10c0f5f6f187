"""Restricted unpickling for feature files (SECURITY.md describes the threat model).

Pickle runs code on load, so ``find_class`` answers only the names numpy and pickle write for
arrays, dtypes, scalars and ``bytes``, and answers them with stand-ins: an array is built here
from its checked parts (numbers, booleans, ``str``/``bytes`` from a buffer of exactly the declared
size; object arrays only from a list of the declared length holding plain scalars), and all
arrays of a file must fit in its size (pickle does not compress). Opcodes that would reach an
object's ``__setstate__``/``__setitem__``, hash nested containers or allocate before reading
are checked or refused; sizes in the stream are checked against the bytes left in the file.
"""

from __future__ import annotations

import codecs
import collections
import io
import math
import os
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .errors import FeatureFileError, UnsafePickleError
from .utils import one_line

MAX_ARRAY_BYTES = 64 << 30  # all arrays of one file together, whatever the file's size
_MIN_DIM_CAP = 1 << 20  # largest dimension of an empty array when the file is smaller than this
_MAX_NDIM = 32
_LATIN1 = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"}
_SCALARS = (str, bytes, int, float, bool, type(None))  # what object arrays (ids, texts) may hold
_DTYPE_SPEC = re.compile(r"([biufcUSO])([0-9]{1,9})")  # as numpy writes them: 'f4', 'U12', 'O8'
_SIZES = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8), "c": (8, 16), "O": (4, 8)}
_NUMPY_NAMES = {("numpy", "ndarray"): "ndarray", ("numpy", "dtype"): "dtype",
                **{(m, n): n.strip("_") for m in ("numpy._core.multiarray", "numpy._core._multiarray_umath")
                   for n in ("_reconstruct", "scalar")},
                ("numpy._core.numeric", "_frombuffer"): "frombuffer"}


class _Refused(pickle.UnpicklingError):
    """A stream that no feature file is; becomes an UnsafePickleError naming the file."""


class _Budget:
    """Bytes all arrays of a file may take: its size (pickle has no compression) and MAX_ARRAY_BYTES."""

    def __init__(self, file_size: int) -> None:
        self.left = min(file_size, MAX_ARRAY_BYTES)
        self.file_size = file_size
        self.dim_cap = max(file_size, _MIN_DIM_CAP)

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise _Refused(f"{what} needs {nbytes} bytes, more than the {self.file_size}-byte file holds "
                           f"({self.left} bytes not used by its other arrays)")
        self.left -= nbytes


# --- stand-ins for the names a feature file uses

class _NDArrayName:
    """Stand-in for ``numpy.ndarray``; its one instance (not callable) only ``_reconstruct`` takes."""


_NDARRAY = _NDArrayName()


class _ArrayStub:
    """What ``_reconstruct`` returns; BUILD replaces it by the array built from its state."""

    __slots__ = ("array",)
    __hash__: ClassVar[None] = None  # type: ignore[assignment]

    def __init__(self) -> None:
        self.array: np.ndarray | None = None


class _DTypeStub:
    """What ``numpy.dtype(spec, align, copy)`` returns: a checked dtype; BUILD may set its byte order."""

    __slots__ = ("dtype", "stated")
    __hash__: ClassVar[None] = None  # type: ignore[assignment]

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.stated = False

    def set_state(self, state: Any) -> None:
        """(3 or 4, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])."""
        if self.stated or type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise _Refused("a numpy dtype with a state numpy does not write")
        order, subarray, names, fields, elsize = state[1:6]
        if subarray is not None or names is not None or fields is not None:
            raise _Refused("a structured or sub-array numpy dtype (feature files hold plain arrays)")
        if order not in ("<", ">", "|", "=") or type(elsize) is not int or elsize not in (-1, self.dtype.itemsize):
            raise _Refused(f"a numpy dtype whose state does not match its type {self.dtype.str}")
        if order in "<>" and self.dtype.kind != "O":
            self.dtype = self.dtype.newbyteorder(order)
        self.stated = True


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> _DTypeStub:
    """Stand-in for ``numpy.dtype``."""
    match = _DTYPE_SPEC.fullmatch(spec) if type(spec) is str else None
    shown = repr(spec[:20]) if type(spec) is str else f"a {type(spec).__name__}"
    kind, size = (match.group(1), int(match.group(2))) if match else ("", 0)
    if not kind or (size == 0 if kind in "US" else size not in _SIZES[kind]):
        raise _Refused(f"numpy dtype {shown} (only numbers, booleans, str/bytes and object arrays are allowed)")
    return _DTypeStub(np.dtype(object) if kind == "O" else np.dtype(f"{kind}{size}"))


def _reconstruct(cls: Any, shape: Any = None, typecode: Any = None) -> _ArrayStub:
    """Stand-in for ``numpy.core.multiarray._reconstruct``: a stub for BUILD to fill."""
    if cls is not _NDARRAY:
        raise _Refused(f"numpy's _reconstruct called for a {type(cls).__name__}, not numpy.ndarray")
    return _ArrayStub()


def _latin1_encode(obj: Any, encoding: Any = "latin1", errors: Any = "strict") -> bytes:
    """Stand-in for ``codecs.encode``: protocol <= 2 stores ``bytes`` as latin-1 text."""
    if type(obj) is not str or type(encoding) is not str or encoding.lower() not in _LATIN1 or errors != "strict":
        shown = repr(encoding[:20]) if type(encoding) is str else f"a {type(encoding).__name__}"
        raise _Refused(f"codecs.encode called with unexpected arguments (encoding {shown})")
    return codecs.encode(obj, "latin1")


def _bytes(*args: Any) -> bytes:
    """Stand-in for ``bytes``: ``bytes()``, ``bytes(b)``, ``bytes(text, "latin-1")``; never a size."""
    if not args:
        return b""
    if len(args) == 1 and type(args[0]) in (bytes, bytearray):
        return bytes(args[0])
    if len(args) == 2 and type(args[0]) is str:
        return _latin1_encode(args[0], args[1])
    types = ", ".join(type(a).__name__ for a in args)
    raise _Refused(f"bytes/bytearray called with ({types}): a feature file stores bytes, it never asks for a size")


def _bytearray(*args: Any) -> bytearray:
    return bytearray(_bytes(*args))


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    """Stand-in for ``OrderedDict``: empty; pickle fills it with SETITEMS, whose keys are checked."""
    if args:
        raise _Refused("collections.OrderedDict called with arguments")
    return collections.OrderedDict()


# --- arrays from checked parts

def _shape(shape: Any, budget: _Budget) -> tuple[int, ...]:
    if type(shape) is not tuple or len(shape) > _MAX_NDIM:
        raise _Refused(f"an array shape that is a {type(shape).__name__}, not a tuple of at most {_MAX_NDIM} sizes")
    for d in shape:
        if type(d) is not int or not 0 <= d <= budget.dim_cap:
            shown = d if type(d) is int else type(d).__name__
            raise _Refused(f"an array dimension of {shown} (the file holds {budget.file_size} bytes)")
    return shape


def _numeric_array(shape: tuple[int, ...], dtype: np.dtype, fortran: bool, data: Any,
                   budget: _Budget) -> np.ndarray:
    """A number/bool/str array from exactly prod(shape) * itemsize bytes, taken from the budget."""
    if type(data) is str and max(data, default="\0") <= "\xff":  # py2 streams: bytes as latin-1 text
        data = data.encode("latin1")
    if type(data) not in (bytes, bytearray):
        raise _Refused(f"array data given as a {type(data).__name__}, not bytes")
    need = math.prod(shape) * dtype.itemsize
    what = f"an array of shape {shape} and dtype {dtype.str}"
    if len(data) != need:
        raise _Refused(f"{what} needs {need} bytes but carries {len(data)}")
    budget.take(need, what)
    arr: np.ndarray
    if type(data) is bytearray:
        arr = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    else:
        # numpy's own pickle path, given parts checked here: it shares a large aligned buffer
        # instead of copying it (a multi-GB file is not held twice) and the array is writeable.
        arr = np.empty(0, np.int8)
        arr.__setstate__((1, shape, dtype, fortran, data))  # type: ignore[arg-type]
    if dtype.kind == "b" and arr.size and int(arr.view(np.uint8).max()) > 1:
        raise _Refused("a boolean array holding values other than 0 and 1")
    return arr


def _object_array(shape: tuple[int, ...], fortran: bool, data: Any, budget: _Budget) -> np.ndarray:
    """An object array (ids, texts) from a list of prod(shape) plain scalars in C order."""
    n = math.prod(shape)
    if type(data) is not list:
        raise _Refused(f"an object array built from a {type(data).__name__} (object arrays must carry a list)")
    if len(data) != n:
        raise _Refused(f"an object array of shape {shape} needs {n} items but its list has {len(data)}")
    odd = next((v for v in data if not isinstance(v, _SCALARS)), None)
    if odd is not None:
        raise _Refused(f"an object array holding a {type(odd).__name__} (only str, bytes and numbers are allowed)")
    budget.take(n, f"an object array of {n} items")  # each item takes at least one byte of the file
    arr = np.empty(n, dtype=object)
    arr[:] = data
    return np.asfortranarray(arr.reshape(shape)) if fortran else arr.reshape(shape)


def _array_from_state(state: Any, budget: _Budget) -> np.ndarray:
    """ndarray state: ([version,] shape, dtype, is_fortran, data)."""
    if type(state) is not tuple or len(state) not in (4, 5):
        raise _Refused("a numpy array with a state numpy does not write")
    shape, dtype, fortran, data = state[-4:]
    if not isinstance(dtype, _DTypeStub) or type(fortran) not in (bool, int) or fortran not in (0, 1):
        raise _Refused("a numpy array state without a numpy dtype and order flag")
    dims = _shape(shape, budget)
    if dtype.dtype.kind == "O":
        return _object_array(dims, bool(fortran), data, budget)
    return _numeric_array(dims, dtype.dtype, bool(fortran), data, budget)


def _plain_dtype(dtype: Any, what: str) -> np.dtype:
    if not isinstance(dtype, _DTypeStub) or dtype.dtype.kind == "O":
        raise _Refused(f"{what} without a numpy number/str dtype")
    return dtype.dtype


def _key(value: Any) -> Any:
    """Dict keys: str or bytes only. Hashing a shared nested tuple is unbounded, and int/float
    hashes are not randomised (keys chosen to collide make a dict quadratic)."""
    if not isinstance(value, (str, bytes)):
        raise _Refused(f"a dict key of type {type(value).__name__} (feature files use str keys)")
    return value


# --- the unpickler

class _BoundedReader:
    """The file as pickle reads it: a read past its end fails before anything is allocated."""

    def __init__(self, f: io.BufferedReader, size: int) -> None:
        self._f = f
        self.left = size

    def check(self, n: int, got: int | None = None) -> None:
        """Before a read of ``n`` bytes (``got`` None), and after it."""
        if got is None and n > self.left and self.left <= 0:
            raise EOFError("Ran out of input")
        if (n > self.left) if got is None else (got != n):
            raise pickle.UnpicklingError("pickle data was truncated")
        self.left -= got or 0

    def read(self, n: int) -> bytes:
        self.check(n)
        data = self._f.read(n)
        self.check(n, len(data))
        return data

    def readinto(self, buf: bytearray) -> None:
        self.check(len(buf))
        self.check(len(buf), self._f.readinto(buf))

    def readline(self) -> bytes:
        line = self._f.readline()
        self.left -= len(line)
        if not line.endswith(b"\n"):
            raise pickle.UnpicklingError("pickle data was truncated")
        return line


class _Dispatch(dict):
    def __missing__(self, key: int) -> Callable[..., None]:
        raise pickle.UnpicklingError(f"invalid load key, {bytes([key])!r}.")


class _RestrictedUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler (so each opcode can be checked) with stand-in globals."""

    stack: list[Any]
    memo: dict[int, Any]
    append: Callable[[Any], None]
    read: Callable[[int], bytes]
    readline: Callable[[], bytes]
    pop_mark: Callable[[], list[Any]]
    _unframer: Any

    def __init__(self, reader: _BoundedReader, *, source: str, file_size: int, encoding: str) -> None:
        super().__init__(reader, encoding=encoding)
        self._source = source
        self._reader = reader
        self._budget = _Budget(file_size)

    def find_class(self, module: str, name: str) -> Any:
        mod = "builtins" if module == "__builtin__" else module
        if mod == "numpy.core" or mod.startswith("numpy.core."):  # numpy 1.x spelling
            mod = "numpy._core" + mod[len("numpy.core"):]
        role = _NUMPY_NAMES.get((mod, name)) or (mod, name)
        standin: Any = {
            ("_codecs", "encode"): _latin1_encode, ("codecs", "encode"): _latin1_encode,
            ("builtins", "bytes"): _bytes, ("builtins", "bytearray"): _bytearray,
            ("collections", "OrderedDict"): _ordered_dict, "ndarray": _NDARRAY, "dtype": _dtype,
            "reconstruct": _reconstruct, "scalar": self._scalar, "frombuffer": self._frombuffer,
        }.get(role)
        if standin is not None:
            return standin
        raise UnsafePickleError(
            f"{self._source}: refused to load: the pickle asks for {module}.{name}, which a feature "
            "file never contains (possible code execution)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self._source}: refused to load: the pickle uses a persistent id, which a feature "
            "file never contains"
        )

    def _scalar(self, dtype: Any, data: Any = None) -> Any:  # numpy.core.multiarray.scalar(dtype, bytes)
        return _numeric_array((), _plain_dtype(dtype, "a numpy scalar"), False, data, self._budget)[()]

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:  # protocol 5
        dt = _plain_dtype(dtype, "a numpy buffer array")
        if order not in ("C", "F") or type(buf) not in (bytes, bytearray):
            raise _Refused("a numpy buffer array without a byte buffer and order C or F")
        return _numeric_array(_shape(shape, self._budget), dt, order == "F", buf, self._budget)

    # --- checked opcodes
    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _ArrayStub) and inst.array is None:
            inst.array = self.stack[-1] = _array_from_state(state, self._budget)
        elif isinstance(inst, _DTypeStub):
            inst.set_state(state)
        else:
            raise _Refused(f"the pickle sets the state of a {type(inst).__name__}, which a feature file never does")

    def _memo_get(self, i: int) -> None:
        try:
            obj = self.memo[i]
        except KeyError:
            raise pickle.UnpicklingError(f"Memo value not found at index {i}") from None
        if isinstance(obj, _ArrayStub):
            if obj.array is None:
                raise _Refused("an array used before its data is set")
            obj = obj.array
        self.append(obj)

    def _load_bytearray8(self) -> None:
        """Protocol 5's in-band buffers: checked against the bytes left before ``bytearray(n)``."""
        (n,) = struct.unpack("<Q", self.read(8))
        frame = self._unframer.current_frame
        if frame is not None and frame.tell() < frame.getbuffer().nbytes:
            self.append(bytearray(self.read(n)))  # inside a frame, so small: bounded by the frame
            return
        self._unframer.current_frame = None
        self._reader.check(n)
        buf = bytearray(n)
        self._reader.readinto(buf)  # straight into the array's buffer: a large array is read once
        self.append(buf)

    def _dict_target(self) -> dict:
        if type(self.stack[-1]) not in (dict, collections.OrderedDict):
            raise _Refused(f"the pickle sets items of a {type(self.stack[-1]).__name__}, not of a dict")
        return self.stack[-1]

    def _load_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self._dict_target()[_key(key)] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._dict_target()
        for i in range(0, len(items) - 1, 2):
            target[_key(items[i])] = items[i + 1]

    def _load_dict(self) -> None:
        items = self.pop_mark()
        self.append({_key(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)})


def _refuse(opcode: str) -> Callable[[_RestrictedUnpickler], None]:
    def load(self: _RestrictedUnpickler) -> None:
        raise _Refused(f"the pickle uses the {opcode} opcode, which a feature file never contains")
    return load


def _dispatch_table() -> _Dispatch:
    u = _RestrictedUnpickler
    checked: dict[bytes, Callable[[_RestrictedUnpickler], None]] = {
        pickle.BUILD: u._load_build, pickle.BYTEARRAY8: u._load_bytearray8,
        pickle.GET: lambda self: self._memo_get(int(self.readline()[:-1])),
        pickle.BINGET: lambda self: self._memo_get(self.read(1)[0]),
        pickle.LONG_BINGET: lambda self: self._memo_get(struct.unpack("<I", self.read(4))[0]),
        pickle.SETITEM: u._load_setitem, pickle.SETITEMS: u._load_setitems, pickle.DICT: u._load_dict,
        **{getattr(pickle, op): _refuse(op)
           for op in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EMPTY_SET", "ADDITEMS", "FROZENSET")},
    }
    table = _Dispatch(pickle._Unpickler.dispatch)
    table.update({opcode[0]: load for opcode, load in checked.items()})
    return table


_RestrictedUnpickler.dispatch = _dispatch_table()


def safe_load_pickle(path: str | os.PathLike) -> object:
    """Unpickle ``path`` into builtins and checked numpy arrays/scalars. ``UnsafePickleError`` (before
    anything runs or is allocated) when the stream asks for anything else (module doc),
    ``FeatureFileError`` when the file is missing, truncated or not a pickle."""
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
        return _unpickle_stream(f, path, os.fstat(f.fileno()).st_size)


def _unpickle_stream(f: io.BufferedReader, path: Path, size: int) -> object:
    last_error: Exception | None = None
    # py2-era pickles store raw array bytes as py2 ``str``: numpy documents encoding="latin1".
    for encoding in ("ASCII", "latin1"):
        f.seek(0)
        try:
            unpickler = _RestrictedUnpickler(_BoundedReader(f, size), source=str(path), file_size=size,
                                             encoding=encoding)
            return unpickler.load()
        except UnsafePickleError:
            raise
        except _Refused as e:
            raise UnsafePickleError(f"{path}: refused to load: {e}") from None
        except UnicodeDecodeError as e:
            last_error = e
            continue
        except MemoryError as e:
            raise FeatureFileError(f"{path}: out of memory while loading the feature file") from e
        except RecursionError as e:
            raise FeatureFileError(f"{path}: not a readable feature pickle: nested too deeply") from e
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt/foreign file
            raise FeatureFileError(
                f"{path}: not a readable feature pickle (truncated or corrupt?): "
                f"{type(e).__name__}: {one_line(e)}"
            ) from e
    raise FeatureFileError(f"{path}: not a readable feature pickle: {last_error}") from last_error
