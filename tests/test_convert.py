"""Weight import: released-code / MMSA key names -> our model, checked against a functional
reference forward written directly over the source-named tensors (from the published architecture)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from almt_pipeline.config import Config, ModelConfig, TrainConfig
from almt_pipeline.errors import CheckpointError
from almt_pipeline.model.almt import ALMT
from almt_pipeline.model.convert import convert_state_dict, import_weights, load_state_dict_file

TEXT_DIM = 32
CFG = ModelConfig(
    text_model="unused", text_len=12, audio_dim=5, audio_len=20, vision_dim=7, vision_len=15,
    dim=16, n_tokens=4, embed_depth=2, embed_heads=2, embed_dim_head=8, embed_mlp_dim=24,
    ahl_depth=3, ahl_heads=2, ahl_dim_head=8, lang_heads=2, lang_dim_head=8, lang_mlp_dim=24,
    fusion_depth=2, fusion_heads=2, fusion_dim_head=8, fusion_mlp_dim=24,
)


def tiny_bert() -> BertModel:
    cfg = BertConfig(hidden_size=TEXT_DIM, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                     vocab_size=30522, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


# ---------------------------------------------------------------- source-format state dicts

def _block_shapes(prefix: str, dim: int, inner: int, mlp: int) -> dict:
    s = {}
    for n in ("norm_q", "norm_k", "norm_v"):
        s[f"{prefix}.0.{n}.weight"] = s[f"{prefix}.0.{n}.bias"] = (dim,)
    for n in ("to_q", "to_k", "to_v"):
        s[f"{prefix}.0.fn.to_{n[-1]}.weight"] = (inner, dim)
    s[f"{prefix}.0.fn.to_out.0.weight"], s[f"{prefix}.0.fn.to_out.0.bias"] = (dim, inner), (dim,)
    s[f"{prefix}.1.norm.weight"] = s[f"{prefix}.1.norm.bias"] = (dim,)
    s[f"{prefix}.1.fn.net.0.weight"], s[f"{prefix}.1.fn.net.0.bias"] = (mlp, dim), (mlp,)
    s[f"{prefix}.1.fn.net.3.weight"], s[f"{prefix}.1.fn.net.3.bias"] = (dim, mlp), (dim,)
    return s


def source_shapes(cfg: ModelConfig, text_dim: int, fmt: str) -> dict:
    """Key -> shape of a released-code (``official``) or MMSA state dict, BERT excluded."""
    d, t = cfg.dim, cfg.n_tokens
    embed = "proj_{}" if fmt == "official" else "embedding_{}"
    s = {"h_hyper": (1, t, d)}
    for m, width, length in (("l", text_dim, cfg.text_len), ("a", cfg.audio_dim, cfg.audio_len),
                             ("v", cfg.vision_dim, cfg.vision_len)):
        p = embed.format(m)
        s[f"{p}.0.weight"], s[f"{p}.0.bias"] = (d, width), (d,)
        s[f"{p}.1.pos_embedding"], s[f"{p}.1.extra_token"] = (1, t + length, d), (1, t, d)
        for i in range(cfg.embed_depth):
            s.update(_block_shapes(f"{p}.1.encoder.layers.{i}", d, cfg.embed_heads * cfg.embed_dim_head,
                                   cfg.embed_mlp_dim))
    s["l_encoder.pos_embedding"] = (1, t, d)
    for i in range(cfg.ahl_depth - 1):
        s.update(_block_shapes(f"l_encoder.encoder.layers.{i}", d, cfg.lang_heads * cfg.lang_dim_head,
                               cfg.lang_mlp_dim))
    inner = cfg.ahl_heads * cfg.ahl_dim_head
    for j in range(cfg.ahl_depth):
        p = f"h_hyper_layer.layers.{j}.0"
        for n in ("norm1", "norm2", "norm3", "norm4"):
            s[f"{p}.{n}.weight"] = s[f"{p}.{n}.bias"] = (d,)
        for n in ("to_q", "to_k_ta", "to_k_tv", "to_v_ta", "to_v_tv"):
            s[f"{p}.fn.{n}.weight"] = (inner, d)
        s[f"{p}.fn.to_out.0.weight"], s[f"{p}.fn.to_out.0.bias"] = (d, inner), (d,)
    s["fusion_layer.pos_embedding_s"] = s["fusion_layer.pos_embedding_t"] = (1, t + 1, d)
    s["fusion_layer.extra_token"] = (1, 1, d)
    for i in range(cfg.fusion_depth):
        s.update(_block_shapes(f"fusion_layer.CrossTransformerEncoder.layers.{i}", d,
                               cfg.fusion_heads * cfg.fusion_dim_head, cfg.fusion_mlp_dim))
    head = "regression_layer.0" if fmt == "official" else "regression_head"
    s[f"{head}.weight"], s[f"{head}.bias"] = (1, d), (1,)
    return s


def random_source(cfg: ModelConfig, bert: BertModel, fmt: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in source_shapes(cfg, bert.config.hidden_size, fmt).items():
        if key.endswith("weight") and len(shape) == 1:  # LayerNorm gains around 1
            sd[key] = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.3 * torch.randn(shape, generator=g)
    for key, value in bert.state_dict().items():
        sd[f"bertmodel.model.{key}"] = value.clone()
    return sd


# ---------------------------------------------------------------- functional reference

def _ln(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"])


def _lin(x, p, name):
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def _mha(q, k, v, heads, key_mask=None):
    """Softmax attention over already projected q (B, N, h*e), k, v (B, S, h*e)."""
    b, n, inner = q.shape
    e = inner // heads
    q, k, v = (t.reshape(b, -1, heads, e).transpose(1, 2) for t in (q, k, v))  # (B, h, *, e)
    scores = q @ k.transpose(-1, -2) / e**0.5  # (B, h, N, S)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ v  # (B, h, N, e)
    return out.transpose(1, 2).reshape(b, n, inner)


def _block(x, src, p, name, heads, key_mask=None):
    a = f"{name}.0"
    q = _ln(x, p, f"{a}.norm_q") @ p[f"{a}.fn.to_q.weight"].T
    k = _ln(src, p, f"{a}.norm_k") @ p[f"{a}.fn.to_k.weight"].T
    v = _ln(src, p, f"{a}.norm_v") @ p[f"{a}.fn.to_v.weight"].T
    x = x + _lin(_mha(q, k, v, heads, key_mask), p, f"{a}.fn.to_out.0")
    f = f"{name}.1"
    return x + _lin(F.gelu(_lin(_ln(x, p, f"{f}.norm"), p, f"{f}.fn.net.0")), p, f"{f}.fn.net.3")


def reference_forward(p, cfg, fmt, bert, text_bert, audio, vision, audio_lengths=None, vision_lengths=None):
    """The published architecture written out over source-named tensors; masks only when lengths are given."""
    t = cfg.n_tokens
    ids, mask, seg = text_bert[:, 0].long(), text_bert[:, 1].long(), text_bert[:, 2].long()
    text = bert(input_ids=ids, attention_mask=mask, token_type_ids=seg)[0]  # (B, L, H)
    masked = audio_lengths is not None
    embed = "proj_{}" if fmt == "official" else "embedding_{}"

    def embed_modality(x, m, frame_mask):
        name = embed.format(m)
        b, n, _ = x.shape
        h = torch.cat([p[f"{name}.1.extra_token"].expand(b, -1, -1), _lin(x, p, f"{name}.0")], 1)
        h = h + p[f"{name}.1.pos_embedding"][:, : t + n]
        key_mask = None
        if frame_mask is not None:
            key_mask = torch.cat([torch.ones(b, t, dtype=torch.bool), frame_mask], 1)
        for i in range(cfg.embed_depth):
            h = _block(h, h, p, f"{name}.1.encoder.layers.{i}", cfg.embed_heads, key_mask)
        return h[:, :t]

    def frames(lengths, n):
        return torch.arange(n)[None, :] < lengths[:, None] if masked else None

    h_l = embed_modality(text, "l", mask.bool() if masked else None)
    h_a = embed_modality(audio, "a", frames(audio_lengths, audio.shape[1]))
    h_v = embed_modality(vision, "v", frames(vision_lengths, vision.shape[1]))
    scales = [h_l + p["l_encoder.pos_embedding"]]
    for i in range(cfg.ahl_depth - 1):
        scales.append(_block(scales[-1], scales[-1], p, f"l_encoder.encoder.layers.{i}", cfg.lang_heads))
    hyper = p["h_hyper"].expand(text.shape[0], -1, -1)
    for j in range(cfg.ahl_depth):
        n = f"h_hyper_layer.layers.{j}.0"
        lang, a, v = _ln(scales[j], p, f"{n}.norm1"), _ln(h_a, p, f"{n}.norm2"), _ln(h_v, p, f"{n}.norm3")
        q = lang @ p[f"{n}.fn.to_q.weight"].T
        att = _mha(q, a @ p[f"{n}.fn.to_k_ta.weight"].T, a @ p[f"{n}.fn.to_v_ta.weight"].T, cfg.ahl_heads) + \
            _mha(q, v @ p[f"{n}.fn.to_k_tv.weight"].T, v @ p[f"{n}.fn.to_v_tv.weight"].T, cfg.ahl_heads)
        hyper = _ln(hyper, p, f"{n}.norm4") + _lin(att, p, f"{n}.fn.to_out.0")
    token = p["fusion_layer.extra_token"].expand(text.shape[0], -1, -1)
    src = torch.cat([token, hyper], 1) + p["fusion_layer.pos_embedding_s"]
    tgt = torch.cat([token, scales[-1]], 1) + p["fusion_layer.pos_embedding_t"]
    for i in range(cfg.fusion_depth):
        tgt = _block(tgt, src, p, f"fusion_layer.CrossTransformerEncoder.layers.{i}", cfg.fusion_heads)
    head = "regression_layer.0" if fmt == "official" else "regression_head"
    return _lin(tgt[:, 0], p, head).squeeze(-1)


def make_inputs(cfg: ModelConfig, b: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    text_len = torch.tensor([cfg.text_len, 3, 7, 5, 2][:b])
    text = torch.zeros(b, 3, cfg.text_len)  # (B, 3, L)
    text[:, 1] = (torch.arange(cfg.text_len)[None] < text_len[:, None]).float()
    text[:, 0] = torch.randint(1000, 30000, (b, cfg.text_len), generator=g).float() * text[:, 1]
    audio = torch.randn(b, cfg.audio_len, cfg.audio_dim, generator=g)
    vision = torch.randn(b, cfg.vision_len, cfg.vision_dim, generator=g)
    a_len = torch.tensor([4, cfg.audio_len, 9, 1, 12][:b])
    v_len = torch.tensor([3, 6, 2, 10, 11][:b])  # no sample uses the full vision length
    return text, audio, vision, a_len, v_len


def _converted(cfg, fmt, sd):
    model = ALMT(cfg, tiny_bert(), TEXT_DIM).eval()
    model.load_state_dict(convert_state_dict(sd, fmt, model), strict=True)
    return model


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("fmt", ["official", "mmsa"])
@pytest.mark.parametrize("embed_depth", [1, 2])
def test_converted_model_matches_reference(fmt, embed_depth):
    cfg = dataclasses.replace(CFG, embed_depth=embed_depth)
    bert = tiny_bert()
    sd = random_source(cfg, bert, fmt)
    model = _converted(cfg, fmt, sd)
    text, audio, vision, a_len, v_len = make_inputs(cfg)
    with torch.no_grad():
        ours = model(text, audio, vision, a_len, v_len)
        ref = reference_forward(sd, cfg, fmt, bert, text, audio, vision)
    assert ours.shape == (5,)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_masked_mode_matches_masked_reference():
    cfg = dataclasses.replace(CFG, masked=True)
    bert = tiny_bert()
    sd = random_source(cfg, bert, "official", seed=3)
    model = _converted(cfg, "official", sd)
    text, audio, vision, a_len, v_len = make_inputs(cfg)
    with torch.no_grad():
        ours = model(text, audio, vision, a_len, v_len)
        ref = reference_forward(sd, cfg, "official", bert, text, audio, vision, a_len, v_len)
        unmasked = reference_forward(sd, cfg, "official", bert, text, audio, vision)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, unmasked, atol=1e-3)


def test_wrapper_prefixes_are_stripped():
    bert = tiny_bert()
    sd = {f"Model.{k}": v for k, v in random_source(CFG, bert, "mmsa").items()}  # MMSA's AMIO wrapper
    model = _converted(CFG, "mmsa", sd)
    text, audio, vision, *_ = make_inputs(CFG)
    with torch.no_grad():
        torch.testing.assert_close(model(text, audio, vision),
                                   reference_forward({k[6:]: v for k, v in sd.items()}, CFG, "mmsa", bert,
                                                     text, audio, vision), atol=1e-5, rtol=1e-5)


def test_old_transformers_buffers_are_accepted():
    bert = tiny_bert()
    sd = random_source(CFG, bert, "official")
    sd["bertmodel.model.embeddings.position_ids"] = torch.arange(512)[None]
    _converted(CFG, "official", sd)


def test_missing_key_is_a_clear_error():
    sd = random_source(CFG, tiny_bert(), "official")
    del sd["h_hyper_layer.layers.1.0.fn.to_k_tv.weight"]
    model = ALMT(CFG, tiny_bert(), TEXT_DIM)
    with pytest.raises(CheckpointError, match=r"missing from the official weights: ahl\.1\.to_k_vision\.weight"):
        convert_state_dict(sd, "official", model)


def test_extra_key_is_a_clear_error():
    sd = random_source(CFG, tiny_bert(), "official")
    sd["proj_a.1.encoder.layers.7.0.norm_q.weight"] = torch.ones(CFG.dim)  # deeper than the config
    sd["something_else"] = torch.ones(1)
    model = ALMT(CFG, tiny_bert(), TEXT_DIM)
    with pytest.raises(CheckpointError, match="not used by the model: .*something_else"):
        convert_state_dict(sd, "official", model)


def test_shape_mismatch_and_wrong_format_are_clear_errors():
    sd = random_source(CFG, tiny_bert(), "official")
    model = ALMT(dataclasses.replace(CFG, audio_len=CFG.audio_len + 1), tiny_bert(), TEXT_DIM)
    with pytest.raises(CheckpointError, match=r"shape mismatch: proj_a\.1\.pos_embedding"):
        convert_state_dict(sd, "official", model)
    model = ALMT(CFG, tiny_bert(), TEXT_DIM)
    with pytest.raises(CheckpointError, match="missing from the mmsa weights"):
        convert_state_dict(sd, "mmsa", model)  # official names read as MMSA
    with pytest.raises(CheckpointError, match="unknown weights format"):
        convert_state_dict(sd, "keras", model)


def test_load_state_dict_file(tmp_path):
    from safetensors.torch import save_file

    sd = {"a": torch.ones(2), "b.c": torch.zeros(3)}
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    assert set(load_state_dict_file(tmp_path / "w.pt")) == {"a", "b.c"}
    save_file(sd, str(tmp_path / "w.safetensors"))
    assert set(load_state_dict_file(tmp_path / "w.safetensors")) == {"a", "b.c"}
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt: a text file, not a weights file"):
        load_state_dict_file(tmp_path / "bad.pt")
    os.replace(tmp_path / "w.safetensors", tmp_path / "renamed.bin")  # recognised by content
    assert set(load_state_dict_file(tmp_path / "renamed.bin")) == {"a", "b.c"}
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict_file(tmp_path / "list.pt")


@pytest.mark.parametrize("objective", ["regression", "contrastive"])
def test_import_weights_writes_a_loadable_checkpoint(tmp_path, objective):
    from transformers import AutoTokenizer

    from almt_pipeline.model.checkpoint import load_checkpoint
    from almt_pipeline.model.text_encoder import resolve_text_model

    text_dir = tmp_path / "tiny_bert"
    bert = tiny_bert()
    bert.save_pretrained(text_dir)
    AutoTokenizer.from_pretrained(resolve_text_model("minilm")).save_pretrained(text_dir)
    sd = random_source(CFG, bert, "official", seed=5)
    torch.save(sd, tmp_path / "almt.pth")
    # released weights have no heads of auxiliary objectives: a config asking for them imports as regression
    cfg = Config(name="tiny", model=CFG, train=TrainConfig(objective=objective))
    model = import_weights(tmp_path / "almt.pth", "official", cfg, str(text_dir), tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg.model.text_model == str(text_dir)
    assert loaded.cfg.train.objective == "regression" and loaded.model.aux is None
    text, audio, vision, *_ = make_inputs(CFG)
    with torch.no_grad():
        ref = reference_forward(sd, CFG, "official", bert, text, audio, vision)
        torch.testing.assert_close(model(text, audio, vision), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.model(text, audio, vision), ref, atol=1e-5, rtol=1e-5)
