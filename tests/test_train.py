"""Training, evaluation and resume on a tiny random BERT and tiny synthetic data (CPU, seconds)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_synthetic, make_tiny_text_model

from almt_pipeline import runs
from almt_pipeline.config import Config, ModelConfig, TrainConfig
from almt_pipeline.errors import AlmtError, ConfigError, TrainingError
from almt_pipeline.evaluate import evaluate
from almt_pipeline.features import SPLITS, load_features, save_features
from almt_pipeline.train import lr_at_epoch, make_scheduler, train

TEXT_LEN, AUDIO, VISION, TEXT_DIM = 12, (20, 5), (16, 6), 32


def tiny_config(text_model: Path, **train_overrides) -> Config:
    model = ModelConfig(
        text_model=str(text_model), text_len=TEXT_LEN, audio_dim=AUDIO[1], audio_len=AUDIO[0],
        vision_dim=VISION[1], vision_len=VISION[0], dim=16, n_tokens=4,
        embed_heads=2, embed_dim_head=8, embed_mlp_dim=16, ahl_depth=2, ahl_heads=2, ahl_dim_head=8,
        lang_heads=2, lang_dim_head=8, lang_mlp_dim=16,
        fusion_depth=1, fusion_heads=2, fusion_dim_head=8, fusion_mlp_dim=16,
    )
    t = dict(lr=1e-3, batch_size=8, epochs=2, warmup_ratio=0.1, seed=3, eval_batch_size=16)
    t.update(train_overrides)
    return Config(name="tiny", model=model, train=TrainConfig(**t))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    text_model = make_tiny_text_model(root / "bert")
    data = root / "data.pkl"
    make_synthetic(data, n=(24, 12, 12), text_len=TEXT_LEN, audio=AUDIO, vision=VISION,
                   text_dim=TEXT_DIM, seed=1)
    return text_model, data


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One 2-epoch run shared by several tests."""
    text_model, data = tiny
    out = tmp_path_factory.mktemp("run") / "run"
    summary = train(tiny_config(text_model), data, out, device="cpu", quiet=True, show_test_selected=True)
    return out, summary


def interrupted_after_epoch(monkeypatch, epoch: int | None, run) -> None:
    """``run()`` stopped by a Ctrl-C right after the resume state of ``epoch`` (None: the first) is saved."""
    real_save = runs.save_state

    def save_then_interrupt(path, state):
        real_save(path, state)
        if epoch is None or state["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_state", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(runs, "save_state", real_save)


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_lr_schedule_reference_values():
    lr = 1e-4
    assert lr_at_epoch(1, 200, 0.1, lr) == 0.0
    assert lr_at_epoch(2, 200, 0.1, lr) == pytest.approx(lr / 20)
    assert lr_at_epoch(21, 200, 0.1, lr) == pytest.approx(lr)
    assert lr_at_epoch(22, 200, 0.1, lr) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 180)))
    assert lr_at_epoch(200, 200, 0.1, lr) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 179 / 180)))
    # the scheduler stepped once per epoch gives the same values
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt, 200, 0.1)
    seen = {}
    for epoch in range(1, 201):
        seen[epoch] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    for epoch in (1, 2, 21, 100, 200):
        assert seen[epoch] == pytest.approx(lr_at_epoch(epoch, 200, 0.1, lr), abs=1e-15)


