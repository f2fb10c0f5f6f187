"""The robustness protocol: noise masks (counts, protected positions, seeding), whole-modality
removal, scoring against `evaluate`, and the `almt robustness` command."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import BERT_CLS, BERT_SEP, make_synthetic, make_tiny_text_model
from typer.testing import CliRunner

from almt_pipeline.batches import Split, to_split
from almt_pipeline.cli import app
from almt_pipeline.config import Config, ModelConfig, TrainConfig
from almt_pipeline.errors import ConfigError
from almt_pipeline.evaluate import evaluate
from almt_pipeline.features import SPLITS, save_features
from almt_pipeline.metrics import split_metric_names
from almt_pipeline.robustness import (
    MODALITIES,
    apply_noise,
    display_names,
    eligible_masks,
    noise_masks,
    parse_modalities,
    parse_rates,
    parse_seeds,
    remove_modality,
    robustness,
)
from almt_pipeline.train import train

TEXT_LEN, AUDIO, VISION, TEXT_DIM = 12, (20, 5), (16, 6), 32
UNK = 100
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- noise masks on plain splits


@pytest.fixture(scope="module")
def big() -> Split:
    """A synthetic test split large enough for counting: 400 samples, padding on every modality."""
    raw = make_synthetic(None, n=(1, 1, 400), text_len=40, audio=(30, 3), vision=(25, 4), text_dim=4, seed=5)
    return to_split("test", raw["test"])


def _tiny_split() -> Split:
    """Three hand-made samples: text with padding, without padding, and [CLS][SEP] only; audio and
    vision with non-zero padding frames (which must stay as they are)."""
    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 5, 6, 7, 8, 102], [101, 102, 0, 0, 0, 0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    text_bert = torch.stack([ids, mask, torch.zeros_like(ids)], dim=1)  # (3, 3, 6)
    audio = torch.full((3, 4, 2), 7.0)  # (3, T_a=4, 2)
    vision = torch.full((3, 3, 2), 9.0)  # (3, T_v=3, 2)
    lengths_a, lengths_v = torch.tensor([2, 4, 0]), torch.tensor([3, 1, 2])
    return Split("test", np.array(["a", "b", "c"], dtype=object), (text_bert, audio, vision, lengths_a, lengths_v),
                 torch.zeros(3))


def test_eligible_positions_exclude_cls_last_real_token_and_padding():
    e = eligible_masks(_tiny_split())
    assert e["text"].tolist() == [
        [False, True, True, False, False, False],
        [False, True, True, True, True, False],
        [False] * 6,
    ]
    assert e["audio"].tolist() == [[True, True, False, False], [True] * 4, [False] * 4]
    assert e["vision"].tolist() == [[True] * 3, [True, False, False], [True, True, False]]


def test_whole_modality_removal_replaces_everything_eligible():
    s = _tiny_split()
    t = remove_modality(s, "text", UNK).inputs
    assert t[0][:, 0].tolist() == [[101, UNK, UNK, 102, 0, 0], [101, UNK, UNK, UNK, UNK, 102], [101, 102, 0, 0, 0, 0]]
    assert torch.equal(t[0][:, 1:], s.inputs[0][:, 1:])  # attention mask and segment ids
    assert all(torch.equal(a, b) for a, b in zip(t[1:], s.inputs[1:]))
    a = remove_modality(s, "audio", UNK).inputs
    assert (a[1][0, :2] == 0).all() and (a[1][0, 2:] == 7).all() and (a[1][1] == 0).all() and (a[1][2] == 7).all()
    assert torch.equal(a[0], s.inputs[0]) and torch.equal(a[2], s.inputs[2])
    v = remove_modality(s, "vision", UNK).inputs
    assert (v[2][0] == 0).all() and (v[2][1, 0] == 0).all() and (v[2][1, 1:] == 9).all()
    assert (v[2][2, :2] == 0).all() and (v[2][2, 2] == 9).all()
    # on a large split too: every eligible position, nothing else
    big_split = to_split("test", make_synthetic(None, n=(1, 1, 50), text_len=20, audio=(9, 2), vision=(8, 2),
                                                text_dim=4)["test"])
    e = eligible_masks(big_split)
    gone = remove_modality(big_split, "text", UNK).inputs[0][:, 0].numpy()
    assert ((gone == UNK) == e["text"]).all()


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_replaced_counts_are_binomial(big, rate):
    eligible = eligible_masks(big)
    masks = noise_masks(big, rate, seed=0)
    for m in MODALITIES:
        n, k = int(eligible[m].sum()), int(masks[m].sum())
        assert n > 2000, m
        assert not (masks[m] & ~eligible[m]).any()
        assert abs(k - n * rate) <= 5 * math.sqrt(n * rate * (1 - rate)), (m, k, n)
        # noise is spread over the samples, not given to a few
        assert (masks[m].sum(axis=1) > 0).mean() > (0.5 if rate > 0.1 else 0.3)


def test_noise_keeps_protected_positions_and_padding(big):
    before = [t.clone() for t in big.inputs]
    noisy = apply_noise(big, 0.9, 3, MODALITIES, UNK).inputs
    assert all(torch.equal(a, b) for a, b in zip(before, big.inputs))  # the input is not modified
    ids, real = big.inputs[0][:, 0], big.inputs[0][:, 1] > 0.5  # (N, L)
    new_ids = noisy[0][:, 0]
    assert (new_ids[:, 0] == BERT_CLS).all()
    last = real.shape[1] - 1 - real.flip(1).int().argmax(1)  # (N,)
    assert (new_ids[torch.arange(len(last)), last] == BERT_SEP).all()
    assert torch.equal(new_ids[~real], ids[~real])  # padding untouched
    assert torch.equal(noisy[0][:, 1:], big.inputs[0][:, 1:])
    changed = new_ids != ids
    assert (new_ids[changed] == UNK).all() and changed.any()
    for i, feats in ((1, "audio"), (2, "vision")):
        valid = torch.from_numpy(eligible_masks(big)[feats])  # (N, T)
        assert torch.equal(noisy[i][~valid], big.inputs[i][~valid])  # padding frames untouched
        zeroed = (noisy[i] != big.inputs[i]).any(-1)  # (N, T)
        assert (noisy[i][zeroed] == 0).all() and zeroed.any()
    assert torch.equal(noisy[3], big.inputs[3]) and torch.equal(noisy[4], big.inputs[4])


def test_rate_zero_leaves_inputs_identical(big):
    noisy = apply_noise(big, 0.0, 0, MODALITIES, UNK)
    assert all(torch.equal(a, b) for a, b in zip(noisy.inputs, big.inputs))
    assert not any(m.any() for m in noise_masks(big, 0.0, 7).values())


def test_masks_are_seeded_per_seed_rate_and_modality(big):
    a, b = noise_masks(big, 0.3, 1), noise_masks(big, 0.3, 1)
    assert all(np.array_equal(a[m], b[m]) for m in MODALITIES)
    c = noise_masks(big, 0.3, 2)
    assert all(not np.array_equal(a[m], c[m]) for m in MODALITIES)
    d = noise_masks(big, 0.4, 1)
    assert all(not np.array_equal(a[m], d[m]) for m in MODALITIES)
    # a modality's mask does not depend on which other modalities get noise
    only_audio = noise_masks(big, 0.3, 1, ("audio",))
    assert list(only_audio) == ["audio"] and np.array_equal(only_audio["audio"], a["audio"])
    only_audio_split = apply_noise(big, 0.3, 1, ("audio",), UNK).inputs
    assert torch.equal(only_audio_split[0], big.inputs[0]) and torch.equal(only_audio_split[2], big.inputs[2])


def test_a_samples_mask_depends_only_on_its_index(big):
    """Masks are drawn for the whole split: the first k samples get the same masks alone, so
    batching cannot change them."""
    head = Split("test", big.ids[:37], tuple(t[:37] for t in big.inputs), big.labels[:37])
    whole, part = noise_masks(big, 0.5, 4), noise_masks(head, 0.5, 4)
    assert all(np.array_equal(whole[m][:37], part[m]) for m in MODALITIES)


def test_option_parsing():
    assert parse_rates("0:0.9:0.1") == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert parse_rates("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_rates("0,0.3,0.6") == [0.0, 0.3, 0.6]
    assert parse_rates("0.6, 0.3,0.3") == [0.3, 0.6]
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("5,5,3") == [5, 3]
    assert parse_modalities("vision,text") == ("text", "vision")
    for bad in ("0:0.9", "a", "1.5", "-0.1", "0:1:0", "0.5:0.1:0.1", "nan", ""):
        with pytest.raises(ConfigError, match="rates"):
            parse_rates(bad)
    for bad in ("1,a", "-1", ""):
        with pytest.raises(ConfigError, match="seeds"):
            parse_seeds(bad)
    for bad in ("text,smell", ""):
        with pytest.raises(ConfigError, match="modalities"):
            parse_modalities(bad)


def test_display_names_are_run_folders_made_unique():
    assert display_names(["a/run/checkpoint", "b/run/checkpoint", "x/model", "y/run/checkpoint"]) == [
        "run", "run-2", "model", "run-3"]


# ---------------------------------------------------------------- scoring tiny trained checkpoints


def _tiny_config(text_model: Path, seed: int) -> Config:
    model = ModelConfig(
        text_model=str(text_model), text_len=TEXT_LEN, audio_dim=AUDIO[1], audio_len=AUDIO[0],
        vision_dim=VISION[1], vision_len=VISION[0], dim=16, n_tokens=4,
        embed_heads=2, embed_dim_head=8, embed_mlp_dim=16, ahl_depth=1, ahl_heads=2, ahl_dim_head=8,
        lang_heads=2, lang_dim_head=8, lang_mlp_dim=16,
        fusion_depth=1, fusion_heads=2, fusion_dim_head=8, fusion_mlp_dim=16,
    )
    return Config(name="tiny", model=model, train=TrainConfig(lr=1e-3, batch_size=8, epochs=1, seed=seed,
                                                               eval_batch_size=16))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two 1-epoch checkpoints (different seeds) under ``root/runs/`` and their feature file."""
    root = tmp_path_factory.mktemp("robust")
    text_model = make_tiny_text_model(root / "bert")
    data = root / "data.pkl"
    make_synthetic(data, n=(16, 8, 12), text_len=TEXT_LEN, audio=AUDIO, vision=VISION, text_dim=TEXT_DIM, seed=2)
    for name, seed in (("first", 1), ("second", 2)):
        train(_tiny_config(text_model, seed), data, root / "runs" / name, device="cpu", quiet=True)
    return root / "runs" / "first" / "checkpoint", root / "runs" / "second" / "checkpoint", data


