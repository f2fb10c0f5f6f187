"""Feature files: restricted unpickling, validation, writing, MMSA compatibility, synthetic data."""

import importlib.util
import io
import logging
import os
import pickle
import pickletools
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from synthetic import make_synthetic

from almt_pipeline.config import ModelConfig
from almt_pipeline.errors import FeatureFileError, UnsafePickleError
from almt_pipeline.features import load_features, save_features
from almt_pipeline.safe_pickle import safe_load_pickle
from almt_pipeline.schema import META_KEY, REQUIRED, SCHEMA_VERSION, SPLITS

SMALL = dict(n=(6, 3, 3), text_len=12, audio=(20, 5), vision=(15, 7), text_dim=16)


def small_cfg(**kw) -> ModelConfig:
    base = dict(text_len=12, audio_dim=5, audio_len=20, vision_dim=7, vision_len=15)
    base.update(kw)
    return ModelConfig(**base)


def official_like(scale="mosi", seed=0) -> dict:
    """Splits only, no meta, float64 text_bert and list labels, like the distributed files."""
    data = make_synthetic(None, scale=scale, seed=seed, **SMALL)
    del data[META_KEY]
    for split in SPLITS:
        data[split]["text_bert"] = data[split]["text_bert"].astype(np.float64)
        data[split]["regression_labels"] = data[split]["regression_labels"].tolist()
    return data


def dump(path: Path, obj, protocol=4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def numpy1_spelling(data: bytes) -> bytes:
    """Rewrite a pickle as numpy 1.x writes it (``numpy.core...`` globals), dropping frames."""
    out = bytearray()
    ops = list(pickletools.genops(data))
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        raw = data[pos:end]
        if op.name == "FRAME":
            continue
        if op.name == "GLOBAL" and arg.startswith("numpy._core"):
            raw = b"c" + arg.replace("numpy._core", "numpy.core", 1).replace(" ", "\n").encode() + b"\n"
        elif op.name == "SHORT_BINUNICODE" and arg.startswith("numpy._core"):
            text = arg.replace("numpy._core", "numpy.core", 1).encode()
            raw = b"\x8c" + bytes([len(text)]) + text
        out += raw
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# restricted unpickler


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_safe_load_numpy_arrays_and_builtins(tmp_path, protocol):
    obj = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i": np.arange(3),
        "b": np.array([True, False]),
        "s": np.array(["hello world", "ünïcode"], dtype=object),
        "u": np.array(["ab", "c"]),
        "scalar": np.float64(2.5),
        "nested": [1, 2.0, "x", b"raw", b"", bytearray(b"ba"), (1,), None, True, {"k": [-(2**70)]}],
    }
    got = safe_load_pickle(dump(tmp_path / "a.pkl", obj, protocol))
    for k in ("f", "i", "b", "s", "u"):
        assert got[k].dtype == obj[k].dtype and (got[k] == obj[k]).all()
    assert got["scalar"] == 2.5 and got["nested"] == obj["nested"]


@pytest.mark.parametrize("protocol", [2, 4])
def test_safe_load_numpy1_spelling(tmp_path, protocol):
    obj = {"id": np.array(["v1$_$1", "v2$_$3"], dtype=object), "raw_text": np.array(["a b", "c"], dtype=object),
           "audio": np.full((2, 3, 4), -np.inf, dtype=np.float32), "y": np.float32(1.5)}
    data = numpy1_spelling(pickle.dumps(obj, protocol=protocol))
    assert b"numpy.core.multiarray" in data and b"numpy._core" not in data
    path = tmp_path / "old.pkl"
    path.write_bytes(data)
    got = safe_load_pickle(path)
    assert got["id"].dtype == object and list(got["id"]) == ["v1$_$1", "v2$_$3"]
    assert list(got["raw_text"]) == ["a b", "c"] and got["y"] == np.float32(1.5)
    assert np.isneginf(got["audio"]).all()


