"""Transcripts longer than the model's text length: scored in windows by `almt predict`, never cut.

A tiny random checkpoint (text_len 12, so windows of 10 transcript tokens) with the `default`
extraction settings scores the committed clip `with_sidecar.mp4` through the real extractors; a
long sidecar transcript next to a copy of the clip makes it long (the transcript may be longer
than the speech: windows follow the words, not the audio).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_tiny_checkpoint
from typer.testing import CliRunner

from almt_pipeline import prediction
from almt_pipeline.cli import app
from almt_pipeline.extractors.text import TextFeaturizer, split_words
from almt_pipeline.features import fit_length
from almt_pipeline.prediction import Predictor, Window, weighted_score

TEXT_LEN, TEXT_DIM = 12, 32
WORDS = ("good", "bad", "movie", "great", "boring", "fun", "sad", "happy", "love", "hate")  # one token each


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random ALMT with the `default` extractors' widths (33 audio, 160 vision features)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("long_text"), text_len=TEXT_LEN, ahl_depth=2, seed=5)


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor(checkpoint, device="cpu")


def _long_clip(data_dir: Path, folder: Path, n_words: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    clip = folder / "long.mp4"
    shutil.copy(data_dir / "with_sidecar.mp4", clip)
    clip.with_suffix(".txt").write_text(" ".join(WORDS[i % len(WORDS)] for i in range(n_words)),
                                        encoding="utf-8")
    return clip


def test_split_words_cuts_between_words_only():
    windows = split_words([[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12], [], [13], [14, 15]], 3)
    assert [ids for ids, _, _ in windows] == [[1, 2, 3], [4], [5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15]]
    bounds = [(start, end) for _, start, end in windows]
    assert bounds[:2] == [(0.0, 1.0), (1.0, 2.0)]
    assert bounds[2] == pytest.approx((2.0, 2 + 3 / 7)) and bounds[3] == pytest.approx((2 + 3 / 7, 2 + 6 / 7))
    assert bounds[4] == pytest.approx((2 + 6 / 7, 6.0))  # a word without tokens goes with its neighbours
    assert bounds[5] == (6.0, 7.0)
    assert all(a[2] == b[1] for a, b in zip(windows, windows[1:]))  # contiguous
    assert split_words([], 3) == [([], 0.0, 0.0)]


def test_text_windows_keep_every_token(predictor):
    """Windows hold the whole text's tokens, in order, at most L - 2 per window; a text that fits
    is one window equal to the feature-file row."""
    text: TextFeaturizer = predictor.text
    tok = text.tokenizer
    short = "The plot was dull, and far too slow!"
    (one,) = text.windows(short)
    assert np.array_equal(one.text_bert, text(short).text_bert) and (one.start, one.end) == (0.0, 1.0)

    long = " ".join(["Wonderful, heart-warming acting;"] * 9 + ["supercalifragilisticexpialidocious" * 3])
    full = tok(long, add_special_tokens=True)["input_ids"]
    windows = text.windows(long)
    ids = []
    for w in windows:
        row = w.text_bert[0][w.text_bert[1] == 1].astype(int).tolist()
        assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id and len(row) == w.tokens + 2
        assert w.tokens <= TEXT_LEN - 2 and not w.text_bert[0][w.text_bert[1] == 0].any()
        ids += row[1:-1]
    assert ids == full[1:-1]
    assert windows[0].start == 0.0 and windows[-1].end == 1.0
    assert all(a.end == b.start for a, b in zip(windows, windows[1:]))


def test_short_transcript_is_one_window_scored_as_before(predictor, data_dir):
    """A transcript that fits gives one window and exactly the whole-clip score."""
    clip = data_dir / "with_sidecar.mp4"
    r = predictor.predict(clip)
    assert r.transcript == "The plot was dull and far too slow." and r.text_tokens == 9
    assert len(r.windows) == 1
    (w,) = r.windows
    assert (w.start, w.end, w.tokens, w.score) == (0.0, r.duration, 9, r.score)

    result = predictor.extractor(clip)  # the single-pass scoring of the whole clip
    m = predictor.cfg.model
    audio, a_len = fit_length(result.audio, m.audio_len)
    vision, v_len = fit_length(result.vision, m.vision_len)
    with torch.inference_mode():
        whole = predictor.checkpoint.model(
            torch.from_numpy(result.text_bert[None]), torch.from_numpy(audio[None]),
            torch.from_numpy(vision[None]), audio_lengths=torch.tensor([a_len]),
            vision_lengths=torch.tensor([v_len]))
    assert r.score == float(whole.reshape(-1)[0])


def test_long_transcript_is_scored_in_windows(predictor, data_dir, tmp_path, monkeypatch):
    n_words = 95  # one token each: ceil(95 / 10) windows
    r = predictor.predict(_long_clip(data_dir, tmp_path, n_words))
    assert r.text_tokens == n_words and r.text_len == TEXT_LEN
    assert len(r.windows) == math.ceil(n_words / (TEXT_LEN - 2)) == 10
    assert [w.tokens for w in r.windows] == [10] * 9 + [5]
    assert r.windows[0].start == 0.0 and r.windows[-1].end == pytest.approx(r.duration)
    assert all(a.end == pytest.approx(b.start) for a, b in zip(r.windows, r.windows[1:]))
    weights = np.array([w.tokens for w in r.windows], float)
    scores = np.array([w.score for w in r.windows])
    assert r.score == pytest.approx(float((scores * weights).sum() / weights.sum()), abs=1e-12)
    assert len(set(scores.round(7))) > 1  # each window is scored on its own text and frames

    monkeypatch.setattr(prediction, "WINDOW_BATCH", 1)  # one window per model call: same scores
    again = predictor.predict(_long_clip(data_dir, tmp_path, n_words))
    assert [w.score for w in again.windows] == pytest.approx(scores.tolist(), abs=1e-5)


def test_weighted_score():
    assert weighted_score([Window(0, 1, 10, 1.0), Window(1, 2, 5, -2.0)]) == pytest.approx(0.0)
    assert weighted_score([Window(0, 1, 0, 0.5)]) == 0.5  # an empty transcript


def test_cli_reports_windows_in_every_output(checkpoint, data_dir, tmp_path):
    clip = _long_clip(data_dir, tmp_path / "clips", 95)
    runner = CliRunner()
    r = runner.invoke(app, ["predict", str(clip), "--checkpoint", str(checkpoint), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "95 tokens scored in 10 windows of <= 12 tokens" in r.output and "and 4 more" in r.output

    r = runner.invoke(app, ["predict", str(clip), "--checkpoint", str(checkpoint), "--json", "--quiet",
                            "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    row = json.loads(next(ln for ln in r.output.splitlines() if ln.startswith("{")))
    assert row["text_tokens"] == 95 and row["text_len"] == TEXT_LEN and len(row["windows"]) == 10
    assert set(row["windows"][0]) == {"start", "end", "tokens", "score"}
    with open(tmp_path / "p.csv", newline="") as f:
        (csv_row,) = list(csv.DictReader(f))
    assert csv_row["windows"] == "10" and csv_row["text_tokens"] == "95"
    assert float(csv_row["score"]) == pytest.approx(row["score"])

    r = runner.invoke(app, ["predict", str(data_dir / "with_sidecar.mp4"), "--checkpoint", str(checkpoint)])
    assert r.exit_code == 0 and "9 tokens scored as a whole" in r.output
