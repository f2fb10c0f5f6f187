"""Hostile feature files: memory-unsafe numpy states, allocations larger than the file, memo bombs.

Every hostile stream is written opcode by opcode (or by the pickler, for shared Python lists) and
is never read by the normal unpickler here. The loader runs in a fresh interpreter with its
address space limited (RLIMIT_AS), so a regression shows as a failed test (a crash, an
``out of memory`` message, a timeout or a large peak RSS) instead of a crashed or swapping test
run. Legitimate files that take the same code paths (big-endian arrays, ``<U`` ids, numpy 1.x
protocol-2 files, protocol-5 buffers) must keep loading.
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_features import SMALL, numpy1_spelling, official_like

from almt_pipeline.errors import FeatureFileError, UnsafePickleError
from almt_pipeline.features import load_features
from almt_pipeline.safe_pickle import safe_load_pickle
from almt_pipeline.schema import SPLITS

REPO = Path(__file__).resolve().parent.parent
ADDRESS_LIMIT = 1536 << 20  # RLIMIT_AS of the loading interpreter: ~1.5 GB
PEAK_RSS_LIMIT_MIB = 300  # a refused file must not make the loader grow past this


# ---------------------------------------------------------------------------------------------
# writing pickle opcodes


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def op_bytes(b: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(b)) + b


def op_int(i: int) -> bytes:
    if -(2**31) <= i < 2**31:
        return b"J" + struct.pack("<i", i)
    raw = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def op_tuple(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def op_call(func: bytes, *args: bytes) -> bytes:
    return func + op_tuple(*args) + b"R"


def op_dict(items: dict[str, bytes]) -> bytes:
    return b"}(" + b"".join(op_text(k) + v for k, v in items.items()) + b"u"


def op_dtype(spec: str, order: str = "|", elsize: int = -1, flags: int = 0) -> bytes:
    """``numpy.dtype(spec, False, True)`` then BUILD with numpy's version-3 state."""
    state = op_tuple(op_int(3), op_text(order), b"N", b"N", b"N", op_int(elsize), op_int(-1), op_int(flags))
    return op_call(op_global("numpy", "dtype"), op_text(spec), b"\x89", b"\x88") + state + b"b"


def op_array(shape: tuple[int, ...], dtype: bytes, data: bytes, *, empty_shape: tuple[int, ...] = (0,),
             typecode: bytes = b"b") -> bytes:
    """``_reconstruct(ndarray, empty_shape, typecode)`` then BUILD (1, shape, dtype, False, data)."""
    new = op_call(op_global("numpy.core.multiarray", "_reconstruct"), op_global("numpy", "ndarray"),
                  op_tuple(*map(op_int, empty_shape)), op_bytes(typecode))
    return new + op_tuple(op_int(1), op_tuple(*map(op_int, shape)), dtype, b"\x89", data) + b"b"


def stream(body: bytes, protocol: int = 3) -> bytes:
    return b"\x80" + bytes([protocol]) + body + b"."


def features(**train: bytes) -> bytes:
    """A feature-file-shaped stream: {"train": {key: value opcodes}}."""
    return stream(op_dict({"train": op_dict(train)}))


def shared_lists(levels: tuple[int, ...] = (1024, 1024, 512)) -> list:
    """Lists of lists sharing one list per level: ~12 KB pickled, 1024*1024*512 floats (4.3 GB as
    float64) once numpy or repr() expands it."""
    value: list = [0.5] * levels[0]
    for n in levels[1:]:
        value = [value] * n
    return value


def nested_tuple_key(depth: int = 40) -> bytes:
    """{t: 1} where t = (t', t'), 40 levels: hashing t visits 2**40 tuples."""
    body = b"}" + op_int(0) + b"\x85q\x000"  # EMPTY_DICT; t0 = (0,) into memo 0, popped
    for k in range(depth):
        body += b"h" + bytes([k]) + b"h" + bytes([k]) + b"\x86q" + bytes([k + 1]) + b"0"
    return stream(body + b"h" + bytes([depth]) + op_int(1) + b"s", protocol=2)


