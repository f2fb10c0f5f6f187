"""Extraction runner: folder/dataset -> MMSA pickle, failures, cache, workers, interruption."""

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from almt_pipeline.config import config_from_dict
from almt_pipeline.errors import ConfigError, ExtractionError
from almt_pipeline.extractors.clip import ClipExtractor
from almt_pipeline.extractors.runner import extract
from almt_pipeline.features import fit_length, load_features, safe_load_pickle

TEXT_LEN, AUDIO_LEN, VISION_LEN = 16, 64, 4
MINI_IDS = {
    "train": ["spk1$_$1", "spk1$_$2"],
    "valid": ["spk2$_$1", "spk2$_$2"],
    "test": ["spk1$_$3", "spk2$_$3"],
}


def _cfg(**model):
    from almt_pipeline.extractors.visual import LANDMARKS_FEATURE_NAMES

    m = {"text_len": TEXT_LEN, "audio_len": AUDIO_LEN, "vision_len": VISION_LEN,
         "audio_dim": 33, "vision_dim": len(LANDMARKS_FEATURE_NAMES)}
    m.update(model)
    return config_from_dict({"model": m, "extract": {"visual": {"fps": 2.0, "max_side": 160}}})


def _read_failures(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _raw(path: Path) -> dict:
    return safe_load_pickle(path)


def _assert_same_splits(a: dict, b: dict, exact: bool = True) -> None:
    assert set(a) == set(b)
    for split in a:
        if split == "meta":
            continue
        assert set(a[split]) == set(b[split]), split
        for key, x in a[split].items():
            y = b[split][key]
            if x.dtype == object:
                assert list(x) == list(y), (split, key)
            elif exact:
                np.testing.assert_array_equal(x, y, err_msg=f"{split}/{key}")
            else:
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4, err_msg=f"{split}/{key}")


@pytest.fixture(scope="module")
def cfg():
    return _cfg()


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory, data_dir, cfg):
    out = tmp_path_factory.mktemp("mini") / "features.pkl"
    summary = extract(data_dir / "mini_dataset", out, cfg, quiet=True)
    return out, summary


def test_fit_length_pads_and_pools():
    x = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)  # (10, 2)
    padded, n = fit_length(x[:3], 5)
    assert padded.shape == (5, 2) and n == 3
    np.testing.assert_array_equal(padded[:3], x[:3])
    assert not padded[3:].any()
    same, n = fit_length(x, 10)
    assert n == 10 and np.array_equal(same, x)
    pooled, n = fit_length(x, 4)  # bins [0,2) [2,5) [5,7) [7,10)
    assert n == 4 and pooled.shape == (4, 2)
    np.testing.assert_allclose(pooled[:, 0], [0.5, 3.0, 5.5, 8.0])
    np.testing.assert_allclose(fit_length(x, 1)[0], [[4.5, 4.5]])  # everything is kept, averaged
    empty, n = fit_length(np.zeros((0, 3), np.float32), 2)
    assert n == 0 and empty.shape == (2, 3)