def test_train_end_to_end_writes_run_dir(trained):
    out, summary = trained
    for name in ("run.json", "log.jsonl", "log.csv", "curves.png", "summary.json",
                 "checkpoint/config.json", "checkpoint/model.safetensors",
                 "checkpoint/text_model/config.json", "last/state.pt"):
        assert (out / name).is_file(), name
    history = _history(out)
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[0]["lr"] == pytest.approx(1e-3)  # 2 epochs: no warm-up epoch
    assert {"MAE", "Corr", "Has0_acc_2", "Loss"} <= set(history[0]["valid"]) and "test" in history[0]
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert len(rows) == 2 and float(rows[1]["valid_MAE"]) == pytest.approx(history[1]["valid"]["MAE"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["selected_epoch"] == summary["selected_epoch"] in (1, 2)
    sel = history[summary["selected_epoch"] - 1]
    assert summary["test"] == pytest.approx(sel["test"])
    assert min(r["valid"]["MAE"] for r in history) == summary["selected_valid"]
    assert "test_selected_best_per_metric" in summary  # only because it was asked for
    ckpt_cfg = json.loads((out / "checkpoint/config.json").read_text())
    assert ckpt_cfg["info"]["epoch"] == summary["selected_epoch"]
    assert ckpt_cfg["feature_meta"]["dims"] == {"text": TEXT_DIM, "audio": AUDIO[1], "vision": VISION[1]}


def test_evaluate_matches_training_and_writes_predictions(trained, tiny, tmp_path):
    out, summary = trained
    _, data = tiny
    pred_csv = tmp_path / "pred.csv"
    result = evaluate(out / "checkpoint", data, split="test", predictions_path=pred_csv, device="cpu", quiet=True)
    assert result["n"] == 12
    for k, v in summary["test"].items():
        assert result["metrics"][k] == pytest.approx(v, abs=1e-5), k
    rows = list(csv.DictReader(pred_csv.open()))
    assert len(rows) == 12 and list(rows[0]) == ["id", "label", "prediction"]
    labels = load_features(data).splits["test"]["regression_labels"]
    assert [float(r["label"]) for r in rows] == pytest.approx(labels.tolist(), abs=1e-5)


def test_evaluate_unlabelled_split_gives_predictions_only(trained, tiny, tmp_path):
    out, _ = trained
    _, data = tiny
    raw = make_synthetic(None, n=(4, 4, 5), text_len=TEXT_LEN, audio=AUDIO, vision=VISION, text_dim=TEXT_DIM)
    del raw["test"]["regression_labels"]
    unlabelled = tmp_path / "unlabelled.pkl"
    save_features(unlabelled, {s: raw[s] for s in SPLITS}, raw["meta"])
    pred_csv = tmp_path / "pred.csv"
    result = evaluate(out / "checkpoint", unlabelled, predictions_path=pred_csv, device="cpu", quiet=True)
    assert result["metrics"] is None
    rows = list(csv.DictReader(pred_csv.open()))
    assert len(rows) == 5 and all(r["label"] == "" and r["prediction"] for r in rows)


def test_same_seed_same_numbers(trained, tiny, tmp_path):
    out, summary = trained
    text_model, data = tiny
    again = train(tiny_config(text_model), data, tmp_path / "again", device="cpu", quiet=True)
    assert _strip(_history(tmp_path / "again")) == _strip(_history(out))
    assert again["test"] == summary["test"]


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    text_model, data = tiny
    cfg = tiny_config(text_model, epochs=4, warmup_ratio=0.25)
    straight = train(cfg, data, tmp_path / "straight", device="cpu", quiet=True)

    interrupted_after_epoch(monkeypatch, 2, lambda: train(cfg, data, tmp_path / "resumed", device="cpu", quiet=True))
    assert len(_history(tmp_path / "resumed")) == 2
    resumed = train(cfg, data, tmp_path / "resumed", device="cpu", resume=True, quiet=True)

    assert _strip(_history(tmp_path / "resumed")) == _strip(_history(tmp_path / "straight"))
    assert resumed["test"] == straight["test"] and resumed["selected_epoch"] == straight["selected_epoch"]
    a = torch.load(tmp_path / "straight/last/state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed/last/state.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "resumed/checkpoint/model.safetensors").read_bytes() == \
        (tmp_path / "straight/checkpoint/model.safetensors").read_bytes()

    # resuming a finished run says so and changes nothing
    again = train(cfg, data, tmp_path / "resumed", device="cpu", resume=True, quiet=True)
    assert again["test"] == resumed["test"] and len(_history(tmp_path / "resumed")) == 4


def test_refuses_to_overwrite_and_resumes_with_the_runs_config(trained, tiny, caplog):
    out, summary = trained
    text_model, data = tiny
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny_config(text_model), data, out, device="cpu", quiet=True)
    with caplog.at_level("WARNING"):
        again = train(tiny_config(text_model, lr=5e-4), data, out, device="cpu", resume=True, quiet=True)
    assert "already finished" in caplog.text and "train.lr" in caplog.text
    assert again == summary


def test_early_stopping(tiny, tmp_path):
    text_model, data = tiny
    cfg = tiny_config(text_model, lr=0.0, epochs=6, patience=2)  # lr 0: nothing ever improves
    summary = train(cfg, data, tmp_path / "run", device="cpu", quiet=True)
    assert summary["stopped_early"] and summary["epochs_run"] == 3 and summary["selected_epoch"] == 1


def test_multi_seed_summary(tiny, tmp_path):
    text_model, data = tiny
    cfg = tiny_config(text_model, epochs=1, seeds=[11, 12])
    summary = train(cfg, data, tmp_path / "run", device="cpu", quiet=True)
    for s in (11, 12):
        assert (tmp_path / f"run/seed_{s}/checkpoint/model.safetensors").is_file()
    maes = [summary["per_seed"][s]["test"]["MAE"] for s in ("11", "12")]
    assert summary["test_mean"]["MAE"] == pytest.approx(np.mean(maes))
    assert summary["test_std"]["MAE"] == pytest.approx(np.std(maes))
    best = summary["best_seed"]
    assert summary["per_seed"][str(best)]["selected_valid"] == min(
        summary["per_seed"][s]["selected_valid"] for s in ("11", "12"))
    assert (tmp_path / "run/checkpoint/model.safetensors").read_bytes() == \
        (tmp_path / f"run/seed_{best}/checkpoint/model.safetensors").read_bytes()
    assert (tmp_path / "run/curves.png").is_file() and (tmp_path / "run/summary.json").is_file()


def test_non_finite_loss_names_epoch_and_batch(tiny, tmp_path):
    text_model, _ = tiny
    raw = make_synthetic(None, n=(8, 4, 4), text_len=TEXT_LEN, audio=AUDIO, vision=VISION, text_dim=TEXT_DIM)
    raw["train"]["audio"][:] = 3e38  # finite in the file, overflows in the model
    path = tmp_path / "huge.pkl"
    save_features(path, {s: raw[s] for s in SPLITS}, raw["meta"])
    with pytest.raises(TrainingError, match="epoch 1, batch 1"):
        train(tiny_config(text_model), path, tmp_path / "run", device="cpu", quiet=True)


def test_bad_select_metric_is_a_config_error(tiny, tmp_path):
    text_model, data = tiny
    with pytest.raises(ConfigError, match="select_metric"):
        train(tiny_config(text_model, select_metric="Acc_99"), data, tmp_path / "run", device="cpu", quiet=True)
    assert not (tmp_path / "run").exists()  # nothing written before the checks pass


def test_feature_width_mismatch_is_reported(tiny, tmp_path):
    text_model, data = tiny
    cfg = tiny_config(text_model)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, audio_dim=7))
    with pytest.raises(AlmtError, match="audio_dim"):
        train(cfg, data, tmp_path / "run", device="cpu", quiet=True)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    raw = load_features(src).splits
    splits = {k: dict(v) for k, v in raw.items()}
    edit(splits)
    save_features(dst, splits, {"label_scale": "mosi"})
    return dst


