"""Input discovery: label.csv datasets and plain folders (no media decoding involved)."""

import math
from pathlib import Path

import pytest

from almt_pipeline.errors import ConfigError, ExtractionError
from almt_pipeline.extractors.dataset import discover, has_unimodal_labels, list_plain_clips

HEADER = "video_id,clip_id,text,label,label_T,label_A,label_V,annotation,mode\n"


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _dataset(root: Path, rows: str, clips: list[str], header: str = HEADER) -> Path:
    (root / "label.csv").parent.mkdir(parents=True, exist_ok=True)
    (root / "label.csv").write_text(header + rows, encoding="utf-8")
    for c in clips:
        _touch(root / "Raw" / c)
    return root


def test_label_csv_order_ids_splits_and_labels(tmp_path):
    root = _dataset(
        tmp_path / "ds",
        "b,0002,second,-1.5,,,,Negative,valid\n"
        "a,0001,first,2.0,,,,Positive,train\n"
        "a,0003,,0.0,,,,Neutral,test\n",
        ["b/0002.mkv", "a/0001.mp4", "a/0003.webm"],
    )
    specs = discover(root)
    assert [s.id for s in specs] == ["b$_$0002", "a$_$0001", "a$_$0003"]  # file order, zeros kept
    assert [s.split for s in specs] == ["valid", "train", "test"]
    assert [s.label for s in specs] == [-1.5, 2.0, 0.0]
    assert specs[0].path.name == "0002.mkv" and specs[0].text == "second"
    assert specs[0].text_source == "label.csv" and specs[0].annotation == "Negative"
    assert specs[2].text is None and specs[2].text_source is None  # -> speech recognition
    assert all(s.problem is None for s in specs)
    assert not has_unimodal_labels(specs)


def test_label_csv_sidecar_used_when_text_empty(tmp_path):
    root = _dataset(tmp_path, "v,1,,1.0,,,,,test\n", ["v/1.mp4"])
    (root / "Raw" / "v" / "1.txt").write_text("from the sidecar\n", encoding="utf-8")
    (spec,) = discover(root)
    assert spec.text == "from the sidecar" and spec.text_source == "sidecar"


def test_label_csv_unimodal_labels(tmp_path):
    root = _dataset(tmp_path, "v,1,t,0.2,0.4,-0.2,,Positive,train\n", ["v/1.mp4"])
    (spec,) = discover(root)
    assert (spec.label_T, spec.label_A, spec.label_V) == (0.4, -0.2, None)
    assert has_unimodal_labels([spec])


def test_label_csv_bad_rows_are_reported_not_raised(tmp_path):
    root = _dataset(
        tmp_path,
        "v,1,ok,1.0,,,,,train\n"
        "v,2,bad mode,1.0,,,,,training\n"
        "v,3,bad label,positive,,,,,test\n"
        "v,4,missing clip,1.0,,,,,test\n"
        "v,1,duplicate,1.0,,,,,test\n"
        "v,5,bad unimodal,1.0,x,,,,test\n",
        ["v/1.mp4", "v/2.mp4", "v/3.mp4", "v/5.mp4"],
    )
    specs = discover(root)
    assert len(specs) == 6
    problems = [s.problem for s in specs]
    assert problems[0] is None
    assert "line 3" in problems[1] and "mode 'training'" in problems[1]
    assert "label 'positive' is not a number" in problems[2]
    assert "clip file not found" in problems[3] and "Raw/v/4" in problems[3]
    assert "duplicate id" in problems[4]
    assert "label_T 'x' is not a number" in problems[5]


def test_label_csv_missing_column_is_one_clear_error(tmp_path):
    root = _dataset(tmp_path, "v,1,1.0,train\n", ["v/1.mp4"], header="video_id,clip_id,label,mode\n")
    with pytest.raises(ExtractionError, match=r"label\.csv: missing column\(s\) text"):
        discover(root)


def test_mode_aliases_and_bom(tmp_path):
    (tmp_path / "label.csv").write_bytes(
        ("\ufeff" + HEADER + "v,1,t,1,,,,,VAL\nv,2,t,1,,,,,dev\n").encode("utf-8"))
    _touch(tmp_path / "Raw" / "v" / "1.mp4")
    _touch(tmp_path / "Raw" / "v" / "2.MP4")
    specs = discover(tmp_path)
    assert [s.split for s in specs] == ["valid", "valid"]
    assert all(s.problem is None for s in specs)