def shared_buffer_arrays(n: int = 1000, size: int = 4 << 20) -> bytes:
    """n big-endian float arrays over one memo-shared 4 MB buffer: each copy is 4 MB (4 GB in all)."""
    first = op_bytes(b"\0" * size) + b"q\x01"
    arrays = {f"x{i}": op_array((size // 8,), op_dtype("f8", ">"), first if i == 0 else b"h\x01") for i in range(n)}
    return features(**arrays)


def shared_bytes_ids(n: int = 200_000, size: int = 20_000) -> bytes:
    """An id array of n rows that all refer to one 20 KB bytes object (~420 KB): decoding each
    row on its own makes 4 GB of str."""
    items = op_bytes(b"v" * size) + b"q\x01" + b"h\x01" * (n - 1)
    return features(id=op_array((n,), op_dtype("O8", flags=63), b"](" + items + b"e"))


def scalar_pickle_body(value: object) -> bytes:
    """The opcodes of ``value`` pickled (protocol 2, no frames), to embed in a hand-written stream."""
    return pickle.dumps(value, protocol=2)[2:-1]


# name -> (stream, fragment the one-line error must contain)
HOSTILE: dict[str, tuple[bytes, str]] = {
    # memory safety: object arrays/scalars whose element pointers would be the file's bytes
    "object_array_from_raw_bytes": (
        features(id=op_array((4,), op_dtype("O8", flags=0), op_bytes(b"\x41" * 32))),
        "refused to load: an object array built from a bytes"),
    "object_array_shape_beyond_its_list": (
        features(id=op_array((100_000,), op_dtype("O8", flags=63), b"](" + op_text("a") + b"e")),
        "needs 100000 items but its list has 1"),
    "object_scalar_from_raw_bytes": (
        stream(op_call(op_global("numpy.core.multiarray", "scalar"), op_dtype("O8", flags=0), op_bytes(b"A" * 8))),
        "refused to load: a numpy scalar without a numpy number/str dtype"),
    "object_frombuffer_raw_bytes": (
        features(id=op_call(op_global("numpy.core.numeric", "_frombuffer"), op_bytes(b"A" * 32),
                            op_dtype("O8", flags=0), op_tuple(op_int(4)), op_text("C"))),
        "refused to load: a numpy buffer array without a numpy number/str dtype"),
    # allocations far beyond the file, before anything is checked
    "bytearray_3e9": (stream(op_call(op_global("builtins", "bytearray"), op_int(3_000_000_000))),
                      "refused to load: bytes/bytearray called with (int)"),
    "bytes_3e9": (stream(op_call(op_global("__builtin__", "bytes"), op_int(3_000_000_000))),
                  "refused to load: bytes/bytearray called with (int)"),
    "reconstruct_4gb_object_array": (  # the empty array numpy would first make (and zero) is never made
        stream(op_array((1,), op_dtype("O8", flags=63), b"](" + op_text("a") + b"e",
                        empty_shape=(500_000_000,), typecode=b"O")),
        "expected a dict of splits at the top level, found ndarray"),
    "declared_shape_beyond_data": (features(audio=op_array((1000, 1000), op_dtype("f8", "<"), op_bytes(b"\0" * 8))),
                                   "needs 8000000 bytes but carries 8"),
    "declared_dimension_beyond_file": (features(audio=op_array((10**9, 0), op_dtype("f8", "<"), op_bytes(b""))),
                                       "an array dimension of 1000000000"),
    "shared_buffer_4gb_of_copies": (shared_buffer_arrays(), "more than the"),
    "memo_shared_nested_lists": (
        pickle.dumps({"train": {"id": np.array(["a"], dtype=object), "regression_labels": shared_lists()}}, 4),
        "train/regression_labels: a list of"),
    "memo_shared_lists_in_meta": (pickle.dumps({"train": {}, "meta": {"label_scale": shared_lists()}}, 4),
                                  "meta: the 'meta' dict would expand to"),
    "shared_bytes_in_ids": (shared_bytes_ids(), "train: missing key(s) raw_text"),
    "str_of_shared_lists": (stream(op_call(op_global("builtins", "str"), scalar_pickle_body(shared_lists())), 2),
                            "asks for builtins.str"),
    "nested_tuple_dict_key": (nested_tuple_key(), "refused to load: a dict key of type tuple"),
    "long_binput_huge_index": (b"\x80\x02Nr" + struct.pack("<I", 0x08000000) + b".",
                               "expected a dict of splits at the top level, found NoneType"),
    "binbytes8_beyond_file": (b"\x80\x04\x8e" + struct.pack("<Q", 3_000_000_000) + b"xyz.",
                              "pickle data was truncated"),
    "bytearray8_beyond_file": (b"\x80\x05\x96" + struct.pack("<Q", 3_000_000_000) + b"xyz.",
                               "pickle data was truncated"),
}
# refused by the schema or unreadable: a FeatureFileError that is not an UnsafePickleError
PLAIN_ERROR = {"binbytes8_beyond_file", "bytearray8_beyond_file", "long_binput_huge_index",
               "reconstruct_4gb_object_array", "memo_shared_nested_lists", "memo_shared_lists_in_meta",
               "shared_bytes_in_ids"}

# Loads the file in a fresh interpreter, touches every value as training would, prints one line.
CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
from almt_pipeline.errors import FeatureFileError, UnsafePickleError
from almt_pipeline.features import load_features
try:
    ff = load_features(sys.argv[1], splits=None, require_labels=False)
    print("loaded", sum(len(str(v)) for s in ff.splits.values() for a in s.values() for v in a.reshape(-1)))
except FeatureFileError as e:
    print(f"{'refused' if isinstance(e, UnsafePickleError) else 'error'}: {e}")
# VmHWM is this process image's own peak (ru_maxrss would include the forked parent's pages)
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print("maxrss_mib", int(hwm[0]) // 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def load_in_child(path: Path, limit: int = ADDRESS_LIMIT) -> tuple[str, int]:
    """(the one output line, peak RSS in MiB) of loading ``path`` in a fresh interpreter."""
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(limit)], capture_output=True,
                           text=True, timeout=120, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {path.name} did not finish in 120 s")
    assert r.returncode == 0, f"the loader died (exit {r.returncode}): {r.stderr[-2000:]}"
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("maxrss_mib "), r.stdout + r.stderr
    return lines[0], int(lines[1].split()[1])


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_gives_one_line_error_without_crash_or_allocation(tmp_path, name):
    data, fragment = HOSTILE[name]
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(data)
    line, peak_mib = load_in_child(path)
    kind = "error" if name in PLAIN_ERROR else "refused"
    assert line.startswith(f"{kind}: {path}: "), line
    assert fragment in line and "out of memory" not in line, line
    assert peak_mib < PEAK_RSS_LIMIT_MIB, f"{name}: peak RSS {peak_mib} MiB"


def test_hostile_files_are_small():
    """The allocations above come from files of a few bytes to ~12 KB (4 MB for the shared buffer)."""
    sizes = {name: len(data) for name, (data, _) in HOSTILE.items()}
    assert sizes["bytearray_3e9"] < 40 and sizes["long_binput_huge_index"] < 12
    assert 10_000 < sizes["memo_shared_nested_lists"] < 16_000
    assert sizes["shared_buffer_4gb_of_copies"] < 5 << 20


@pytest.mark.slow
@pytest.mark.parametrize("name", ["object_array_from_raw_bytes", "memo_shared_nested_lists", "bytearray_3e9"])
def test_cli_train_on_hostile_file_is_one_error_line(tmp_path, name):
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(HOSTILE[name][0])
    r = subprocess.run([sys.executable, "-c", "from almt_pipeline.cli import main; main()", "train", "--data",
                        str(path), "--epochs", "1", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and str(path) in errors[0] and HOSTILE[name][1] in errors[0], r.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# legitimate files on the same paths


def test_big_endian_arrays_and_unicode_ids_load_with_their_values(tmp_path):
    data = official_like()
    expected = {s: {k: np.array(data[s][k]) for k in ("audio", "text_bert", "id")} for s in SPLITS}
    for s in SPLITS:
        data[s]["audio"] = data[s]["audio"].astype(">f4")
        data[s]["text_bert"] = data[s]["text_bert"].astype(">f8")
        data[s]["vision_lengths"] = np.asfortranarray(data[s]["vision_lengths"].astype(">i8"))
        data[s]["id"] = np.array([str(v) for v in data[s]["id"]], dtype="<U32")
        data[s]["raw_text"] = np.array([str(v) for v in data[s]["raw_text"]], dtype=">U64")
    for protocol in (2, 4, 5):
        path = tmp_path / f"be{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        ff = load_features(path)
        for s in SPLITS:
            got = ff.splits[s]
            np.testing.assert_array_equal(got["audio"], np.where(np.isneginf(expected[s]["audio"]), 0,
                                                                 expected[s]["audio"]))
            np.testing.assert_array_equal(got["text_bert"], expected[s]["text_bert"].astype(np.float32))
            assert list(got["id"]) == [str(v) for v in expected[s]["id"]]
            assert isinstance(got["id"][0], str) and got["vision_lengths"].dtype == np.int64


def test_official_numpy1_protocol2_file_loads(tmp_path):
    data = official_like()
    path = tmp_path / "unaligned_50.pkl"
    path.write_bytes(numpy1_spelling(pickle.dumps(data, protocol=2)))
    assert b"numpy.core.multiarray\n_reconstruct" in path.read_bytes()
    ff = load_features(path)
    for s, n in zip(SPLITS, SMALL["n"]):
        assert ff.n(s) == n
        np.testing.assert_array_equal(ff.splits[s]["vision"], data[s]["vision"])
        np.testing.assert_array_equal(ff.splits[s]["regression_labels"],
                                      np.asarray(data[s]["regression_labels"], np.float32))
        assert list(ff.splits[s]["raw_text"]) == list(data[s]["raw_text"])


@pytest.mark.parametrize("protocol", [4, 5])
def test_large_and_fortran_arrays_are_read_in_place(tmp_path, protocol):
    """Arrays bigger than a pickle frame (protocol 5: read straight into their buffer), C and F order."""
    big = np.arange(300_000, dtype=np.float32).reshape(1000, 300)
    obj = {"c": big, "f": np.asfortranarray(big), "small": np.arange(3), "b": np.array([True, False])}
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    got = safe_load_pickle(path)
    for k, v in obj.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].flags.writeable
    assert got["f"].flags.f_contiguous


def test_lists_and_meta_within_the_file_budget_load(tmp_path):
    """List labels and a meta dict with per-row strings (shared through the memo) stay within budget."""
    data = official_like()
    source = "sidecar"
    data["meta"] = {"label_scale": "mosi", "transcript_sources": [source] * 6,
                    "feature_names": {"audio": [f"a{i}" for i in range(5)]}}
    data["train"]["raw_text"] = [str(v) for v in data["train"]["raw_text"]]
    path = tmp_path / "lists.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    ff = load_features(path)
    assert ff.meta["transcript_sources"] == ["sidecar"] * 6
    assert list(ff.splits["train"]["raw_text"]) == data["train"]["raw_text"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (op_call(op_global("numpy", "dtype"), op_text("V8"), b"\x89", b"\x88"), "numpy dtype 'V8'"),
        (op_call(op_global("numpy", "dtype"), op_text("M8"), b"\x89", b"\x88"), "numpy dtype 'M8'"),
        (op_array((1,), op_dtype("b1"), op_bytes(b"\x07")), "a boolean array holding values other than 0 and 1"),
        (op_array((2,), op_dtype("O8", flags=63), b"](" + op_text("a") + b"}e"), "an object array holding a dict"),
        (op_array((2, -1), op_dtype("f4", "<"), op_bytes(b"")), "an array dimension of -1"),
        (op_call(op_global("numpy", "ndarray"), op_tuple(op_int(3))), ""),
        (b"]" + op_int(0) + op_int(1) + b"s", "sets items of a list"),
        (b"}" + op_int(2**61 - 1) + op_int(1) + b"s", "a dict key of type int"),
        (b"\x8f(" + op_int(1) + b"\x90", "EMPTY_SET opcode"),
        (op_global("builtins", "bytes") + b")\x81", "NEWOBJ opcode"),
        (b"(" + op_global("collections", "OrderedDict") + op_int(5) + b"o", "OBJ opcode"),
        (b"\xff", "invalid load key"),
    ],
    ids=["void-dtype", "datetime-dtype", "bool-bytes", "object-dict", "negative-dim", "ndarray-call",
         "setitem-on-list", "int-key", "sets", "newobj", "obj", "bad-opcode"],
)
def test_other_streams_no_feature_file_contains_are_refused(tmp_path, body, fragment):
    path = tmp_path / "odd.pkl"
    path.write_bytes(stream(body, protocol=4))
    with pytest.raises(FeatureFileError) as err:
        safe_load_pickle(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and fragment in msg
    if fragment not in ("", "invalid load key"):
        assert isinstance(err.value, UnsafePickleError)