def test_mini_dataset_to_pickle(mini_run, cfg):
    out, summary = mini_run
    assert (summary.total, summary.done, summary.extracted, summary.failed) == (6, 6, 6, 0)
    assert summary.split_counts == {"train": 2, "valid": 2, "test": 2}
    ff = load_features(out, model_cfg=cfg)
    assert ff.label_scale == "mosi"
    for split, ids in MINI_IDS.items():
        d = ff.splits[split]
        assert list(d["id"]) == ids  # label.csv order within each split
        assert d["text_bert"].shape == (2, 3, TEXT_LEN)
        assert d["text"].shape[:2] == (2, TEXT_LEN)
        assert d["audio"].shape == (2, AUDIO_LEN, 33)
        assert d["vision"].shape == (2, VISION_LEN, cfg.model.vision_dim)
        assert (d["audio_lengths"] > 0).all() and (d["audio_lengths"] <= AUDIO_LEN).all()
        assert (d["vision_lengths"] > 0).all() and (d["vision_lengths"] <= VISION_LEN).all()
    np.testing.assert_allclose(ff.splits["train"]["regression_labels"], [2.4, -2.4])
    assert list(ff.splits["test"]["raw_text"]) == ["Great acting, great story.", "Boring and far too long."]
    assert list(ff.splits["valid"]["annotations"]) == ["Positive", "Negative"]
    assert "regression_labels_T" not in ff.splits["train"]  # empty unimodal columns
    meta = ff.meta
    assert meta["schema_version"] == 1 and meta["text_model"] == cfg.model.text_model
    assert meta["lengths"] == {"text": TEXT_LEN, "audio": AUDIO_LEN, "vision": VISION_LEN}
    assert len(meta["feature_names"]["audio"]) == 33
    assert len(meta["feature_names"]["vision"]) == cfg.model.vision_dim
    assert meta["extract"]["visual"]["fps"] == 2.0
    assert meta["transcript_sources"]["train"] == ["label.csv", "label.csv"]
    assert meta["sources"]["test"][0].endswith("Raw/spk1/3.mp4")
    assert len(meta["face_fraction"]["valid"]) == 2
    assert summary.pooled_vision > 0  # ~3 s at 2 fps > VISION_LEN frames: pooled, not cut
    assert _read_failures(out.with_name("features.failures.csv")) == []


def test_rerun_uses_cache_and_gives_same_output(mini_run, data_dir, cfg):
    out, _ = mini_run
    first = _raw(out)
    again = extract(data_dir / "mini_dataset", out, cfg, quiet=True)
    assert (again.extracted, again.cached, again.done) == (0, 6, 6)
    _assert_same_splits(first, _raw(out))
    entries = list((out.parent / ".almt_cache").rglob("*.npz"))
    assert len(entries) == 6


@pytest.mark.slow  # spawns worker processes that each load the models (~10-40 s)
def test_workers_give_same_output(mini_run, data_dir, cfg, tmp_path):
    out, _ = mini_run
    out2 = tmp_path / "par.pkl"
    summary = extract(data_dir / "mini_dataset", out2, cfg, workers=2, quiet=True)
    assert (summary.extracted, summary.failed) == (6, 0)
    _assert_same_splits(_raw(out), _raw(out2), exact=False)


def test_plain_folder_keeps_good_clips_and_reports_bad_ones(tmp_path, data_dir, cfg, caplog):
    folder = tmp_path / "clips"
    shutil.copytree(data_dir / "plain_folder", folder)
    bad = {
        "empty.mp4": "empty file",
        "not_a_video.mp4": "not a media file",
        "no_audio.mp4": "no audio stream",
        "audio_only.mp4": "no video stream",
        "too_short.mp4": "too short",
        "truncated.mp4": "truncated",
    }
    (folder / "bad").mkdir()
    for name in bad:
        shutil.copy(data_dir / name, folder / "bad" / name)
    bad["broken.mp4"] = "not a media file"
    out = tmp_path / "out" / "plain.pkl"
    with caplog.at_level(logging.WARNING, logger="almt_pipeline"):
        summary = extract(folder, out, cfg, quiet=True)
    assert (summary.done, summary.failed) == (3, len(bad))
    ff = load_features(out, model_cfg=cfg, splits=["test"], require_labels=False)
    assert set(ff.splits) == {"test"}
    assert list(ff.splits["test"]["id"]) == ["clips$_$good_a", "clips$_$good_b", "clips/more$_$good_c"]
    assert np.isnan(ff.splits["test"]["regression_labels"]).all()
    assert ff.meta["transcript_sources"]["test"] == ["sidecar", "asr", "asr"]
    assert summary.asr_clips == 2
    assert ff.splits["test"]["raw_text"][0] == "I loved this movie."

    rows = _read_failures(out.with_name("plain.failures.csv"))
    assert len(rows) == len(bad)
    by_name = {Path(r["path"]).name: r for r in rows}
    for name, cause in bad.items():
        row = by_name[name]
        assert cause in row["message"], (name, row["message"])
        assert row["error_type"] == "MediaError" and row["id"]
    # one line per bad clip naming the file, no traceback
    for name in bad:
        lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert lines and all("\n" not in ln and "Traceback" not in ln for ln in lines)


