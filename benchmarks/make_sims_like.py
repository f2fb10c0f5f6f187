"""A seeded synthetic feature file shaped like CH-SIMS (MMSA unaligned_39), with unimodal labels.

Shapes follow the CH-SIMS file: 39 tokens, audio (400, 33), vision (55, 709), labels in
[-1, 1] in steps of 0.2, ids like ``video_0001$_$0001``. Unlike random test data, every
modality carries signal:

* labels: a shared latent sentiment ``s ~ N(-0.05, 0.45)``; ``label_T/A/V`` = ``s`` plus
  modality-specific noise N(0, 0.45), clipped to [-1, 1] and rounded to 0.2; the multimodal label
  is the clipped, rounded weighted mean 0.5 T + 0.25 A + 0.25 V, so each modality holds a part of
  it that the other two lack.
* text: filler words plus 1-5 sentiment words, each drawn from a small positive list with
  probability 0.5 + 0.45 label_T (else from a negative list), tokenized with the text model's
  own tokenizer (the BERT-uncased vocabulary of the default MiniLM). When the tokenizer cannot be
  loaded, fixed id ranges stand in for the word lists (meta ``synthetic.text`` says which).
  ``text`` (the frozen-encoder features, unused by training) is zeros.
* audio / vision: N(0, 1) frames over a variable real length, plus a per-clip shift of
  ``0.6 * (label_A + N(0, 0.4))`` (vision: ``label_V``) with a fixed +-1 pattern on a few
  dims, so the shift also holds noise no amount of frames averages away.

It also writes the training config next to the pickle: the built-in default with the CH-SIMS
lengths and widths, label scale sims, 20 epochs, patience 10.

    python benchmarks/make_sims_like.py --out /tmp/sims/sims_like.pkl
    almt train --data /tmp/sims/sims_like.pkl --config /tmp/sims/sims_like.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

TEXT_LEN, AUDIO_LEN, AUDIO_DIM, VISION_LEN, VISION_DIM = 39, 400, 33, 55, 709
DEFAULT_TEXT_DIM = 384  # MiniLM's hidden size, used when the text model cannot be loaded
STEP = 0.2  # CH-SIMS labels are multiples of 0.2
LATENT_MEAN, LATENT_SD, UNIMODAL_SD = -0.05, 0.45, 0.45
WEIGHTS = {"T": 0.5, "A": 0.25, "V": 0.25}  # multimodal label = rounded weighted mean
CLIP_NOISE_SD = 0.4  # per-clip noise in the audio / vision shift (frames cannot average it out)
AUDIO_SIGNAL_DIMS = (1, 2, 3, 5, 8, 13)  # of 33
VISION_SIGNAL_DIMS = tuple(range(100, 116))  # of 709 (16 "action-unit-like" columns)
AUDIO_GAIN, VISION_GAIN = 0.6, 0.6
AUDIO_MIN_LEN, VISION_MIN_LEN = 80, 12
CLIPS_PER_VIDEO = (2, 7)  # low (inclusive), high (exclusive)
POSITIVE = ("good", "great", "happy", "love", "excellent", "wonderful", "best", "enjoy", "beautiful",
            "perfect", "nice", "fun", "amazing", "brilliant")
NEGATIVE = ("bad", "terrible", "sad", "hate", "awful", "boring", "worst", "poor", "ugly", "angry",
            "disappointing", "horrible", "stupid", "annoying")
NEUTRAL = ("the", "a", "movie", "film", "story", "it", "was", "is", "and", "i", "we", "they", "this", "that",
           "about", "scene", "actor", "people", "time", "today", "then", "there", "with", "of", "to", "in",
           "on", "for", "some", "very", "really", "just", "think", "said", "went", "day", "city", "house",
           "friend", "phone", "car")
FALLBACK_IDS = {"positive": 20000, "negative": 21000, "neutral": 22000}  # first id of each range
CLS, SEP = 101, 102  # bert-base-uncased special tokens


def round_label(x: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1] and round to the nearest multiple of 0.2 (as float32, never -0.0)."""
    return (np.round(np.clip(x, -1.0, 1.0) / STEP) * STEP + 0.0).astype(np.float32)


