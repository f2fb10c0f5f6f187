"""Extraction runner: folder/dataset -> MMSA pickle, failures, cache, workers, interruption."""

import csv
import errno
import fcntl
import logging
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from almt_pipeline import files
from almt_pipeline.cli import app
from almt_pipeline.config import config_from_dict, replace_config
from almt_pipeline.errors import ConfigError, ExtractionError, MediaError
from almt_pipeline.extractors.clip import ClipExtractor, ClipResult
from almt_pipeline.extractors.runner import extract
from almt_pipeline.extractors.summary import ExtractSummary
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


@pytest.mark.slow  # extracts a folder of good and bad clips end to end
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


@pytest.mark.slow  # extracts the mini dataset twice
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



def test_look_ahead_gives_the_same_result_and_keeps_errors_with_their_clip(data_dir, cfg, monkeypatch):
    """A batch opens the next clip (probe + audio decode) while the current one is computed: the
    result is the same as without, an error of a clip opened ahead is raised by the call for that
    clip, and a look-ahead for another clip is not used."""
    import almt_pipeline.extractors.clip as clip_module

    ex = ClipExtractor(cfg)
    good, bad = data_dir / "speech_face.mp4", data_dir / "not_a_video.mp4"
    plain = ex(good, "a transcript")
    real_probe, calls = clip_module.probe, []
    monkeypatch.setattr(clip_module, "probe", lambda p, **kw: calls.append(Path(p)) or real_probe(p, **kw))
    ex.look_ahead(good)
    ahead = ex(good, "a transcript")
    assert calls == [good]  # opened once, ahead of the call
    for name in ("text_bert", "text", "audio", "vision"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(ahead, name))
    assert ahead.duration == plain.duration and ahead.face_fraction == plain.face_fraction

    ex.look_ahead(bad)  # the error waits for the call for that clip
    with pytest.raises(MediaError, match="not_a_video.mp4"):
        ex(bad, "a transcript")

    calls.clear()
    ex.look_ahead(bad)  # not the clip called next: ignored, the clip is opened by the call
    assert ex(good, "a transcript").duration == plain.duration
    assert good in calls


def test_a_batch_opens_every_clip_but_the_first_ahead(mini_run, data_dir, cfg, tmp_path, monkeypatch):
    opened = []
    real_open = ClipExtractor._open

    def spy(self, path, decode):
        opened.append((path.name, decode))
        return real_open(self, path, decode)

    monkeypatch.setattr(ClipExtractor, "_open", spy)
    out = tmp_path / "features.pkl"
    summary = extract(data_dir / "mini_dataset", out, cfg, quiet=True)
    assert summary.extracted == len(opened) > 2  # each clip opened once: the first by its call,
    assert sorted(decode for _, decode in opened) == [False] + [True] * (len(opened) - 1)  # the rest ahead
    _assert_same_splits(_raw(mini_run[0]), _raw(out))  # the same file as the mini run's

# ---------------------------------------------------------------------------------------------
# failing early, losing nothing


@pytest.fixture
def count_clips(monkeypatch):
    """Counts the clips ClipExtractor is asked to extract (it still extracts them)."""
    original = ClipExtractor.__call__
    calls = []

    def counted(self, path, *args, **kwargs):
        calls.append(path)
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(ClipExtractor, "__call__", counted)
    return calls


def _out_is_a_folder(tmp_path):
    (tmp_path / "out.pkl").mkdir()
    return {"out_path": tmp_path / "out.pkl"}, tmp_path / "out.pkl"


