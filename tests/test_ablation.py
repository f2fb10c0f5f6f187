"""Ablation variants (model switches) and `almt ablate`: parameter counts, shapes, attention traces,
config rules, checkpoints, and an ablation that continues after an interruption."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from test_train import tiny_config
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

from almt_pipeline import ablation
from almt_pipeline.ablation import all_variants, select_variants, variant_config
from almt_pipeline.cli import app
from almt_pipeline.config import ModelConfig, config_from_dict, load_config
from almt_pipeline.errors import ConfigError
from almt_pipeline.evaluate import evaluate
from almt_pipeline.model.almt import ALMT, almt_parameter_count, count_parameters
from almt_pipeline.model.checkpoint import load_checkpoint
from almt_pipeline.model.convert import import_weights

VARIANT_NAMES = list(all_variants(ModelConfig()))
SMALL = dict(text_len=12, audio_dim=5, audio_len=20, vision_dim=7, vision_len=15, dim=16, n_tokens=4,
             embed_heads=2, embed_dim_head=8, ahl_heads=2, ahl_dim_head=4, lang_heads=2, lang_dim_head=8,
             fusion_heads=2, fusion_dim_head=8)


def _small_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37)).eval()


def _inputs(b: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    text = torch.zeros(b, 3, 12)  # (B, 3, L)
    text[:, 0, :6] = torch.randint(103, 200, (b, 6), generator=g).float()
    text[:, 0, 0], text[:, 1, :6] = 101, 1
    return (text, torch.randn(b, 20, 5, generator=g), torch.randn(b, 15, 7, generator=g),
            torch.tensor([20, 5, 1][:b]), torch.tensor([3, 15, 9][:b]))


@pytest.mark.parametrize("config", ["mosi", "mosei", "sims", "default"])
@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_parameter_count_is_the_built_count(config, name):
    cfg = load_config(config)
    m = variant_config(cfg, all_variants(cfg.model)[name]).model
    with torch.device("meta"):
        model = ALMT(m, BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2)), 64)
    assert almt_parameter_count(m, 64) == count_parameters(model)[0]


def test_variants_remove_what_they_say():
    m = ModelConfig()
    counts = {n: almt_parameter_count(variant_config(load_config("mosi"), v).model, 768)
              for n, v in all_variants(load_config("mosi").model).items()}
    assert counts["full"] == 2_603_649  # the released model, untouched by the switches' defaults
    assert all(counts[n] < counts["full"] for n in counts if n != "full")
    assert counts["text-only"] < min(counts["no-audio"], counts["no-vision"])
    assert {v.table for v in all_variants(m).values()} == {"", "3", "4", "6"}
    assert len([v for v in all_variants(m).values() if v.table == "6"]) == 6  # proper subsets of 3 layers


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_forward_shapes_and_attention_trace(name, masked):
    base = ModelConfig(**SMALL, masked=masked)
    overrides = all_variants(base)[name].overrides
    m = dataclasses.replace(base, **overrides)
    for fast in (True, False):
        torch.manual_seed(0)
        model = ALMT(dataclasses.replace(m, fast_attention=fast), _small_bert(), 32).eval()
        trace: dict = {}
        with torch.no_grad():
            y = model(*_inputs(3), trace=trace)
            plain = model(*_inputs(3))
        assert y.shape == (3,) and torch.isfinite(y).all()
        torch.testing.assert_close(y, plain)  # tracing does not change the result
        kept = [x for x in ("audio", "vision") if x not in m.drop_modalities]
        assert sorted(trace["summary"]) == sorted(["text", *kept])
        for weights in trace["summary"].values():  # (B, T, keys): rows are distributions
            sums = weights.sum(-1)  # (B, T)
            if m.modality_embedding:
                torch.testing.assert_close(sums, torch.ones(3, 4))
            else:  # pooling weights: a segment without a real frame (masked, short clip) has none
                assert bool((((sums - 1).abs() < 1e-5) | (sums == 0)).all()) and bool((sums[:, 0] > 0).all())
        if not m.ahl:
            assert trace["ahl"] == []
            continue
        guided = m.guided_layers or [1, 2, 3]
        assert len(trace["ahl"]) == m.ahl_depth
        for j, maps in enumerate(trace["ahl"], 1):
            assert sorted(maps) == (sorted(kept) if j in guided else [])
            for a in maps.values():
                assert a.shape == (3, 4, 4)
                torch.testing.assert_close(a.sum(-1), torch.ones(3, 4))


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_every_variant_listens_to_text_and_to_each_modality_it_keeps(name):
    """A removal must not silently disconnect another input (e.g. language reaching the head only
    through AHL queries): swapping one modality between samples changes the scores."""
    m = dataclasses.replace(ModelConfig(**SMALL), **all_variants(ModelConfig())[name].overrides)
    torch.manual_seed(0)
    model = ALMT(m, _small_bert(), 32).eval()
    text, audio, vision, a_len, v_len = _inputs()
    swapped = torch.tensor([1, 2, 0])
    with torch.no_grad():
        base = model(text, audio, vision, a_len, v_len)
        changes = {
            "text": model(text[swapped], audio, vision, a_len, v_len),
            "audio": model(text, audio[swapped], vision, a_len[swapped], v_len),
            "vision": model(text, audio, vision[swapped], a_len, v_len[swapped]),
        }
    for modality, out in changes.items():
        moved = float((out - base).abs().max())
        if modality in m.drop_modalities:
            assert moved == 0.0, (name, modality)
        else:
            assert moved > 1e-6, (name, modality, moved)


def test_pooled_segments_do_not_depend_on_the_batch():
    m = ModelConfig(**SMALL, modality_embedding=False, masked=True)
    torch.manual_seed(0)
    model = ALMT(m, _small_bert(), 32).eval()
    text, audio, vision, a_len, v_len = _inputs()
    with torch.no_grad():
        together = model(text, audio, vision, a_len, v_len)
        alone = torch.cat([model(text[i:i + 1], audio[i:i + 1], vision[i:i + 1], a_len[i:i + 1], v_len[i:i + 1])
                           for i in range(3)])
    torch.testing.assert_close(together, alone)


def test_dropped_modality_is_ignored():
    m = ModelConfig(**SMALL, drop_modalities=["vision"])
    model = ALMT(m, _small_bert(), 32).eval()
    text, audio, vision, a_len, v_len = _inputs()
    with torch.no_grad():
        assert torch.equal(model(text, audio, vision, a_len, v_len), model(text, audio, vision * 0 + 5, a_len, v_len))


@pytest.mark.parametrize(("model", "message"), [
    ({"drop_modalities": ["text"]}, "text guides the model"),
    ({"drop_modalities": ["audio", "audio"]}, "twice"),
    ({"guided_layers": [0]}, "from 1 to model.ahl_depth=3"),
    ({"guided_layers": [1, 1]}, "distinct"),
    ({"guided_layers": [1], "ahl": False}, "needs model.ahl: true"),
    ({"drop_modalities": ["audio", "vision"]}, "AHL has nothing to attend to"),
    ({"guided_layers": []}, "at least one AHL layer"),
])
def test_bad_ablation_settings_are_one_line_errors(model, message):
    with pytest.raises(ConfigError, match=message) as e:
        config_from_dict({"model": model}, source="x.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("x.yaml: ")


def test_variant_selection():
    m = ModelConfig()
    assert [v.name for v in select_variants("default", m)] == [
        "full", "no-audio", "no-vision", "text-only", "no-ahl", "no-fusion", "no-embedding"]
    assert [v.name for v in select_variants("no-ahl,table6", m)][:3] == ["full", "no-ahl", "guide-1"]
    with pytest.raises(ConfigError, match="unknown variant 'no-text'"):
        select_variants("no-text", m)


def test_import_weights_refuses_an_ablation_config(tmp_path):
    cfg = variant_config(load_config("mosi"), all_variants(ModelConfig())["no-ahl"])
    with pytest.raises(ConfigError, match="ablation switch"):
        import_weights(tmp_path / "w.pt", "official", cfg, None, tmp_path / "out")


def test_describe_lists_variants():
    r = CliRunner().invoke(app, ["describe", "--config", "mosi", "--variants", "table4"])
    assert r.exit_code == 0, r.output
    assert "no-fusion" in r.output and "w/o modality embedding" in r.output and "2,603,649" in r.output


def test_ablate_tabulates_resumes_and_its_checkpoints_evaluate(tmp_path, monkeypatch):
    from synthetic import make_synthetic, make_tiny_text_model

    text_model = make_tiny_text_model(tmp_path / "bert")
    data = tmp_path / "data.pkl"
    make_synthetic(data, n=(16, 8, 8), text_len=12, audio=(20, 5), vision=(16, 6), text_dim=32, seed=1)
    cfg = tiny_config(text_model, epochs=2, seeds=[1, 2])
    variants = select_variants("no-ahl,no-fusion", cfg.model)
    out = tmp_path / "abl"

    from almt_pipeline import train as train_module

    real_train = train_module.train
    calls: list[str] = []
    interrupt_in = {"no-ahl"}

    def recorded_train(vcfg, data_path, run_dir, **kw):  # the real training, recorded
        calls.append(run_dir.name)
        if run_dir.name in interrupt_in:  # the user presses Ctrl-C in the second variant
            raise KeyboardInterrupt
        return real_train(vcfg, data_path, run_dir, **kw)

    monkeypatch.setattr(train_module, "train", recorded_train)
    with pytest.raises(KeyboardInterrupt):
        ablation.ablate(cfg, data, variants, out_dir=out, device="cpu", quiet=True)
    assert calls == ["full", "no-ahl"] and (out / "full" / "summary.json").is_file()
    full_done = (out / "full" / "summary.json").stat().st_mtime_ns

    calls.clear()
    interrupt_in.clear()
    result = ablation.ablate(cfg, data, variants, out_dir=out, device="cpu", quiet=True)
    assert calls == ["no-ahl", "no-fusion"]  # the finished variant is read back, not retrained
    assert (out / "full" / "summary.json").stat().st_mtime_ns == full_done

    rows = result["variants"]
    assert [r["variant"] for r in rows] == ["full", "no-ahl", "no-fusion"]
    assert all(r["seeds"] == [1, 2] for r in rows)
    assert rows[0]["parameters"] > rows[1]["parameters"]
    with open(out / "ablation.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["full", "no-ahl", "no-fusion"]
    assert float(table[1]["MAE_mean"]) == pytest.approx(rows[1]["test_mean"]["MAE"], rel=1e-5)
    assert json.loads((out / "ablation.json").read_text())["variants"][2]["model"] == {"fusion": False}
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a variant's checkpoint rebuilds its own model (the config travels with it)
    ckpt = load_checkpoint(out / "no-fusion" / "checkpoint")
    assert ckpt.cfg.model.fusion is False and len(ckpt.model.fusion_blocks) == 0
    scored = evaluate(out / "no-fusion" / "checkpoint", data, split="test", device="cpu", quiet=True)
    best = str(json.loads((out / "no-fusion" / "summary.json").read_text())["best_seed"])
    seed_test = json.loads((out / "no-fusion" / "summary.json").read_text())["per_seed"][best]["test"]
    assert scored["metrics"]["MAE"] == pytest.approx(seed_test["MAE"], rel=1e-5)
    assert np.isfinite(scored["predictions"]).all()

    # asking for other settings in the same folder is refused rather than mixed into one table
    with pytest.raises(ConfigError, match="trained with other settings"):
        ablation.ablate(tiny_config(text_model, epochs=3, seeds=[1, 2]), data, variants, out_dir=out,
                        device="cpu", quiet=True)


def test_ablate_resumes_inside_a_variant_with_the_numbers_of_an_uninterrupted_run(tmp_path, monkeypatch):
    from synthetic import make_synthetic, make_tiny_text_model

    from almt_pipeline import train as train_module

    text_model = make_tiny_text_model(tmp_path / "bert")
    data = tmp_path / "data.pkl"
    make_synthetic(data, n=(16, 8, 8), text_len=12, audio=(20, 5), vision=(16, 6), text_dim=32, seed=2)
    cfg = tiny_config(text_model, epochs=3)
    variants = select_variants("no-fusion", cfg.model)
    straight = ablation.ablate(cfg, data, variants, out_dir=tmp_path / "straight", device="cpu", quiet=True)

    real_epoch = train_module._run_epoch

    def stopped_in_epoch_2(vcfg, st, loader, d, settings, epoch, desc):  # Ctrl-C during no-fusion's 2nd epoch
        if not vcfg.model.fusion and epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(vcfg, st, loader, d, settings, epoch, desc)

    monkeypatch.setattr(train_module, "_run_epoch", stopped_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        ablation.ablate(cfg, data, variants, out_dir=tmp_path / "resumed", device="cpu", quiet=True)
    assert (tmp_path / "resumed" / "full" / "summary.json").is_file()
    assert not (tmp_path / "resumed" / "no-fusion" / "summary.json").exists()
    monkeypatch.setattr(train_module, "_run_epoch", real_epoch)
    resumed = ablation.ablate(cfg, data, variants, out_dir=tmp_path / "resumed", device="cpu", quiet=True)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "no-fusion" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    for a, b in zip(straight["variants"], resumed["variants"]):
        assert a["test_mean"] == b["test_mean"]


def test_ablate_refuses_an_ablated_base_and_another_feature_file(tmp_path):
    from synthetic import make_synthetic, make_tiny_text_model

    text_model = make_tiny_text_model(tmp_path / "bert")
    cfg = tiny_config(text_model, epochs=1)
    base = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fusion=False))
    with pytest.raises(ConfigError, match="ablate starts from the full model"):
        ablation.ablate(base, tmp_path / "data.pkl", select_variants("no-ahl", cfg.model), out_dir=tmp_path / "a")
    data, other = tmp_path / "data.pkl", tmp_path / "other.pkl"
    for path, seed in ((data, 1), (other, 2)):
        make_synthetic(path, n=(16, 8, 8), text_len=12, audio=(20, 5), vision=(16, 6), text_dim=32, seed=seed)
    ablation.ablate(cfg, data, select_variants("full", cfg.model), out_dir=tmp_path / "b", device="cpu", quiet=True)
    with pytest.raises(ConfigError, match="was trained on .*data.pkl, not .*other.pkl"):
        ablation.ablate(cfg, other, select_variants("no-ahl", cfg.model), out_dir=tmp_path / "b", device="cpu",
                        quiet=True)
    assert not (tmp_path / "b" / "no-ahl").exists()  # refused before anything was trained