def draw_labels(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Unimodal labels around a shared latent, and the multimodal label combining them."""
    latent = rng.normal(LATENT_MEAN, LATENT_SD, n)
    uni = {m: round_label(latent + rng.normal(0.0, UNIMODAL_SD, n)) for m in WEIGHTS}
    weighted = np.zeros(n)
    for m, w in WEIGHTS.items():
        weighted += w * uni[m].astype(np.float64)
    multi = round_label(weighted)
    return {"M": multi, **uni}


def sentence(rng: np.random.Generator, label_t: float) -> list[str]:
    """Filler words with 1-5 sentiment words whose polarity follows ``label_t``."""
    words = list(rng.choice(NEUTRAL, size=int(rng.integers(6, 27))))
    n_sent = 1 + int(rng.binomial(4, abs(label_t)))
    p_pos = 0.5 + 0.45 * label_t
    for _ in range(n_sent):
        pool = POSITIVE if rng.random() < p_pos else NEGATIVE
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(pool)))
    return words


def load_tokenizer(text_model: str) -> tuple[Any | None, int]:
    """The text model's tokenizer and hidden size; (None, 384) when it does not load offline."""
    from almt_pipeline.errors import TextModelError
    from almt_pipeline.model.text_encoder import load_text_model

    try:
        model, tokenizer = load_text_model(text_model, pretrained=False)  # weights are not needed
    except TextModelError as e:
        print(f"tokenizer of {text_model} not available ({e}); using fixed id ranges", file=sys.stderr)
        return None, DEFAULT_TEXT_DIM
    return tokenizer, int(model.config.hidden_size)


def _fallback_id(word: str) -> int:
    for kind, words in (("positive", POSITIVE), ("negative", NEGATIVE), ("neutral", NEUTRAL)):
        if word in words:
            return FALLBACK_IDS[kind] + words.index(word)
    raise KeyError(word)


def encode(texts: list[list[str]], tokenizer: Any | None) -> np.ndarray:
    """text_bert (N, 3, L): token ids, attention mask, segment ids (zeros)."""
    if tokenizer is not None:
        enc = tokenizer([" ".join(w) for w in texts], max_length=TEXT_LEN, truncation=True,
                        padding="max_length", return_attention_mask=True, return_token_type_ids=True,
                        return_tensors="np")
        return np.stack([enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]],
                        axis=1).astype(np.float32)  # (N, 3, L)
    out = np.zeros((len(texts), 3, TEXT_LEN), np.float32)  # (N, 3, L)
    for i, words in enumerate(texts):
        ids = [CLS, *(_fallback_id(w) for w in words[:TEXT_LEN - 2]), SEP]
        out[i, 0, :len(ids)] = ids
        out[i, 1, :len(ids)] = 1.0
    return out