def _out_folder_cannot_be_made(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return {"out_path": tmp_path / "a_file" / "sub" / "f.pkl"}, tmp_path / "a_file" / "sub" / "f.pkl"


def _failures_file_is_a_folder(tmp_path):
    (tmp_path / "f.failures.csv").mkdir()
    return {"out_path": tmp_path / "f.pkl"}, tmp_path / "f.failures.csv"


def _cache_is_a_file(tmp_path):
    (tmp_path / "cache").write_text("x")
    return {"out_path": tmp_path / "f.pkl", "cache_dir": tmp_path / "cache"}, tmp_path / "cache"


@pytest.mark.parametrize("case", [_out_is_a_folder, _out_folder_cannot_be_made, _failures_file_is_a_folder,
                                  _cache_is_a_file])
def test_unwritable_output_location_fails_before_any_clip(case, data_dir, cfg, tmp_path, count_clips):
    kwargs, named = case(tmp_path)
    out_path = kwargs.pop("out_path")
    with pytest.raises(OSError) as info:
        extract(data_dir / "mini_dataset", out_path, cfg, quiet=True, **kwargs)
    message = str(info.value)
    assert message.startswith(str(named)) and ": " in message and "\n" not in message  # names the path
    assert count_clips == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder_fails_before_any_clip(data_dir, cfg, tmp_path, count_clips):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=rf"^{folder / 'f.pkl'}: cannot write \(Permission denied\)"):
            extract(data_dir / "mini_dataset", folder / "f.pkl", cfg, quiet=True, cache_dir=tmp_path / "c")
    finally:
        folder.chmod(0o755)
    assert count_clips == []


def test_cli_names_an_unwritable_output_in_one_line(data_dir, tmp_path):
    (tmp_path / "out.pkl").mkdir()
    config = tmp_path / "small.yaml"
    config.write_text("model: {text_len: 16, audio_len: 64, vision_len: 4}\n"
                      "extract: {visual: {fps: 2.0, max_side: 160}}\n")
    r = CliRunner().invoke(app, ["extract", str(data_dir / "mini_dataset"), "-o", str(tmp_path / "out.pkl"),
                                 "-c", str(config), "-q"])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert lines == [f"error: {tmp_path / 'out.pkl'}: is a folder; a file name is needed here"], r.output
    assert not list(tmp_path.rglob("*.npz"))  # nothing was extracted


