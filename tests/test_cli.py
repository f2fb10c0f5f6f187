"""The ``almt`` commands through Typer's runner: help, one-line errors, describe, evaluate."""

import pickle

import pytest
from synthetic import make_synthetic
from typer.testing import CliRunner

from almt_pipeline.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_every_command():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("extract", "train", "evaluate", "predict", "describe", "import-weights",
                "robustness", "ablate", "explain", "serve"):
        assert cmd in r.output


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_train_missing_feature_file(tmp_path):
    line = one_line_error(invoke("train", "--data", tmp_path / "nope.pkl", "--out", tmp_path / "run"))
    assert "nope.pkl" in line


def test_train_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"train": Evil()}))
    line = one_line_error(invoke("train", "--data", bad, "--out", tmp_path / "run"))
    assert "evil.pkl" in line and "refused" in line
    assert not marker.exists()


def test_unknown_config_key_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  fusion_dpeth: 3\n")
    line = one_line_error(invoke("describe", "--config", cfg))
    assert "fusion_dpeth" in line and "c.yaml" in line


def test_predict_without_checkpoint(tmp_path, monkeypatch, data_dir):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(invoke("predict", data_dir / "speech_face.mp4"))
    assert "runs" in line and "almt train" in line


def test_extract_missing_input(tmp_path):
    line = one_line_error(invoke("extract", tmp_path / "nothing", "--out", tmp_path / "f.pkl"))
    assert "nothing" in line


def test_describe_counts_for_minilm():
    r = invoke("describe", "--config", "mosi", "--text-model", "sentence-transformers/all-MiniLM-L6-v2")
    assert r.exit_code == 0, r.output
    assert "parameters excluding the text model: 2,554,497" in r.output
    assert "parameters including the text model: 25," in r.output  # + 22.7M MiniLM


@pytest.mark.parametrize("config, count", [
    ("mosi", "2,603,649"), ("mosei", "3,223,041"), ("sims", "3,232,897"),
])
def test_describe_reference_counts_without_bert_weights(config, count):
    """bert-base-* weights are not available offline; the count only needs their config."""
    r = invoke("describe", "--config", config)
    assert r.exit_code == 0, r.output
    assert f"parameters excluding the text model: {count}" in r.output


def test_bad_option_values():
    r = invoke("evaluate", "--split", "dev")
    assert r.exit_code == 1 and r.output == "error: --split must be one of train, valid, test, got 'dev'\n"
    r = invoke("extract", "nowhere", "--unlabeled-split", "holdout")
    assert r.exit_code == 1 and r.output.startswith("error: --unlabeled-split must be one of")
    r = invoke("evaluate", "--batch-size", "0", "--checkpoint", "nowhere")
    assert r.exit_code == 1 and r.output == "error: batch size must be positive, got 0\n"


def test_config_help_lists_the_real_built_ins():
    """extract takes only the configs made for the extractors; training takes every built-in."""
    def text(command):  # help without the panel borders, one space between words
        return " ".join(invoke(command, "--help").output.replace("│", " ").split())

    extract_help, train_help = text("extract"), text("train")
    assert "(default, pyfeat)" in extract_help and "mosei" not in extract_help
    assert "(default, pyfeat, mosi, mosei, sims, mosi-contrastive, sims-multitask)" in train_help
    r = invoke("extract", "nowhere", "--config", "mosi")
    assert r.exit_code == 1 and r.output.startswith("error: --config mosi is a training config")


def test_every_option_has_help():
    import click
    import typer.main

    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        for param in sub.params:
            if isinstance(param, click.Option):
                assert param.help, f"almt {name} {param.opts[0]} has no help text"


@pytest.fixture(scope="module")
def small_features(tmp_path_factory):
    """A valid feature file for the `default` config (MiniLM widths), small enough to load at once."""
    path = tmp_path_factory.mktemp("data") / "features.pkl"
    make_synthetic(path, n=(4, 2, 2), text_len=50, audio=(20, 33), vision=(16, 160), text_dim=384)
    return path


@pytest.mark.parametrize("option, value, named", [
    ("--lr", "-1", "train.lr"), ("--lr", "nan", "train.lr"), ("--lr", "inf", "train.lr"),
    ("--epochs", "0", "train.epochs"), ("--batch-size", "0", "train.batch_size"),
    ("--patience", "0", "train.patience"), ("--seeds", "1,a", "--seeds"),
])
def test_bad_train_options_are_one_line_and_make_no_run(option, value, named, small_features, tmp_path,
                                                          monkeypatch):
    """Checked before anything is written: one error line, exit 1, no runs/ directory."""
    monkeypatch.chdir(tmp_path)
    line = one_line_error(invoke("train", "--data", small_features, option, value))
    assert named in line
    assert list(tmp_path.iterdir()) == []


def test_train_failing_before_the_first_epoch_leaves_no_run(small_features, tmp_path, monkeypatch):
    """The text model is loaded after the run directory is made: its failure takes the run away."""
    monkeypatch.chdir(tmp_path)
    line = one_line_error(invoke("train", "--data", small_features, "--text-model", tmp_path / "no_bert"))
    assert "no_bert" in line
    assert list(tmp_path.iterdir()) == []
    line = one_line_error(invoke("train", "--data", tmp_path / "missing.pkl"))
    assert "missing.pkl" in line and list(tmp_path.iterdir()) == []


def test_os_errors_are_one_line_naming_the_file(tmp_path, monkeypatch):
    """A write failing deep inside a command (a full disk, say) ends in one line naming the file."""
    from almt_pipeline import runs

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device\n(while writing)", str(tmp_path / "run" / "run.json"))

    monkeypatch.setattr(runs, "check_run_dir", disk_full)
    line = one_line_error(invoke("train", "--out", tmp_path / "run"))
    assert "No space left on device (while writing)" in line and "run.json" in line


def test_extract_pyfeat_weights_and_device_reach_the_config(tmp_path, monkeypatch):
    import types

    seen = {}

    def fake_extract(input, out, cfg, **kwargs):
        seen["cfg"] = cfg
        return types.SimpleNamespace(failed=0)

    monkeypatch.setattr("almt_pipeline.extractors.runner.extract", fake_extract)
    monkeypatch.chdir(tmp_path)
    r = invoke("extract", tmp_path, "--config", "pyfeat", "--pyfeat-weights", "w", "--device", "cuda:1")
    assert r.exit_code == 0, r.output
    visual = seen["cfg"].extract.visual
    assert visual.pyfeat_weights == str(tmp_path.resolve() / "w") and visual.pyfeat_device == "cuda:1"
    invoke("extract", tmp_path, "--config", "pyfeat")
    visual = seen["cfg"].extract.visual
    assert visual.pyfeat_weights is None and visual.pyfeat_device == "auto"  # --device cpu leaves the config's
    invoke("extract", tmp_path, "--config", "default", "--device", "cuda")
    assert seen["cfg"].extract.visual.pyfeat_device == "auto"  # the landmarks backend: nothing to move
    assert "--pyfeat-weights" in invoke("extract", "--help").output