def frames(rng: np.random.Generator, label: np.ndarray, shape: tuple[int, int], min_len: int,
           dims: tuple[int, ...], gain: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, T, d) N(0, 1) frames over a random real length (zeros after it), shifted on ``dims``
    by ``gain * (label + clip noise)`` with a fixed sign per dim; and the (N,) lengths."""
    n = len(label)
    t_max, d = shape
    lengths = rng.integers(min_len, t_max + 1, size=n)
    x = rng.standard_normal((n, t_max, d), dtype=np.float32)  # (N, T, d)
    signs = np.where(np.arange(len(dims)) % 2 == 0, 1.0, -1.0).astype(np.float32)  # (k,)
    shift = gain * (label + rng.normal(0.0, CLIP_NOISE_SD, n)).astype(np.float32)  # (N,)
    x[:, :, list(dims)] += shift[:, None, None] * signs[None, None, :]
    x[np.arange(t_max)[None, :] >= lengths[:, None]] = 0.0  # padding
    return x, lengths.astype(np.int64)


def make_ids(rng: np.random.Generator, n: int, first_video: int) -> tuple[list[str], int]:
    """``video_XXXX$_$YYYY`` ids, a few clips per video; returns them and the next video number."""
    ids: list[str] = []
    video = first_video
    while len(ids) < n:
        for clip in range(1, int(rng.integers(*CLIPS_PER_VIDEO)) + 1):
            ids.append(f"video_{video:04d}$_${clip:04d}")
        video += 1
    return ids[:n], video


def make_split(rng: np.random.Generator, n: int, first_video: int, tokenizer: Any | None,
               text_dim: int) -> tuple[dict[str, np.ndarray], int]:
    """One split's arrays (the keys of an MMSA file plus unimodal labels); the next video number."""
    labels = draw_labels(rng, n)
    words = [sentence(rng, float(t)) for t in labels["T"]]
    audio, audio_lengths = frames(rng, labels["A"], (AUDIO_LEN, AUDIO_DIM), AUDIO_MIN_LEN,
                                  AUDIO_SIGNAL_DIMS, AUDIO_GAIN)
    vision, vision_lengths = frames(rng, labels["V"], (VISION_LEN, VISION_DIM), VISION_MIN_LEN,
                                    VISION_SIGNAL_DIMS, VISION_GAIN)
    ids, next_video = make_ids(rng, n, first_video)
    m = labels["M"]
    split = {
        "id": np.array(ids, dtype=object),
        "raw_text": np.array([" ".join(w) for w in words], dtype=object),
        "text_bert": encode(words, tokenizer),
        "text": np.zeros((n, TEXT_LEN, text_dim), np.float32),  # (N, L, H): unused by training
        "audio": audio,
        "vision": vision,
        "audio_lengths": audio_lengths,
        "vision_lengths": vision_lengths,
        "regression_labels": m,
        "annotations": np.where(m > 0, "Positive", np.where(m < 0, "Negative", "Neutral")).astype(object),
        **{f"regression_labels_{k}": labels[k] for k in ("T", "A", "V")},
    }
    return split, next_video


def _meta(args: argparse.Namespace, tokenizer: Any | None, text_dim: int) -> dict[str, Any]:
    return {
        "text_model": args.text_model,
        "text_dim": text_dim,
        "label_scale": "sims",
        "feature_names": {"audio": [f"synthetic_a{i:02d}" for i in range(AUDIO_DIM)],
                          "vision": [f"synthetic_v{i:03d}" for i in range(VISION_DIM)]},
        "lengths": {"text": TEXT_LEN, "audio": AUDIO_LEN, "vision": VISION_LEN},
        "synthetic": {
            "generator": "benchmarks/make_sims_like.py", "seed": args.seed,
            "text": "tokenizer" if tokenizer is not None else "fixed id ranges",
            "label_weights": WEIGHTS, "latent": [LATENT_MEAN, LATENT_SD], "unimodal_sd": UNIMODAL_SD,
            "clip_noise_sd": CLIP_NOISE_SD, "audio_signal_dims": list(AUDIO_SIGNAL_DIMS),
            "vision_signal_dims": list(VISION_SIGNAL_DIMS), "gains": {"audio": AUDIO_GAIN, "vision": VISION_GAIN},
        },
    }


def write_config(path: Path, text_model: str, epochs: int, patience: int | None) -> None:
    """The built-in default config (its YAML, so unset keys keep the package defaults) with the
    CH-SIMS lengths and widths, label scale sims and the given epochs and patience."""
    import yaml

    from almt_pipeline.config import builtin_config_dir, load_config

    raw = yaml.safe_load(builtin_config_dir().joinpath("default.yaml").read_text(encoding="utf-8"))
    raw["name"] = "sims_like"
    raw["model"].update(text_model=text_model, text_len=TEXT_LEN, audio_dim=AUDIO_DIM, audio_len=AUDIO_LEN,
                        vision_dim=VISION_DIM, vision_len=VISION_LEN)
    raw["train"].update(label_scale="sims", epochs=epochs, patience=patience)
    header = ("# The built-in default config for a CH-SIMS-shaped feature file "
              "(written by benchmarks/make_sims_like.py)\n")
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    load_config(path)  # it must pass the package's config checks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def _probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Least-squares fit (with intercept) on train; its predictions on test."""
    coef = np.linalg.lstsq(np.c_[x_train, np.ones(len(x_train))], y_train, rcond=None)[0]
    return np.c_[x_test, np.ones(len(x_test))] @ coef