def test_test_split_is_optional(tiny, tmp_path):
    """A file with labelled train/valid and no test split trains; only valid metrics exist."""
    text_model, data = tiny
    no_test = _rewrite(data, tmp_path / "no_test.pkl", lambda s: s.pop("test"))
    summary = train(tiny_config(text_model, epochs=1), no_test, tmp_path / "run", device="cpu", quiet=True)
    assert summary["test"] == {} and "MAE" in summary["valid"]


def test_unlabelled_test_split_gives_valid_metrics_only(tiny, tmp_path):
    text_model, data = tiny

    def unlabel(s):
        s["test"]["regression_labels"] = np.full_like(s["test"]["regression_labels"], np.nan)

    path = _rewrite(data, tmp_path / "unlabelled_test.pkl", unlabel)
    summary = train(tiny_config(text_model, epochs=1), path, tmp_path / "run", device="cpu", quiet=True)
    assert summary["test"] == {}


def test_train_split_needs_labels(tiny, tmp_path):
    text_model, data = tiny

    def unlabel(s):
        s["train"]["regression_labels"] = np.full_like(s["train"]["regression_labels"], np.nan)

    path = _rewrite(data, tmp_path / "unlabelled_train.pkl", unlabel)
    with pytest.raises(TrainingError, match="train split has samples without labels"):
        train(tiny_config(text_model, epochs=1), path, tmp_path / "run", device="cpu", quiet=True)