def test_safe_load_py2_str_pickle(tmp_path):
    """py2-era streams hold raw array bytes as py2 str (BINSTRING): decoded as latin-1."""

    class Py2Pickler(pickle._Pickler):
        dispatch = dict(pickle._Pickler.dispatch)

        def save_py2_str(self, obj):
            self.write(b"T" + struct.pack("<I", len(obj)) + obj)
            self.memoize(obj)

        dispatch[bytes] = save_py2_str

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump({"audio": np.array([[1.5, -np.inf]], dtype=np.float32)})
    path = tmp_path / "py2.pkl"
    path.write_bytes(buf.getvalue())
    got = safe_load_pickle(path)
    assert got["audio"][0, 0] == 1.5 and np.isneginf(got["audio"][0, 1])


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    "make",
    [
        lambda m: _Payload(os.system, f"touch {m}"),
        lambda m: _Payload(subprocess.call, ["touch", str(m)]),
        lambda m: _Payload(eval, f"open({str(m)!r}, 'w').close()"),
        lambda m: _Payload(exec, f"open({str(m)!r}, 'w').close()"),
        lambda m: _Payload(Path.touch, Path(m)),
    ],
    ids=["os.system", "subprocess", "eval", "exec", "pathlib"],
)
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, make):
    marker = tmp_path / "pwned"
    # the payload hides inside an otherwise valid-looking split
    data = official_like()
    data["train"]["raw_text"] = make(marker)
    path = dump(tmp_path / "evil.pkl", data)
    with pytest.raises(UnsafePickleError) as err:
        load_features(path)
    assert not marker.exists()
    msg = str(err.value)
    assert msg.startswith(f"{path}: refused to load: the pickle asks for ")
    assert "possible code execution" in msg and "\n" not in msg


