"""Self-contained checkpoints: round trip, fresh offline process, atomic replace, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic import make_tiny_text_model

from almt_pipeline.config import BUILTIN_CONFIGS, Config, ModelConfig, load_config
from almt_pipeline.errors import CheckpointError
from almt_pipeline.model import checkpoint as ckpt_mod
from almt_pipeline.model.almt import ALMT, almt_parameter_count, count_parameters
from almt_pipeline.model.checkpoint import (
    check_weights_size,
    load_checkpoint,
    save_checkpoint,
)
from almt_pipeline.model.heads import head_spec
from almt_pipeline.model.text_encoder import bert_config_from_dict, bert_parameter_count, load_text_model

REPO = Path(__file__).resolve().parent.parent
TEXT_DIM = 32
FEATURE_META = {"lengths": {"text": 12, "audio": 20, "vision": 16}, "feature_names": {"audio": ["a"] * 5}}


def _cfg(text_model: Path) -> Config:
    return Config(name="tiny", model=ModelConfig(
        text_model=str(text_model), text_len=12, audio_dim=5, audio_len=20, vision_dim=6, vision_len=16,
        dim=16, n_tokens=4, embed_heads=2, embed_dim_head=8, embed_mlp_dim=16, ahl_depth=2, ahl_heads=2,
        ahl_dim_head=8, lang_heads=2, lang_dim_head=8, lang_mlp_dim=16, fusion_depth=1, fusion_heads=2,
        fusion_dim_head=8, fusion_mlp_dim=16,
    ))


def _inputs(b: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    text_bert = torch.zeros(b, 3, 12)  # (B, 3, L)
    text_bert[:, 0] = torch.randint(1000, 2000, (b, 12), generator=g).float()
    text_bert[:, 0, 0] = 101
    text_bert[:, 1] = 1.0
    return text_bert, torch.randn(b, 20, 5, generator=g), torch.randn(b, 16, 6, generator=g)


@pytest.fixture()
def saved(tmp_path):
    """A checkpoint whose source text model directory has been deleted afterwards."""
    text_model = make_tiny_text_model(tmp_path / "bert")
    cfg = _cfg(text_model)
    bert, tokenizer = load_text_model(str(text_model))
    torch.manual_seed(5)
    model = ALMT(cfg.model, bert, TEXT_DIM).eval()
    with torch.no_grad():
        expected = model(*_inputs())
    out = tmp_path / "ckpt"
    save_checkpoint(out, model, cfg, tokenizer=tokenizer, text_config=bert.config.to_dict(),
                    feature_meta=FEATURE_META, label_scale="sims", extra={"epoch": 3, "test": {"MAE": 0.5}})
    shutil.rmtree(text_model)
    return out, cfg, expected


def test_round_trip_in_process(saved):
    out, cfg, expected = saved
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "text_model"}
    loaded = load_checkpoint(out)
    assert loaded.cfg == cfg and loaded.label_scale == "sims" and loaded.feature_meta == FEATURE_META
    assert loaded.info["epoch"] == 3 and loaded.info["text_dim"] == TEXT_DIM
    assert not loaded.model.training
    with torch.no_grad():
        assert torch.equal(loaded.model(*_inputs()), expected)
    ids = loaded.tokenizer("hello world")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102
    meta = json.loads((out / "config.json").read_text())
    assert meta["text_model_source"] == cfg.model.text_model and meta["package_version"]


@pytest.mark.slow  # starts a fresh Python process, which imports torch and loads the checkpoint anew
def test_fresh_offline_process_gives_identical_outputs(saved, tmp_path):
    out, _, expected = saved
    torch.save(_inputs(), tmp_path / "inputs.pt")
    code = (
        "import sys, torch\n"
        "from almt_pipeline.model.checkpoint import load_checkpoint\n"
        "ck = load_checkpoint(sys.argv[1])\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.save(ck.model(*x), sys.argv[3])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), expected)


def test_save_replaces_atomically_and_keeps_old_on_failure(saved, monkeypatch):
    out, cfg, expected = saved
    loaded = load_checkpoint(out)
    with torch.no_grad():
        for p in loaded.model.head.parameters():
            p.add_(1.0)
    kw = dict(tokenizer=loaded.tokenizer, text_config=json.loads((out / "text_model/config.json").read_text()),
              feature_meta=FEATURE_META, label_scale="sims", extra={"epoch": 4})

    def broken(model, path):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt  # killed while writing the weights

    monkeypatch.setattr(ckpt_mod, "_save_weights", broken)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, loaded.model, cfg, **kw)
    monkeypatch.undo()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".ckpt")] == []
    with torch.no_grad():
        assert torch.equal(load_checkpoint(out).model(*_inputs()), expected)  # old one intact

    save_checkpoint(out, loaded.model, cfg, **kw)
    again = load_checkpoint(out)
    assert again.info["epoch"] == 4
    with torch.no_grad():
        assert not torch.equal(again.model(*_inputs()), expected)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".ckpt")] == []


def test_interrupted_directory_swap_is_recovered(saved):
    out, _, expected = saved
    # killed between "move old aside" and "move new into place": only the complete new copy exists
    os.replace(out, out.parent / ".ckpt.tmp-abc")
    (out.parent / ".ckpt.old-def").mkdir()
    loaded = load_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(loaded.model(*_inputs()), expected)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: weights file missing"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10), "model.safetensors: corrupt"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json: corrupt JSON"),
        (lambda d: (d / "text_model" / "config.json").unlink(), "text_model/config.json: file missing"),
        (lambda d: [p.unlink() for p in (d / "text_model").iterdir() if p.name != "config.json"],
         "text_model: cannot load the tokenizer"),
    ],
    ids=["no-weights", "corrupt-weights", "corrupt-config", "no-text-config", "no-tokenizer"],
)
def test_damaged_checkpoint_is_a_clear_error(saved, damage, match):
    out, _, _ = saved
    damage(out)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(out)


def test_weights_that_do_not_fit_the_config_are_refused(saved):
    out, _, _ = saved
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["model"]["fusion_depth"] = 2
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the stored config"):
        load_checkpoint(out)


def test_missing_directory_and_foreign_config(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(CheckpointError, match="not an almt-pipeline checkpoint"):
        load_checkpoint(tmp_path / "other")


@pytest.mark.parametrize("name", BUILTIN_CONFIGS)
def test_parameter_estimate_is_the_built_count(name):
    """The size check's formulas give exactly what building gives, for every built-in config and
    BERT shapes from bert-base to a tiny decoder with cross-attention (built on the meta device)."""
    from transformers import BertConfig, BertModel

    bert_configs = [
        BertConfig(),  # bert-base
        BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),  # MiniLM
        BertConfig(hidden_size=TEXT_DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                   vocab_size=999, max_position_embeddings=77, type_vocab_size=1, is_decoder=True,
                   add_cross_attention=True),
    ]
    cfg = load_config(name)
    m, heads = cfg.model, head_spec(cfg.train)
    for bert_config in bert_configs:
        with torch.device("meta"):
            model = ALMT(m, BertModel(bert_config), bert_config.hidden_size, heads)
        outside, total = count_parameters(model)
        assert almt_parameter_count(m, bert_config.hidden_size, heads) == outside
        assert bert_parameter_count(bert_config) == total - outside


def test_parameter_estimate_of_a_saved_checkpoint_fits_its_weights(saved):
    """The tiny checkpoint's estimate equals the float32 parameters its weights file holds."""
    out, cfg, _ = saved
    bert_config = bert_config_from_dict(json.loads((out / "text_model" / "config.json").read_text()))
    expected = almt_parameter_count(cfg.model, TEXT_DIM) + bert_parameter_count(bert_config)
    assert expected == count_parameters(load_checkpoint(out).model)[1]
    check_weights_size(out / "model.safetensors", expected)
    with pytest.raises(CheckpointError, match="holds at most"):
        check_weights_size(out / "model.safetensors", 2 * expected)