def test_token_ids_outside_the_text_models_vocabulary(tiny, tmp_path):
    """A file tokenized for a bigger vocabulary is refused before training, with the fix."""
    text_model, data = tiny

    def big_ids(s):
        s["train"]["text_bert"] = s["train"]["text_bert"].copy()
        s["train"]["text_bert"][0, 0, 1] = 40000.0

    path = _rewrite(data, tmp_path / "big_ids.pkl", big_ids)
    with pytest.raises(TrainingError, match="token id 40000 .* --text-model"):
        train(tiny_config(text_model, epochs=1), path, tmp_path / "run", device="cpu", quiet=True)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_mixed_precision_training_is_finite_and_repeatable(tiny, tmp_path, amp):
    """On CUDA with autocast: losses stay finite, the checkpoint evaluates, and the same seed gives
    the same run twice (deterministic kernels are requested by train)."""
    text_model, data = tiny
    cfg = tiny_config(text_model, epochs=3, amp=amp)
    first = train(cfg, data, tmp_path / "a", device="cuda", quiet=True)
    second = train(cfg, data, tmp_path / "b", device="cuda", quiet=True)
    history = _history(tmp_path / "a")
    assert len(history) == 3 and all(math.isfinite(r["train_loss"]) for r in history)
    assert _strip(history) == _strip(_history(tmp_path / "b"))
    assert first["test"] == second["test"] and first["device"].startswith("cuda")
    result = evaluate(tmp_path / "a" / "checkpoint", data, split="test", device="cuda", quiet=True)
    assert result["metrics"]["MAE"] == pytest.approx(first["test"]["MAE"], abs=1e-3)


def test_a_non_finite_first_epoch_still_gives_a_checkpoint(tiny, tmp_path, monkeypatch):
    """The first epoch is always the best so far; a later finite one replaces a non-finite one."""
    from almt_pipeline import train as train_module

    text_model, data = tiny
    real = train_module.split_metrics
    calls = []

    def inf_at_first_valid(pred, truth, scale):
        m = real(pred, truth, scale)
        calls.append(1)
        if len(calls) == 1:  # epoch 1, valid split
            m["MAE"] = float("inf")
        return m

    monkeypatch.setattr(train_module, "split_metrics", inf_at_first_valid)
    summary = train(tiny_config(text_model, epochs=3, patience=1), data, tmp_path / "run", device="cpu",
                    quiet=True)
    history = _history(tmp_path / "run")
    assert history[0]["improved"] and history[1]["improved"]
    assert summary["selected_epoch"] >= 2 and (tmp_path / "run/checkpoint/model.safetensors").is_file()