def test_rate_zero_equals_evaluate_exactly(trained, tmp_path):
    ckpt, _, data = trained
    for batch_size in (None, 5):
        result = robustness([ckpt], data, rates=(0.0, 0.5), seeds=(0,), out_dir=tmp_path, device="cpu",
                            batch_size=batch_size, quiet=True)
        clean, noisy = result["models"][0]["conditions"][:2]
        assert clean["condition"] == "0.0" and clean["seeds"] == [] and len(clean["per_seed"]) == 1
        expected = evaluate(ckpt, data, device="cpu", batch_size=batch_size, quiet=True)["metrics"]
        assert clean["mean"] == expected  # the same predictions: equal to the last bit
        assert set(clean["std"].values()) == {0.0}
        assert noisy["mean"]["MAE"] != expected["MAE"]


def test_batch_size_does_not_change_noisy_scores(trained, tmp_path):
    ckpt, _, data = trained
    runs = [robustness([ckpt], data, rates=(0.4,), seeds=(0, 1), out_dir=tmp_path / str(bs), device="cpu",
                       batch_size=bs, quiet=True)["models"][0]["conditions"][0]["per_seed"] for bs in (1, 7)]
    for a, b in zip(*runs):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)  # float sums differ a little across batch sizes
    assert runs[0][0]["MAE"] != pytest.approx(runs[0][1]["MAE"], rel=1e-9)  # the seeds differ