def _dataset_with_labels(src: Path, dst: Path, labels: dict[str, str]) -> Path:
    """A copy of ``src`` (label.csv + Raw/) with the labels of some ``video_id$_$clip_id`` replaced."""
    if not dst.exists():
        shutil.copytree(src, dst)
    with open(src / "label.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["label"] = labels.get(f"{row['video_id']}$_${row['clip_id']}", row["label"])
    with open(dst / "label.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dst


@pytest.fixture(scope="module")
def labels_workdir(tmp_path_factory):
    """One copy of the mini dataset and one cache for the label tests (labels are not in the
    cache key, so only the first of them extracts clips)."""
    return tmp_path_factory.mktemp("labels")


SIMS_LIKE = {"spk1$_$1": "0.8", "spk1$_$2": "-0.8", "spk2$_$1": "0.6", "spk2$_$2": "-0.6", "spk1$_$3": "0.4",
             "spk2$_$3": "-0.4"}


@pytest.mark.parametrize("labels,scale,bad,message", [
    ({"spk2$_$1": "5.0"}, "auto", "spk2$_$1", "label 5 is outside [-3, 3], the range of label scale mosi"),
    ({**SIMS_LIKE, "spk1$_$3": "1.5"}, "sims", "spk1$_$3",
     "label 1.5 is outside [-1, 1], the range of label scale sims"),
])
def test_labels_outside_the_label_scale_are_reported_at_extract(labels, scale, bad, message, data_dir, labels_workdir,
                                                                caplog):
    cfg = replace_config(_cfg(), train={"label_scale": scale})
    dataset = _dataset_with_labels(data_dir / "mini_dataset", labels_workdir / "ds", labels)
    out = labels_workdir / f"{scale}.pkl"
    with caplog.at_level(logging.WARNING, logger="almt_pipeline"):
        summary = extract(dataset, out, cfg, quiet=True, cache_dir=labels_workdir / "cache")
    assert (summary.done, summary.failed) == (5, 1)
    (row,) = _read_failures(out.with_name(f"{scale}.failures.csv"))
    assert row["id"] == bad and row["error_type"] == "InvalidRow" and message in row["message"]
    assert [r.getMessage() for r in caplog.records if message in r.getMessage()]  # one warning line
    ff = load_features(out, model_cfg=cfg)  # train would have refused the whole file before
    assert bad not in {i for d in ff.splits.values() for i in d["id"]}
    assert ff.label_scale == ("mosi" if scale == "auto" else scale)


def _old(path: Path) -> Path:
    path.write_bytes(b"partial")
    past = time.time() - 3600
    os.utime(path, (past, past))
    return path


def test_remove_stale_temp_files_keeps_what_a_writer_may_still_hold(tmp_path):
    stale = _old(tmp_path / ".f.pkl.k2j4h5g6.tmp")
    other = _old(tmp_path / ".g.csv.a1b2c3d4.tmp")
    of_longer_name = _old(tmp_path / ".f.pkl.old.a1b2c3d4.tmp")  # the temp file of f.pkl.old, not f.pkl
    fresh = tmp_path / ".f.pkl.z9y8x7w6.tmp"
    fresh.write_bytes(b"being written")
    locked = _old(tmp_path / ".f.pkl.q1w2e3r4.tmp")
    real = _old(tmp_path / "f.pkl")
    with open(locked, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live writer holds it
        assert files.remove_stale_temp_files(tmp_path, "f.pkl") == 1
        assert not stale.exists() and other.exists() and of_longer_name.exists()
        assert files.remove_stale_temp_files(tmp_path) == 2  # every name: other, of_longer_name
    assert fresh.exists() and locked.exists() and real.exists()
    assert not other.exists() and not of_longer_name.exists()
    assert files.remove_stale_temp_files(tmp_path / "missing") == 0


def test_atomic_write_holds_its_temp_file_until_renamed(tmp_path):
    target = tmp_path / "f.txt"
    with files.atomic_write(target, "w") as f:
        f.write("complete")
        (tmp,) = tmp_path.glob(".f.txt.*.tmp")
        past = time.time() - 3600
        os.utime(tmp, (past, past))  # even an old-looking temp file is kept while it is held
        assert files.remove_stale_temp_files(tmp_path, "f.txt") == 0
    assert target.read_text() == "complete"


def test_extract_removes_temp_files_of_interrupted_writes(mini_run, data_dir, cfg):
    out, _ = mini_run
    (cache_dir,) = (out.parent / ".almt_cache").iterdir()
    entry = next(cache_dir.glob("*.npz"))
    stale = [_old(out.parent / f".{out.name}.a1b2c3d4.tmp"),
             _old(out.parent / f".{out.stem}.failures.csv.e5f6g7h8.tmp"),
             _old(cache_dir / f".{entry.name}.i9j0k1l2.tmp")]
    summary = extract(data_dir / "mini_dataset", out, cfg, quiet=True)
    assert summary.cached == 6
    assert [p for p in stale if p.exists()] == []


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_atomic_write_names_the_file_when_the_disk_is_full(where, tmp_path, monkeypatch):
    # A full disk cannot be arranged here (no tmpfs to mount): the OSError it gives is raised by
    # the write itself or, with delayed allocation, by the fsync that makes the data durable.
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    target = tmp_path / "sub" / "f.pkl"
    target.parent.mkdir()
    target.write_text("old")
    if where == "fsync":
        def fsync(fd):
            raise full

        monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(OSError) as info, files.atomic_write(target, "w") as f:
        f.write("new")
        if where == "write":
            raise full
    assert str(info.value) == f"{target}: cannot write (No space left on device)"
    assert info.value.errno == errno.ENOSPC and info.value.__cause__ is full
    assert target.read_text() == "old" and os.listdir(target.parent) == ["f.pkl"]


def test_atomic_write_names_the_file_when_its_folder_cannot_be_made(tmp_path):
    (tmp_path / "a_file").write_text("x")
    target = tmp_path / "a_file" / "f.csv"
    with pytest.raises(NotADirectoryError) as info:
        files.atomic_write_csv(target, ["a"], [[1]])
    assert str(info.value) == f"{target}: cannot write ({tmp_path / 'a_file'} is not a folder)"


def test_summary_names_the_clips_without_any_face(mini_run):
    out, summary = mini_run
    meta = _raw(out)["meta"]
    no_face = [i for split, ids in MINI_IDS.items() for i, frac in zip(ids, meta["face_fraction"][split])
               if frac == 0.0]
    assert no_face and sorted(summary.no_face_ids) == sorted(no_face)
    assert f"({len(no_face)} clips without any face: {', '.join(summary.no_face_ids)})" in summary.to_text()

    many = ExtractSummary(out_path=None, failures_path=Path("f.csv"), no_face_clips=7,
                          no_face_ids=[f"v$_${k}" for k in range(7)])
    assert "(7 clips without any face: v$_$0, v$_$1, v$_$2, v$_$3, v$_$4 and 2 more)" in many.to_text()
    none = ExtractSummary(out_path=None, failures_path=Path("f.csv"))
    assert "(0 clips without any face)" in none.to_text()


def test_summary_names_truncated_padded_and_damaged_clips():
    def result(**kw):
        base = dict(text_bert=np.zeros((3, 4), np.float32), text=np.zeros((4, 2), np.float32),
                    audio=np.zeros((5, 3), np.float32), vision=np.zeros((5, 2), np.float32), raw_text="t",
                    transcript_source="sidecar", face_fraction=1.0, duration=1.0)
        return ClipResult(**{**base, **kw})

    summary = ExtractSummary(out_path=None, failures_path=Path("f.csv"), text_len=4)
    summary.count([("a$_$1", result(text_truncated=True)), ("a$_$2", result(decode_errors=3)),
                   ("a$_$3", result(audio_padded=2.8)), ("a$_$4", result())], audio_len=8, vision_len=8)
    text = summary.to_text()
    assert "transcripts: 0 by speech recognition, 1 truncated to model.text_len (4) tokens: a$_$1" in text
    assert "kept despite decode errors: 1: a$_$2" in text
    assert "short audio padded with silence: 1: a$_$3" in text
    quiet = ExtractSummary(out_path=None, failures_path=Path("f.csv"), text_len=4)
    quiet.count([("a$_$4", result())], audio_len=8, vision_len=8)
    assert "1 truncated" not in quiet.to_text() and "decode errors" not in quiet.to_text()


def test_summary_speed_leaves_model_loading_out(mini_run):
    timed = ExtractSummary(out_path=None, failures_path=Path("f.csv"), clip_seconds=30.0, total_seconds=9.0)
    timed.clip_done(100.0, 101.0)  # clips of two workers: the window runs from the first start
    timed.clip_done(100.5, 103.0)  # to the last end
    assert timed.extract_seconds == pytest.approx(3.0) and timed.speed == pytest.approx(10.0)
    assert "time: 9.0 s (3.0 s after loading the models), 30.0 clip-seconds extracted (10.0x real time)" \
        in timed.to_text()
    _, summary = mini_run  # a real run: the window lies inside the whole run
    assert 0.0 < summary.extract_seconds < summary.total_seconds


def test_feature_file_meta_records_decode_errors_and_padding(mini_run):
    out, _ = mini_run
    meta = _raw(out)["meta"]
    for split, ids in MINI_IDS.items():
        assert meta["decode_errors"][split] == [0] * len(ids)
        assert meta["audio_padded"][split] == [0.0] * len(ids)


def test_sigterm_stops_extract_like_ctrl_c(data_dir, cfg, tmp_path, monkeypatch, caplog):
    received = []

    def ours(signum, frame):  # stands in for whatever handler the caller had; also keeps a run
        received.append(signum)  # without the fix from killing the test session

    previous = signal.signal(signal.SIGTERM, ours)
    original = ClipExtractor.__call__
    calls = {"n": 0}

    def terminated_after_two(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ClipExtractor, "__call__", terminated_after_two)
    try:
        with caplog.at_level(logging.WARNING, logger="almt_pipeline"), \
                pytest.raises(KeyboardInterrupt, match="received SIGTERM"):
            extract(data_dir / "mini_dataset", tmp_path / "f.pkl", cfg, quiet=True)
        assert signal.getsignal(signal.SIGTERM) is ours  # the caller's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == []
    warnings = [r.getMessage() for r in caplog.records if "run the same command again to resume" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("received SIGTERM: 2 of 6 clips are finished")
    assert not (tmp_path / "f.pkl").exists()
    assert len(list((tmp_path / ".almt_cache").rglob("*.npz"))) == 2


def test_writes_never_replace_a_device_fifo_or_a_symlink(tmp_path):
    """Renaming over a FIFO (or /dev/null as root) would destroy it; a link's target is written."""
    fifo = tmp_path / "out.pkl"
    os.mkfifo(fifo)
    for write in (lambda: files.atomic_write_text(fifo, "x"), lambda: files.check_writable(fifo)):
        with pytest.raises(OSError, match=r"out\.pkl: not a regular file \(a device, FIFO or socket\)"):
            write()
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    real = tmp_path / "real.csv"
    real.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    files.atomic_write_csv(link, ["a"], [[1]])
    assert link.is_symlink() and real.read_text() == "a\n1\n"