def test_refuses_dotted_and_near_miss_names(tmp_path):
    # STACK_GLOBAL with attribute paths and numpy functions that are not array builders
    for module, name in [("builtins", "getattr"), ("builtins", "str.__class__"), ("numpy", "load"),
                         ("numpy.core.multiarray", "frombuffer"), ("copyreg", "_reconstructor"),
                         ("numpy", "dtype.__init__"), ("posix", "system"), ("numpy", "array"),
                         # builtins a feature file never needs (sets, complex, str/list of a value)
                         ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
                         ("builtins", "str"), ("builtins", "list"), ("builtins", "slice"), ("builtins", "range")]:
        stream = (b"\x80\x04" + b"\x8c" + bytes([len(module)]) + module.encode()
                  + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93" + b".")
        path = tmp_path / "g.pkl"
        path.write_bytes(stream)
        with pytest.raises(UnsafePickleError, match=f"asks for {module}.{name},"):
            safe_load_pickle(path)


def test_codecs_encode_only_latin1(tmp_path):
    # protocol-2 bytes go through _codecs.encode(text, "latin1"); other codecs are refused
    path = dump(tmp_path / "b.pkl", b"\x00\xff bytes", protocol=2)
    assert safe_load_pickle(path) == b"\x00\xff bytes"
    stream = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00rot_13\x86R."
    path.write_bytes(stream)
    with pytest.raises(FeatureFileError, match="codecs.encode"):
        safe_load_pickle(path)


@pytest.mark.parametrize("content", [b"", b"not a pickle at all\n", None, "missing"])
def test_unreadable_files_one_line(tmp_path, content):
    path = tmp_path / "bad.pkl"
    if content is None:  # truncated real feature file
        full = pickle.dumps(official_like(), protocol=4)
        path.write_bytes(full[: len(full) // 2])
    elif content != "missing":
        path.write_bytes(content)
    with pytest.raises(FeatureFileError) as err:
        load_features(path)
    assert not isinstance(err.value, UnsafePickleError)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# loading + validation


def test_roundtrip_synthetic(tmp_path):
    path = tmp_path / "f.pkl"
    data = make_synthetic(path, **SMALL)
    ff = load_features(path, model_cfg=small_cfg())
    assert ff.label_scale == "mosi" and ff.meta["schema_version"] == SCHEMA_VERSION
    assert ff.dims == {"text_len": 12, "text_dim": 16, "audio_len": 20, "audio_dim": 5,
                       "vision_len": 15, "vision_dim": 7}
    for split, n in zip(SPLITS, SMALL["n"]):
        s = ff.splits[split]
        assert ff.n(split) == n and np.isfinite(ff.splits[split]["regression_labels"]).all()
        for key in ("text_bert", "text", "audio", "vision", "regression_labels"):
            assert s[key].dtype == np.float32
        assert s["audio_lengths"].dtype == np.int64
        assert np.isfinite(s["audio"]).all()  # -inf -> 0
        assert isinstance(s["id"][0], str) and "$_$" in s["id"][0]
        np.testing.assert_array_equal(s["vision"], data[split]["vision"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_official_layout_without_meta_loads_and_infers_scale(tmp_path, caplog):
    path = dump(tmp_path / "unaligned_50.pkl", official_like("mosi"), protocol=2)
    with caplog.at_level(logging.INFO, logger="almt_pipeline.features"):
        ff = load_features(path)
    assert ff.label_scale == "mosi" and ff.meta == {}
    assert "inferred" in caplog.text
    sims = dump(tmp_path / "unaligned_39.pkl", official_like("sims"))
    assert load_features(sims).label_scale == "sims"
    # explicit scale (config) wins over inference; meta wins over both
    assert load_features(sims, label_scale="mosi").label_scale == "mosi"


def test_meta_label_scale_enforces_range(tmp_path):
    data = make_synthetic(None, scale="sims", **SMALL)
    data["train"]["regression_labels"][0] = 2.0
    path = tmp_path / "s.pkl"
    save_features(path, {s: data[s] for s in SPLITS}, data[META_KEY])
    with pytest.raises(FeatureFileError, match=r"train/regression_labels: 1 label\(s\) outside \[-1, 1\]"):
        load_features(path)


def test_problems_are_collected_one_line_each(tmp_path):
    data = official_like()
    del data["train"]["text"]
    data["valid"]["audio_lengths"] = data["valid"]["audio_lengths"][:-1]
    data["test"]["vision"][0, 0, 0] = np.nan
    data["test"]["audio"][0, 0, 0] = np.inf
    data["test"]["regression_labels"][1] = 7.0
    path = dump(tmp_path / "bad.pkl", data)
    with pytest.raises(FeatureFileError) as err:
        load_features(path)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{path}: 5 problems in feature file (first: train: missing key(s) text")
    body = "\n".join(lines[1:])
    assert "valid/audio_lengths: has 2 rows but the split has 3 samples" in body
    assert "test/vision: 1 NaN values" in body
    assert "test/audio: 1 +inf values" in body
    assert "test/regression_labels: 1 label(s) outside [-3, 3]" in body


def test_fix_nonfinite_option(tmp_path):
    data = official_like()
    data["train"]["vision"][0, 0, :2] = [np.nan, np.inf]
    ff = load_features(dump(tmp_path / "n.pkl", data), fix_nonfinite=True)
    assert np.isfinite(ff.splits["train"]["vision"]).all()


def test_shape_dtype_and_length_checks(tmp_path):
    data = official_like()
    data["train"]["audio"] = data["train"]["audio"][:, :, 0]  # (N, T) not (N, T, d)
    data["valid"]["raw_text"] = np.array([1, 2, 3], dtype=object)
    data["valid"]["text_bert"] = np.array([["x"] * 3] * 3, dtype=object)[:, :, None].repeat(12, 2)
    data["test"]["vision_lengths"] = data["test"]["vision_lengths"] + 100
    data["test"]["text"] = data["test"]["text"][:, :5]
    with pytest.raises(FeatureFileError) as err:
        load_features(dump(tmp_path / "x.pkl", data))
    msg = str(err.value)
    assert "train/audio: expected 3 dims (N, T, D), found shape (6, 20)" in msg
    assert "valid/text_bert: expected numbers, found dtype object" in msg
    assert "valid/raw_text: expected strings, found 3 int value(s)" in msg
    assert "test/vision_lengths: 3 value(s) outside [0, 15]" in msg
    assert "test/text: has 5 tokens but text_bert has 12" in msg
    assert "test/text: per-sample shape (5, 16) differs from train's (12, 16)" in msg


def test_text_bert_content_checks(tmp_path):
    data = official_like()
    data["train"]["text_bert"][0, 1, 0] = 0.5
    with pytest.raises(FeatureFileError, match="train/text_bert: attention mask"):
        load_features(dump(tmp_path / "t.pkl", data))


def test_against_model_config(tmp_path):
    path = make_synthetic(tmp_path / "f.pkl", **SMALL) and tmp_path / "f.pkl"
    # shorter padded lengths than the config maximum are fine
    load_features(path, model_cfg=small_cfg(text_len=50, audio_len=375, vision_len=500))
    with pytest.raises(FeatureFileError) as err:
        load_features(path, model_cfg=small_cfg(audio_dim=33, audio_len=10, text_len=8))
    msg = str(err.value)
    assert "train/audio: feature width 5 does not match model config audio_dim=33" in msg
    assert "train/audio: padded length 20 exceeds model config audio_len=10" in msg
    assert "train/text_bert: padded length 12 exceeds model config text_len=8" in msg


def test_splits_and_unlabelled(tmp_path):
    data = make_synthetic(None, **SMALL)
    test_only = {"test": dict(data["test"])}
    del test_only["test"]["regression_labels"]
    path = tmp_path / "clips.pkl"
    save_features(path, test_only, {"label_scale": "mosi"})
    with pytest.raises(FeatureFileError, match="train: split missing"):
        load_features(path, require_labels=False)
    with pytest.raises(FeatureFileError, match="test: missing key.s. regression_labels"):
        load_features(path, splits=("test",))
    ff = load_features(path, splits=None, require_labels=False)
    assert list(ff.splits) == ["test"] and np.isnan(ff.splits["test"]["regression_labels"]).all()
    assert np.isnan(ff.splits["test"]["regression_labels"]).all()
    # NaN labels are accepted only when labels are not required
    labelled = {"test": dict(data["test"])}
    labelled["test"]["regression_labels"] = np.full(3, np.nan, dtype=np.float32)
    save_features(path, labelled, {})
    assert load_features(path, splits=["test"], require_labels=False).label_scale == "mosi"
    with pytest.raises(FeatureFileError, match="3 NaN labels"):
        load_features(path, splits=["test"])


def test_not_a_split_dict(tmp_path):
    with pytest.raises(FeatureFileError, match="expected a dict of splits"):
        load_features(dump(tmp_path / "l.pkl", [1, 2, 3]))
    with pytest.raises(FeatureFileError, match="no train/valid/test split"):
        load_features(dump(tmp_path / "e.pkl", {"foo": {}}), splits=None)


def test_save_features_meta_must_be_plain(tmp_path):
    data = make_synthetic(None, **SMALL)
    splits = {s: data[s] for s in SPLITS}
    with pytest.raises(FeatureFileError, match="only plain builtins"):
        save_features(tmp_path / "m.pkl", splits, {"obj": object()})
    save_features(tmp_path / "m.pkl", splits, {"n": np.int64(3), "p": tmp_path, "a": np.zeros(2)})
    meta = safe_load_pickle(tmp_path / "m.pkl")[META_KEY]
    assert meta["n"] == 3 and meta["p"] == str(tmp_path) and meta["a"] == [0.0, 0.0]
    assert meta["created_by"].startswith("almt-pipeline ")


# ---------------------------------------------------------------------------------------------
# synthetic data


def test_make_synthetic_official_shapes():
    data = make_synthetic(None, n=(5, 2, 2))
    tr = data["train"]
    assert set(REQUIRED) <= set(tr)
    assert tr["text_bert"].shape == (5, 3, 50) and tr["text"].shape == (5, 50, 768)
    assert tr["audio"].shape == (5, 375, 5) and tr["vision"].shape == (5, 500, 20)
    for i in range(5):
        k = int(tr["text_bert"][i, 1].sum())
        ids = tr["text_bert"][i, 0]
        assert ids[0] == 101 and ids[k - 1] == 102 and (ids[k:] == 0).all()
        assert (tr["text_bert"][i, 2] == 0).all()
        assert (tr["audio"][i, tr["audio_lengths"][i]:] == 0).all()
        assert (tr["vision"][i, tr["vision_lengths"][i]:] == 0).all()
    assert np.isneginf(np.concatenate([data[s]["audio"].ravel() for s in SPLITS])).any()
    assert np.abs(tr["regression_labels"]).max() <= 3
    sims = make_synthetic(None, n=(4, 2, 2), scale="sims", seed=1)
    assert np.abs(sims["train"]["regression_labels"]).max() <= 1 and sims[META_KEY]["label_scale"] == "sims"
    again = make_synthetic(None, n=(5, 2, 2))
    np.testing.assert_array_equal(again["train"]["audio"], tr["audio"])


# ---------------------------------------------------------------------------------------------
# MMSA compatibility: what thuiar/MMSA's MMDataset does with a feature file


def _mmsa_style_read(path: Path, mode: str) -> dict:
    """Operations of MMSA's loader: plain pickle.load, data[mode][key], astype float32, lengths
    used as ints, audio -inf -> 0, per-sample tensors (trusted file written by this test)."""
    torch = pytest.importorskip("torch")
    with open(path, "rb") as f:
        data = pickle.load(f)
    d = data[mode]
    text = d["text_bert"].astype(np.float32)
    audio = d["audio"].astype(np.float32)
    vision = d["vision"].astype(np.float32)
    labels = np.array(d["regression_labels"]).astype(np.float32)
    audio[audio == -np.inf] = 0
    a_len, v_len = d["audio_lengths"], d["vision_lengths"]
    masks = [np.array([1] * int(n) + [0] * (audio.shape[1] - n)) for n in a_len]  # missing-data path
    assert all(m.shape == (audio.shape[1],) for m in masks)
    text_len = np.argmin(text[:, 1, :], axis=1)  # first padding position
    assert (text_len > 0).all()
    seq_lens = (text.shape[2], audio.shape[1], vision.shape[1])
    dims = (d["text"].astype(np.float32).shape[2], audio.shape[2], vision.shape[2])
    sample = {"raw_text": d["raw_text"][0], "text": torch.Tensor(text[0]), "audio": torch.Tensor(audio[0]),
              "vision": torch.Tensor(vision[0]), "id": d["id"][0],
              "labels": {"M": torch.Tensor(labels[0].reshape(-1))},
              "audio_lengths": a_len[0], "vision_lengths": v_len[0]}
    return {"n": len(labels), "seq_lens": seq_lens, "dims": dims, "sample": sample}


def test_saved_file_satisfies_mmsa_loader(tmp_path):
    path = tmp_path / "feat.pkl"
    make_synthetic(path, **SMALL)
    for mode, n in zip(SPLITS, SMALL["n"]):
        got = _mmsa_style_read(path, mode)
        assert got["n"] == n and got["seq_lens"] == (12, 20, 15) and got["dims"] == (16, 5, 7)
        s = got["sample"]
        assert isinstance(s["raw_text"], str) and isinstance(s["id"], str)
        assert s["text"].shape == (3, 12) and bool(s["audio"].isfinite().all())


def test_saved_file_with_mmsa_package_when_installed(tmp_path):
    """Runs MMSA's own MMDataset when the MMSA package is importable (it is not a dependency)."""
    spec = importlib.util.find_spec("MMSA")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("MMSA is not installed")
    loader_path = Path(next(iter(spec.submodule_search_locations))) / "data_loader.py"
    mod_spec = importlib.util.spec_from_file_location("_mmsa_data_loader", loader_path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    path = tmp_path / "feat.pkl"
    make_synthetic(path, **SMALL)
    args = {"dataset_name": "mosi", "featurePath": str(path), "custom_feature": None, "feature_T": None,
            "feature_A": None, "feature_V": None, "use_bert": True, "need_data_aligned": False,
            "need_normalized": False, "feature_dims": [0, 0, 0]}
    for mode in SPLITS:
        ds = mod.MMDataset(dict(args), mode=mode)
        item = ds[0]
        assert item["text"].shape == (3, 12) and ds.get_seq_len() == (12, 20, 15)


@pytest.mark.parametrize("key, values, message", [
    ("regression_labels", [10**400] * 6, "a number too large for float32"),
    ("audio_lengths", [10**400] * 6, "expected integers"),
    ("audio_lengths", [2.0**70] * 6, r"frame counts up to 1.18e\+21, beyond any padded length"),
    ("vision_lengths", [1e300] * 6, "beyond any padded length"),
])
def test_numbers_beyond_the_types_are_one_line_problems(tmp_path, key, values, message):
    data = make_synthetic(None, **SMALL)
    data["train"][key] = values
    path = tmp_path / "big.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    with pytest.raises(FeatureFileError, match=message):
        load_features(path)