def test_cli_two_checkpoints_writes_table_csv_json_png(trained, tmp_path):
    first, second, data = trained
    out = tmp_path / "out"
    r = invoke("robustness", "--checkpoint", first, "--checkpoint", second, "--data", data, "--rates", "0,0.5",
               "--seeds", "0,1", "--out", out, "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    for needle in ("robustness of first", "robustness of second", "condition", "Acc-2", "Acc-7", "w/o text",
                   "w/o audio", "w/o vision", "average", "±"):
        assert needle in r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("0.5 ")]) == 2
    result = json.loads((out / "robustness.json").read_text())
    assert [m["name"] for m in result["models"]] == ["first", "second"]
    assert result["rates"] == [0.0, 0.5] and result["seeds"] == [0, 1] and result["n"] == 12
    assert result["modalities"] == list(MODALITIES) and result["split"] == "test"
    conditions = [c["condition"] for c in result["models"][0]["conditions"]]
    assert conditions == ["0.0", "0.5", "w/o text", "w/o audio", "w/o vision"]
    noisy = result["models"][1]["conditions"][1]
    assert noisy["seeds"] == [0, 1] and len(noisy["per_seed"]) == 2
    assert noisy["std"]["MAE"] == pytest.approx(float(np.std([s["MAE"] for s in noisy["per_seed"]])))
    avg = result["models"][0]["average"]["MAE"]
    assert avg == pytest.approx(np.mean([c["mean"]["MAE"] for c in result["models"][0]["conditions"][:2]]))
    rows = list(csv.DictReader((out / "robustness.csv").open()))
    n_metrics = len(split_metric_names("mosi"))
    assert len(rows) == 2 * (5 + 1) * n_metrics
    assert {r["condition"] for r in rows} == {*conditions, "average"}
    row = next(r for r in rows if r["model"] == "second" and r["condition"] == "0.5" and r["metric"] == "MAE")
    assert float(row["mean"]) == pytest.approx(noisy["mean"]["MAE"], abs=1e-6) and row["seeds"] == "0;1"
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_defaults_to_the_newest_checkpoint(trained, tmp_path, monkeypatch):
    _, second, data = trained
    (second / "config.json").touch()  # newest
    monkeypatch.chdir(second.parent.parent.parent)
    r = invoke("robustness", "--data", data, "--rates", "0", "--seeds", "0", "--modalities", "audio",
               "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    result = json.loads(Path("robustness/robustness.json").read_text())
    assert result["checkpoints"] == [str(Path("runs") / "second" / "checkpoint")]
    assert [c["condition"] for c in result["models"][0]["conditions"]] == ["0.0", "w/o audio"]


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("option, value", [
    ("--rates", "0:0.9"), ("--rates", "0.1,x"), ("--rates", "1.5"), ("--rates", "0:1:-0.1"),
    ("--seeds", "1,a"), ("--seeds", "-3"), ("--modalities", "text,smell"), ("--split", "dev"),
])
def test_bad_options_are_one_line(option, value, tmp_path):
    line = one_line_error(invoke("robustness", "--checkpoint", tmp_path / "none", option, value,
                                 "--out", tmp_path / "out"))
    assert option in line
    assert not (tmp_path / "out").exists()


def test_unlabelled_split_is_one_line(trained, tmp_path):
    ckpt, _, _ = trained
    raw = make_synthetic(None, n=(2, 2, 3), text_len=TEXT_LEN, audio=AUDIO, vision=VISION, text_dim=TEXT_DIM)
    del raw["test"]["regression_labels"]
    data = tmp_path / "unlabelled.pkl"
    save_features(data, {s: raw[s] for s in SPLITS}, raw["meta"])
    line = one_line_error(invoke("robustness", "--checkpoint", ckpt, "--data", data, "--device", "cpu",
                                 "--out", tmp_path / "out", "-q"))
    assert "unlabelled.pkl" in line and "labels" in line


def test_a_mistyped_checkpoint_fails_before_any_work(trained, tmp_path):
    first, _, data = trained
    line = one_line_error(invoke("robustness", "--checkpoint", first, "--checkpoint", tmp_path / "typo",
                                 "--data", data, "--device", "cpu", "--out", tmp_path / "out"))
    assert "typo" in line and "checkpoint directory not found" in line
    assert not (tmp_path / "out").exists()