def test_plain_folder_recursive_sorted_with_sidecars(tmp_path):
    root = tmp_path / "clips"
    _touch(root / "b.mp4")
    _touch(root / "a.MOV")
    _touch(root / "sub" / "c.webm")
    _touch(root / "a.mkv")  # same stem as a.MOV
    _touch(root / "notes.txt")
    _touch(root / ".almt_cache" / "x.mp4")
    _touch(root / ".hidden.mp4")
    (root / "b.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nhello there\n", encoding="utf-8")
    specs = discover(root, unlabeled_split="valid")
    assert [s.path.relative_to(root).as_posix() for s in specs] == ["a.MOV", "a.mkv", "b.mp4", "sub/c.webm"]
    assert [s.id for s in specs] == ["clips$_$a", "clips$_$a.mkv", "clips$_$b", "clips/sub$_$c"]
    assert all(s.split == "valid" and math.isnan(s.label) for s in specs)
    assert specs[2].text == "hello there" and specs[2].text_source == "sidecar"
    assert specs[0].text is None


def test_single_file_and_errors(tmp_path):
    clip = _touch(tmp_path / "one.avi")
    (spec,) = discover(clip)
    assert spec.path == clip and spec.split == "test"
    with pytest.raises(ExtractionError, match="no such file"):
        discover(tmp_path / "missing")
    with pytest.raises(ExtractionError, match="no clips found"):
        list_plain_clips(_touch(tmp_path / "empty" / "readme.md").parent)
    with pytest.raises(ConfigError, match="unlabeled split"):
        discover(clip, unlabeled_split="holdout")


def test_committed_mini_dataset(data_dir):
    specs = discover(data_dir / "mini_dataset")
    assert [s.id for s in specs] == ["spk1$_$1", "spk1$_$2", "spk2$_$1", "spk2$_$2", "spk1$_$3", "spk2$_$3"]
    assert [s.split for s in specs] == ["train", "train", "valid", "valid", "test", "test"]
    assert all(s.problem is None and s.path.is_file() for s in specs)


def test_ids_that_would_leave_raw_are_refused_row_by_row(tmp_path):
    """A video_id / clip_id must name a folder / file directly under Raw/: each bad row becomes a
    one-line problem (no file outside the dataset is looked at) and the other rows go on."""
    outside = _touch(tmp_path / "secret.mp4")
    (tmp_path / "secret.txt").write_text("private words", encoding="utf-8")
    root = tmp_path / "ds"
    rows = [
        ("..", "secret", "has a '.' or '..' path part"),
        ("v", "../../secret", "has a '.' or '..' path part"),
        (str(tmp_path), "secret", "is an absolute path"),
        ("v", str(outside.with_suffix("")), "is an absolute path"),
        ("v", "sub/1", "contains a path separator"),
        ("v", "sub\\1", "contains a path separator"),
        ("v", "a\x00b", "contains a control character ('\\x00')"),
        ("v\x1b", "1", "contains a control character ('\\x1b')"),
    ]
    csv_rows = "".join(f'"{v}","{c}",,1.0,,,,,test\n' for v, c, _ in rows) + "v,1,fine,1.0,,,,,train\n"
    _dataset(root, csv_rows, ["v/1.mp4", "v/sub/1.mp4"])
    specs = discover(root)
    assert len(specs) == len(rows) + 1
    for spec, (_, _, reason) in zip(specs, rows, strict=False):
        assert spec.problem is not None and reason in spec.problem, spec.problem
        assert "\n" not in spec.problem and "\x00" not in spec.problem
        assert spec.text is None and spec.path == root / "label.csv"  # nothing outside was read
    assert specs[-1].problem is None and specs[-1].text == "fine"


def test_symlinks_inside_raw_are_followed(tmp_path):
    """Only the names in label.csv are checked: Raw/ may link to clips stored elsewhere."""
    store = tmp_path / "store"
    clip = _touch(store / "take1.mp4")
    root = _dataset(tmp_path / "ds", "v,1,t,1.0,,,,,train\nw,1,t,1.0,,,,,test\n", [])
    (root / "Raw" / "v").mkdir(parents=True)
    (root / "Raw" / "v" / "1.mp4").symlink_to(clip)
    (root / "Raw" / "w").symlink_to(store, target_is_directory=True)
    (store / "1.mp4").symlink_to(clip)
    specs = discover(root)
    assert [s.problem for s in specs] == [None, None]
    assert all(s.path.resolve() == clip for s in specs)