def test_a_failure_before_the_first_epoch_removes_the_run_it_made(tiny, tmp_path, monkeypatch):
    """Nothing half-made is left: not the run directory, nor the parents made for it; an --out
    folder that existed (empty) stays, emptied."""
    from almt_pipeline.errors import TextModelError

    text_model, data = tiny
    out = tmp_path / "runs" / "stamp"
    with pytest.raises(TextModelError):
        train(tiny_config(tmp_path / "no_such_bert"), data, out, device="cpu", quiet=True)
    assert list(tmp_path.iterdir()) == []

    raw = make_synthetic(None, n=(8, 4, 4), text_len=TEXT_LEN, audio=AUDIO, vision=VISION, text_dim=TEXT_DIM)
    raw["train"]["audio"][:] = 3e38  # non-finite loss in epoch 1, batch 1
    huge = tmp_path / "huge.pkl"
    save_features(huge, {s: raw[s] for s in SPLITS}, raw["meta"])
    given = tmp_path / "given"
    given.mkdir()
    for run_dir in (out, given):
        with pytest.raises(TrainingError, match="epoch 1, batch 1"):
            train(tiny_config(text_model), huge, run_dir, device="cpu", quiet=True)
    assert not (tmp_path / "runs").exists()
    assert given.is_dir() and list(given.iterdir()) == []

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_state", interrupted)  # Ctrl-C while epoch 1 is saved
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(text_model), data, out, device="cpu", quiet=True)
    assert not (tmp_path / "runs").exists()


def test_a_failure_after_a_finished_epoch_keeps_the_run(tiny, tmp_path, monkeypatch):
    text_model, data = tiny
    real_save = runs.save_state

    def full_disk_at_epoch_2(path, state):
        if state["epoch"] == 2:
            raise OSError(f"{path}: cannot write (No space left on device)")
        real_save(path, state)

    monkeypatch.setattr(runs, "save_state", full_disk_at_epoch_2)
    with pytest.raises(OSError, match="state.pt: cannot write"):
        train(tiny_config(text_model, epochs=3), data, tmp_path / "run", device="cpu", quiet=True)
    assert len(_history(tmp_path / "run")) >= 1 and (tmp_path / "run" / runs.STATE_FILE).is_file()
    assert runs.has_finished_epoch(tmp_path / "run")


def test_resume_state_write_failure_names_the_file(tmp_path, monkeypatch):
    """torch reports a failed write as a RuntimeError: it becomes an OSError naming the file."""
    def failing_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed\nwriting")

    monkeypatch.setattr(torch, "save", failing_save)
    path = tmp_path / "last" / "state.pt"
    with pytest.raises(OSError, match=r"state\.pt: cannot write the resume state .*PytorchStreamWriter") as e:
        runs.save_state(path, {"version": 1})
    assert "\n" not in str(e.value)
    assert list(path.parent.iterdir()) == []  # no partial file


def test_evaluate_refuses_token_ids_beyond_the_vocabulary(trained, tiny, tmp_path):
    out, _ = trained
    _, data = tiny
    raw = load_features(data, require_labels=False).splits
    raw["test"]["text_bert"][:, 0, 1] = 1e9  # would index past the embedding table
    path = tmp_path / "ids.pkl"
    save_features(path, raw, {})
    with pytest.raises(TrainingError, match="token id 1000000000"):
        evaluate(out / "checkpoint", path, split="test", device="cpu", quiet=True)


def test_a_run_whose_validation_is_never_finite_fails(tiny, tmp_path, monkeypatch):
    from almt_pipeline import train as train_module

    text_model, data = tiny
    real = train_module.split_metrics

    def always_nan(pred, truth, scale):
        m = real(pred, truth, scale)
        m["MAE"] = float("nan")
        return m

    monkeypatch.setattr(train_module, "split_metrics", always_nan)
    with pytest.raises(TrainingError, match="valid MAE was not finite at any epoch"):
        train(tiny_config(text_model, epochs=2), data, tmp_path / "run", device="cpu", quiet=True)