def test_interrupted_run_resumes(mini_run, data_dir, cfg, tmp_path, monkeypatch, caplog):
    out = tmp_path / "features.pkl"
    original = ClipExtractor.__call__
    calls = {"n": 0}

    def interrupted_after_two(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ClipExtractor, "__call__", interrupted_after_two)
    with caplog.at_level(logging.WARNING, logger="almt_pipeline"), pytest.raises(KeyboardInterrupt):
        extract(data_dir / "mini_dataset", out, cfg, quiet=True)
    assert not out.exists()
    assert any("run the same command again to resume" in r.getMessage() for r in caplog.records)
    assert len(list((tmp_path / ".almt_cache").rglob("*.npz"))) == 2

    monkeypatch.setattr(ClipExtractor, "__call__", original)
    summary = extract(data_dir / "mini_dataset", out, cfg, quiet=True)
    assert (summary.cached, summary.extracted, summary.done) == (2, 4, 6)
    _assert_same_splits(_raw(mini_run[0]), _raw(out))


def test_unexpected_error_in_one_clip_is_reported(data_dir, cfg, tmp_path, monkeypatch):
    original = ClipExtractor.__call__

    def fails_on_one(self, path, *args, **kwargs):
        if Path(path).parent.name == "spk2" and Path(path).stem == "2":
            raise ValueError("something odd\nsecond line")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(ClipExtractor, "__call__", fails_on_one)
    out = tmp_path / "f.pkl"
    summary = extract(data_dir / "mini_dataset", out, cfg, quiet=True)
    assert (summary.done, summary.failed) == (5, 1)
    (row,) = _read_failures(tmp_path / "f.failures.csv")
    assert row["id"] == "spk2$_$2" and row["error_type"] == "ValueError"
    assert "unexpected ValueError: something odd second line" in row["message"]
    assert list(load_features(out, model_cfg=cfg).splits["valid"]["id"]) == ["spk2$_$1"]


def test_width_mismatch_is_a_config_error_before_any_clip(data_dir, tmp_path):
    cfg = _cfg(audio_dim=34)
    with pytest.raises(ConfigError, match=r"33-d .* model\.audio_dim is 34"):
        extract(data_dir / "mini_dataset", tmp_path / "x.pkl", cfg, quiet=True)
    assert cfg.model.audio_dim == 34  # the config is not changed
    assert not any(tmp_path.iterdir())


def test_all_clips_failed_writes_no_pickle(data_dir, cfg, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("empty.mp4", "not_a_video.mp4"):
        shutil.copy(data_dir / name, folder / name)
    out = tmp_path / "features.pkl"
    with pytest.raises(ExtractionError, match="all 2 clips failed"):
        extract(folder, out, cfg, quiet=True)
    assert not out.exists()
    assert len(_read_failures(tmp_path / "features.failures.csv")) == 2


def test_clip_extractor_result(data_dir, cfg):
    ex = ClipExtractor(cfg)
    r = ex(data_dir / "speech_face.mp4", "a transcript")
    assert r.transcript_source == "label.csv" and r.raw_text == "a transcript"
    assert r.text_bert.shape == (3, TEXT_LEN) and r.text.shape[0] == TEXT_LEN
    assert r.audio.shape[1] == 33 and r.audio.shape[0] > AUDIO_LEN // 2
    assert r.vision.shape[1] == cfg.model.vision_dim and r.vision.shape[0] >= 5
    assert 0.0 < r.face_fraction <= 1.0 and r.duration == pytest.approx(2.88, abs=0.1)
    assert {"probe", "audio_decode", "audio", "text", "video_decode", "face", "total"} <= set(r.timings)
    r2 = ex(data_dir / "with_sidecar.mp4")
    assert r2.transcript_source == "sidecar"