def signal_report(train: dict[str, np.ndarray], test: dict[str, np.ndarray], pos: set[int],
                  neg: set[int]) -> list[str]:
    """Pearson r on test of a linear probe per modality (fit on train) with the labels; the probes
    see clip summaries: sentiment-word counts, and the mean of the signal dims over real frames."""
    def feats(split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tok = split["text_bert"][:, 0].astype(np.int64)  # (N, L)
        counts = np.stack([np.isin(tok, list(pos)).sum(1), np.isin(tok, list(neg)).sum(1)], 1)  # (N, 2)
        a = split["audio"].sum(1) / split["audio_lengths"][:, None]  # (N, d_a)
        v = split["vision"].sum(1) / split["vision_lengths"][:, None]  # (N, d_v)
        out = {"T": counts.astype(np.float64), "A": a[:, list(AUDIO_SIGNAL_DIMS)], "V": v[:, list(VISION_SIGNAL_DIMS)]}
        out["T+A+V"] = np.concatenate(list(out.values()), 1)
        return out

    f_tr, f_te = feats(train), feats(test)
    y_m = test["regression_labels"]
    lines = []
    for m in ("T", "A", "V"):
        y_uni = test[f"regression_labels_{m}"]
        pred = _probe(f_tr[m], train[f"regression_labels_{m}"], f_te[m])
        lines.append(f"  {m}: r(probe, label_{m}) = {_pearson(pred, y_uni):.3f}, "
                     f"r(probe, label_M) = {_pearson(pred, y_m):.3f}, "
                     f"r(label_{m}, label_M) = {_pearson(y_uni, y_m):.3f}")
    pred = _probe(f_tr["T+A+V"], train["regression_labels"], f_te["T+A+V"])
    lines.append(f"  T+A+V: r(probe, label_M) = {_pearson(pred, y_m):.3f}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("sims_like.pkl"),
                   help="feature file to write; the config goes next to it with the suffix .yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=240)
    p.add_argument("--n-valid", type=int, default=60)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--text-model", default="sentence-transformers/all-MiniLM-L6-v2",
                   help="its tokenizer turns the words into token ids")
    p.add_argument("--epochs", type=int, default=20, help="train.epochs of the written config")
    p.add_argument("--patience", type=int, default=10, help="train.patience of the written config (0: none)")
    args = p.parse_args()
    if min(args.n_train, args.n_valid, args.n_test) < 2:
        p.error("each split needs at least 2 samples")

    from almt_pipeline.features import load_features, save_features

    start = time.perf_counter()
    tokenizer, text_dim = load_tokenizer(args.text_model)
    rng = np.random.default_rng(args.seed)
    splits: dict[str, dict[str, np.ndarray]] = {}
    video = 1
    for name, n in (("train", args.n_train), ("valid", args.n_valid), ("test", args.n_test)):
        splits[name], video = make_split(rng, n, video, tokenizer, text_dim)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    save_features(out, splits, _meta(args, tokenizer, text_dim))
    config_path = out.with_suffix(".yaml")
    write_config(config_path, args.text_model, args.epochs, args.patience or None)
    elapsed = time.perf_counter() - start

    data = load_features(out)  # the file must pass the package's own checks
    if tokenizer is not None:
        pos = set(tokenizer.convert_tokens_to_ids(list(POSITIVE)))
        neg = set(tokenizer.convert_tokens_to_ids(list(NEGATIVE)))
    else:
        pos = {_fallback_id(w) for w in POSITIVE}
        neg = {_fallback_id(w) for w in NEGATIVE}
    sizes = ", ".join(f"{s} {data.n(s)}" for s in data.splits)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; {sizes}; label scale {data.label_scale}; "
          f"text: {'tokenizer of ' + args.text_model if tokenizer is not None else 'fixed id ranges'}) "
          f"in {elapsed:.1f} s")
    print(f"wrote {config_path}")
    y = data.splits["train"]["regression_labels"]
    print(f"train labels: mean {y.mean():+.3f}, sd {y.std():.3f}, "
          f"negative/neutral/positive {(y < 0).sum()}/{(y == 0).sum()}/{(y > 0).sum()}")
    print("linear probes on clip summaries (fit on train, scored on test):")
    print("\n".join(signal_report(data.splits["train"], data.splits["test"], pos, neg)))


if __name__ == "__main__":
    main()
