"""ALMT model: parameter counts of the released configs, shapes, masked mode, text encoder loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from almt_pipeline.config import ModelConfig, load_config
from almt_pipeline.errors import ConfigError, TextModelError
from almt_pipeline.model.almt import ALMT, count_parameters, describe_model
from almt_pipeline.model.text_encoder import (
    load_text_config,
    load_text_model,
    resolve_text_model,
    text_model_from_config,
)

TINY = ModelConfig(
    text_model="unused", text_len=10, audio_dim=5, audio_len=16, vision_dim=7, vision_len=12,
    dim=16, n_tokens=4, embed_heads=2, embed_dim_head=8, embed_mlp_dim=24, ahl_heads=2, ahl_dim_head=8,
    lang_heads=2, lang_dim_head=8, lang_mlp_dim=24, fusion_heads=2, fusion_dim_head=8, fusion_mlp_dim=24,
)


def bert(hidden: int, vocab: int = 30522) -> BertModel:
    return BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37, vocab_size=vocab, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))


def inputs(cfg: ModelConfig, b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(b, 3, cfg.text_len)  # (B, 3, L)
    text[:, 1, :4] = 1
    text[0, 1] = 1
    text[:, 0] = torch.randint(1000, 2000, (b, cfg.text_len), generator=g).float() * text[:, 1]
    audio = torch.randn(b, cfg.audio_len, cfg.audio_dim, generator=g)
    vision = torch.randn(b, cfg.vision_len, cfg.vision_dim, generator=g)
    return text, audio, vision, torch.tensor([3, 5, 2][:b]), torch.tensor([4, 1, 6][:b])


@pytest.mark.parametrize(
    "config, text_dim, expected",
    [("mosi", 768, 2_603_649), ("mosei", 768, 3_223_041), ("sims", 768, 3_232_897),
     ("mosi", 384, 2_554_497), ("sims", 384, 3_183_745)],
)
def test_parameter_counts_match_the_released_code(config, text_dim, expected):
    cfg = load_config(config).model
    model = ALMT(cfg, bert(text_dim, vocab=100), text_dim)
    outside, total = count_parameters(model)
    assert outside == expected
    assert total == expected + sum(p.numel() for p in model.text_encoder.parameters())


def test_parameter_count_with_the_embedded_minilm():
    text_encoder, tokenizer = load_text_model("minilm")  # ships with the package: no download
    assert isinstance(text_encoder, BertModel) and text_encoder.config.hidden_size == 384
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id
    model = ALMT(load_config("mosi").model, text_encoder, 384)
    assert count_parameters(model)[0] == 2_554_497


def test_describe_model_offline_and_with_a_local_model(tmp_path):
    cfg = load_config("mosi").model
    info = describe_model(cfg)  # bert-base-uncased is not cached in tests: bert-base shape assumed
    assert info["excluding_text"] == 2_603_649 and info["text_dim"] == 768 and "assumed" in info["text_note"]
    bert(32).save_pretrained(tmp_path / "tiny")
    info = describe_model(dataclasses.replace(cfg, text_model=str(tmp_path / "tiny")))
    assert info["text_dim"] == 32 and info["text_note"] == ""
    assert info["total"] - info["excluding_text"] == sum(p.numel() for p in bert(32).parameters())


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_backward_shapes(masked, fast):
    cfg = dataclasses.replace(TINY, masked=masked, fast_attention=fast)
    model = ALMT(cfg, bert(32), 32)
    text, audio, vision, a_len, v_len = inputs(cfg)
    out = model(text, audio, vision, a_len, v_len)
    assert out.shape == (3,) and torch.isfinite(out).all()
    out.sum().backward()
    # the BERT pooler is unused; the fast path also leaves out the key-side LayerNorm bias of each
    # modality embedding's last block, which cancels in the softmax
    no_grad = {n for n, p in model.named_parameters() if p.grad is None and not n.startswith("text_encoder.pooler")}
    expected = {f"embed_{m}.blocks.0.attn.norm_k.bias" for m in ("text", "audio", "vision")} if fast else set()
    assert no_grad == expected


def _output_and_grads(cfg: ModelConfig, state: dict, batch: tuple) -> tuple[torch.Tensor, dict]:
    model = ALMT(cfg, bert(32), 32)
    model.load_state_dict(state)
    out = model(*batch)  # (B,)
    (out * torch.arange(1.0, 1.0 + out.shape[0])).sum().backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
    return out.detach(), grads


@pytest.mark.parametrize("masked", [False, True])
def test_fast_attention_matches_the_reference(masked):
    cfg = dataclasses.replace(TINY, masked=masked, embed_depth=2)
    torch.manual_seed(3)
    reference = ALMT(dataclasses.replace(cfg, fast_attention=False), bert(32), 32)
    with torch.no_grad():  # non-trivial LayerNorm affines, so folding them is actually tested
        for name, p in reference.named_parameters():
            if ".norm" in name and not name.startswith("text_encoder"):
                p.add_(0.3 * torch.randn_like(p))
    state = reference.state_dict()
    batch = inputs(cfg)
    out_ref, grads_ref = _output_and_grads(dataclasses.replace(cfg, fast_attention=False), state, batch)
    out_fast, grads_fast = _output_and_grads(dataclasses.replace(cfg, fast_attention=True), state, batch)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    assert grads_fast.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_fast[name], g, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_both_attention_paths_have_the_same_parameters():
    fast = ALMT(dataclasses.replace(TINY, fast_attention=True), bert(32), 32)
    plain = ALMT(dataclasses.replace(TINY, fast_attention=False), bert(32), 32)
    assert [(n, p.shape) for n, p in fast.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    assert count_parameters(fast) == count_parameters(plain)


def test_shorter_inputs_than_the_configured_maximum():
    model = ALMT(TINY, bert(32), 32).eval()
    text, audio, vision, *_ = inputs(TINY)
    with torch.no_grad():
        out = model(text[:, :, :6], audio[:, :9], vision[:, :3])
    assert out.shape == (3,)


def test_masked_mode_ignores_padding_and_default_mode_does_not():
    text, audio, vision, a_len, v_len = inputs(TINY)
    noisy_audio, noisy_vision, noisy_text = audio.clone(), vision.clone(), text.clone()
    for i in range(3):
        noisy_audio[i, a_len[i]:] += 5.0
        noisy_vision[i, v_len[i]:] -= 3.0
    noisy_text[1:, 0, 6:] = 1234.0  # ids behind the attention mask of samples 1 and 2
    for masked in (True, False):
        torch.manual_seed(0)
        model = ALMT(dataclasses.replace(TINY, masked=masked), bert(32), 32).eval()
        with torch.no_grad():
            clean = model(text, audio, vision, a_len, v_len)
            noisy = model(noisy_text, noisy_audio, noisy_vision, a_len, v_len)
        assert torch.allclose(clean, noisy, atol=1e-5) == masked


def test_masked_mode_trims_the_batch():
    cfg = dataclasses.replace(TINY, masked=True)
    model = ALMT(cfg, bert(32), 32).eval()
    text, audio, vision, a_len, v_len = inputs(cfg)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, args[0].shape)
        return hook

    model.embed_audio.register_forward_hook(record("audio"))
    model.embed_text.register_forward_hook(record("text"))
    with torch.no_grad():
        model(text, audio, vision, a_len, v_len)
    assert seen["audio"][1] == int(a_len.max())
    assert seen["text"][1] == cfg.text_len  # sample 0 uses every token
    with torch.no_grad():
        model(text[1:], audio[1:], vision[1:], a_len[1:], v_len[1:])


def test_inputs_that_do_not_match_the_config_are_clear_errors():
    model = ALMT(TINY, bert(32), 32)
    text, audio, vision, *_ = inputs(TINY)
    with pytest.raises(ConfigError, match="audio input has shape .* audio_dim=5"):
        model(text, audio[:, :, :4], vision)
    with pytest.raises(ConfigError, match="vision_len=12"):
        model(text, audio, torch.zeros(3, 13, TINY.vision_dim))
    with pytest.raises(ConfigError, match="text_len=10"):
        model(torch.zeros(3, 3, 11), audio, vision)


def test_seeded_construction_is_reproducible():
    torch.manual_seed(7)
    a = ALMT(TINY, bert(32), 32).state_dict()
    torch.manual_seed(7)
    b = ALMT(TINY, bert(32), 32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["embed_audio.tokens"], torch.zeros_like(a["embed_audio.tokens"]))
    assert torch.equal(a["hyper"], torch.ones_like(a["hyper"]))


# ---------------------------------------------------------------- text encoder

def test_resolve_text_model(tmp_path):
    embedded = resolve_text_model("sentence-transformers/all-MiniLM-L6-v2")
    assert resolve_text_model("minilm") == embedded
    assert (Path(embedded) / "config.json").is_file()
    assert resolve_text_model(str(tmp_path)) == str(tmp_path)
    assert resolve_text_model("bert-base-uncased") == "bert-base-uncased"
    with pytest.raises(TextModelError, match="does not exist"):
        resolve_text_model(str(tmp_path / "missing" / "model"))


def test_unavailable_hub_model_is_one_clear_error():
    # tests run with HF_HUB_OFFLINE=1 (conftest): nothing is downloaded or waited for
    with pytest.raises(TextModelError, match="not available offline.*fix: .*local model directory"):
        load_text_model("nobody/not-a-cached-model")
    with pytest.raises(TextModelError, match="not available offline"):
        load_text_config("nobody/not-a-cached-model")


def test_non_bert_models_are_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(TextModelError, match="is a 'gpt2' model; only BERT-architecture"):
        load_text_model(str(tmp_path))
    with pytest.raises(TextModelError, match="only BERT-architecture"):
        text_model_from_config({"model_type": "gpt2"})


def test_broken_local_model_directory(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TextModelError, match="cannot be loaded"):
        load_text_model(str(tmp_path))


def test_text_model_from_config_round_trip():
    src = bert(32)
    rebuilt = text_model_from_config(src.config.to_dict())
    assert isinstance(rebuilt, BertModel)
    rebuilt.load_state_dict(src.state_dict())
    ids = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(rebuilt.eval()(input_ids=ids)[0], src.eval()(input_ids=ids)[0])
