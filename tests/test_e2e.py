"""The three bare commands in an empty working directory, on the committed mini dataset.

    almt extract <dataset>    -> ./features.pkl
    almt train                -> runs/<time>/checkpoint
    almt predict <clip>       -> a score for a clip the model never saw

Real extractors (MiniLM text model, librosa audio, dlib landmarks) and the real model run here,
offline; the only thing made small is the number of epochs, through a config file.
"""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from almt_pipeline.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir):
    """Run extract + train once (bare commands) and share the working directory."""
    import os

    work = tmp_path_factory.mktemp("work")
    old = os.getcwd()
    os.chdir(work)
    try:
        r = invoke("extract", data_dir / "mini_dataset", "--quiet")
        assert r.exit_code == 0, r.output
        assert (work / "features.pkl").is_file()
        r = invoke("train", "--epochs", "3", "--quiet")
        assert r.exit_code == 0, r.output
    finally:
        os.chdir(old)
    return work


def test_train_wrote_a_run(workdir):
    runs = list((workdir / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    for name in ("checkpoint/config.json", "checkpoint/model.safetensors", "log.jsonl", "curves.png",
                 "summary.json"):
        assert (run / name).exists(), name
    lines = (run / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_predict_new_clip_with_latest_checkpoint(workdir, data_dir, monkeypatch):
    monkeypatch.chdir(workdir)
    r = invoke("predict", data_dir / "speech_face.mp4", "--json")
    assert r.exit_code == 0, r.output
    row = json.loads([ln for ln in r.output.splitlines() if ln.startswith("{")][0])
    assert -10 < row["score"] < 10
    assert row["polarity"] in ("negative", "neutral", "positive")
    assert row["transcript_source"] == "asr"
    assert row["transcript"]
    assert 0.0 <= row["face_fraction"] <= 1.0
    assert row["label_scale"] == "mosi"


def test_predict_human_output_and_sidecar(workdir, data_dir, monkeypatch):
    monkeypatch.chdir(workdir)
    r = invoke("predict", data_dir / "with_sidecar.mp4")
    assert r.exit_code == 0, r.output
    assert "sentiment" in r.output and "(from sidecar)" in r.output


def test_predict_folder_with_bad_clip(workdir, data_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    folder = tmp_path / "clips"
    shutil.copytree(data_dir / "plain_folder", folder)
    out = tmp_path / "preds.csv"
    r = invoke("predict", folder, "--out", out)
    assert r.exit_code == 1
    assert r.output.count("error: ") == 1 and "broken.mp4" in r.output
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 4  # header + 3 good + 1 failed
    assert "3 clip(s) scored, 1 failed" in r.output


def test_predict_bad_file_is_one_line(workdir, data_dir, monkeypatch):
    monkeypatch.chdir(workdir)
    r = invoke("predict", data_dir / "not_a_video.mp4")
    assert r.exit_code == 1
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "not_a_video.mp4" in errors[0]
    assert "Traceback" not in r.output


def test_evaluate_latest_checkpoint(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    r = invoke("evaluate", "--predictions", "preds.csv")
    assert r.exit_code == 0, r.output
    assert "MAE" in r.output
    assert len((workdir / "preds.csv").read_text().splitlines()) == 3  # header + 2 test clips


def test_an_objective_checkpoint_predicts_and_evaluates(workdir, data_dir, tmp_path):
    """A checkpoint trained with auxiliary objectives rebuilds its heads: predict gives the balanced
    score, evaluate also scores the unimodal heads."""
    out = tmp_path / "objective_run"
    r = invoke("train", "--data", workdir / "features.pkl", "--objective", "multitask+contrastive",
               "--epochs", "2", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "multitask+contrastive" and set(summary["stage_weights"]) == {"fused", "T", "A", "V"}
    r = invoke("predict", data_dir / "with_sidecar.mp4", "--checkpoint", out / "checkpoint", "--json")
    assert r.exit_code == 0, r.output
    row = json.loads([ln for ln in r.output.splitlines() if ln.startswith("{")][0])
    assert -10 < row["score"] < 10
    r = invoke("evaluate", "--checkpoint", out / "checkpoint", "--data", workdir / "features.pkl")
    assert r.exit_code == 0, r.output
    assert "unimodal head V (against the multimodal label)" in r.output


def test_library_predictor_reuses_models(workdir, data_dir):
    from almt_pipeline import Predictor

    ckpt = next((workdir / "runs").iterdir()) / "checkpoint"
    p = Predictor(ckpt, device="cpu")
    a = p.predict(data_dir / "with_sidecar.mp4")
    b = p.predict(data_dir / "with_sidecar.mp4")
    assert a.score == pytest.approx(b.score, abs=1e-5)
    assert a.transcript_source == "sidecar"


def test_mmsa_loader_reads_extracted_file(workdir):
    """thuiar/MMSA's own MMDataset reads the file `almt extract` wrote (MMSA installed --no-deps)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("MMSA")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("MMSA is not installed (make setup installs it with --no-deps)")
    loader_path = Path(next(iter(spec.submodule_search_locations))) / "data_loader.py"
    mod_spec = importlib.util.spec_from_file_location("_mmsa_data_loader_e2e", loader_path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    args = {"dataset_name": "mosi", "featurePath": str(workdir / "features.pkl"), "custom_feature": None,
            "feature_T": None, "feature_A": None, "feature_V": None, "use_bert": True,
            "need_data_aligned": False, "need_normalized": False, "feature_dims": [0, 0, 0]}
    for mode, n in (("train", 2), ("valid", 2), ("test", 2)):
        ds = mod.MMDataset(dict(args), mode=mode)
        assert len(ds) == n
        item = ds[0]
        assert tuple(item["text"].shape) == (3, 50)
        assert tuple(item["audio"].shape) == (250, 33) and tuple(item["vision"].shape) == (60, 160)


def _edited_checkpoint(workdir, tmp_path, edit):
    ckpt = next((workdir / "runs").iterdir()) / "checkpoint"
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    meta = json.loads((copy / "config.json").read_text())
    edit(meta)
    (copy / "config.json").write_text(json.dumps(meta))
    return copy


def test_predict_refuses_features_the_extractors_cannot_make(workdir, data_dir, tmp_path):
    def rename_feature(meta):
        meta["feature_meta"]["feature_names"]["vision"][5] = "AU12_r"

    ckpt = _edited_checkpoint(workdir, tmp_path, rename_feature)
    line = one_line_error(invoke("predict", data_dir / "with_sidecar.mp4", "--checkpoint", ckpt))
    assert "vision features" in line and "installed extractors produce" in line


def test_predict_refuses_checkpoint_without_extraction_settings(workdir, data_dir, tmp_path):
    """A checkpoint trained on an official pickle (no meta) cannot featurise raw clips."""
    def drop_meta(meta):
        meta["feature_meta"] = {}

    ckpt = _edited_checkpoint(workdir, tmp_path, drop_meta)
    line = one_line_error(invoke("predict", data_dir / "with_sidecar.mp4", "--checkpoint", ckpt))
    assert "without extraction settings" in line


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_predict_and_evaluate_agree_on_the_test_clips(workdir, data_dir, tmp_path, monkeypatch):
    """`almt predict` on a test clip scores what `almt evaluate` scores for it after `almt extract`.

    The clips are copied with their label.csv transcript as a sidecar, so both paths see the same
    text; everything else (decoding, features, padding, the model) runs through each command.
    """
    import csv

    monkeypatch.chdir(workdir)
    r = invoke("evaluate", "--split", "test", "--predictions", tmp_path / "eval.csv", "--quiet")
    assert r.exit_code == 0, r.output
    with open(tmp_path / "eval.csv", newline="") as f:
        evaluated = {row["id"]: float(row["prediction"]) for row in csv.DictReader(f)}

    dataset = data_dir / "mini_dataset"
    with open(dataset / "label.csv", newline="") as f:
        tests = [row for row in csv.DictReader(f) if row["mode"] == "test"]
    folder = tmp_path / "test_clips"
    folder.mkdir()
    for row in tests:
        name = f"{row['video_id']}_{row['clip_id']}"
        shutil.copy(dataset / "Raw" / row["video_id"] / f"{row['clip_id']}.mp4", folder / f"{name}.mp4")
        (folder / f"{name}.txt").write_text(row["text"], encoding="utf-8")
    r = invoke("predict", folder, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    predicted = {}
    for line in r.output.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            assert row["transcript_source"] == "sidecar"
            video_id, clip_id = Path(row["path"]).stem.split("_")
            predicted[f"{video_id}$_${clip_id}"] = row["score"]
    assert predicted.keys() == evaluated.keys() and len(predicted) == len(tests) == 2
    for clip_id, score in predicted.items():
        assert score == pytest.approx(evaluated[clip_id], abs=1e-4), clip_id
