"""One clip -> unpadded features (text, audio, face), with the models loaded once.

:class:`ClipExtractor` is what both ``almt extract`` (per clip of a batch) and ``almt predict``
run. :func:`run_guarded` is the one rule for a clip that fails: a typed error becomes a
:class:`ClipFailure` (one line naming the file and the cause) and the batch goes on; a missing
dependency stops the batch.

The container's duration (or the video's, when it gives none) is the clip's length: a video that
decodes far shorter is a truncated file and fails; an audio track that ends early is padded with
silence. Both, and decode errors ffmpeg went on past, are kept with one warning each.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch

from ..config import Config
from ..errors import AlmtError, ConfigError, DependencyError, MediaError
from ..media import DecodedAudio, PrefetchedFrames, decode_audio, decoded_duration_problem, iter_frames, load_audio
from ..probe import MediaInfo, probe
from ..utils import one_line, resolve_device
from .asr import ASR_SAMPLE_RATE, Transcriber, read_sidecar_transcript
from .audio import AudioFeaturizer
from .faces import FaceFeaturizer, make_face_featurizer
from .text import TextFeatures, TextFeaturizer

logger = logging.getLogger(__name__)

PREFETCH_SECONDS = 2.0  # decoded frames read ahead of the face featurizer (seconds of video)
PREFETCH_MIN_FRAMES = 4
LOOK_AHEAD_MAX_SECONDS = 120.0  # longer clips' audio is not decoded ahead (memory)
LOOK_AHEAD_KEPT = 2  # clips opened ahead and not yet called for, at most
T = TypeVar("T")


class AudioFeaturizerLike(Protocol):
    """(N,) mono waveform at ``sample_rate`` -> (T_a, dim) frame features."""

    sample_rate: int
    feature_names: list[str]
    dim: int

    def __call__(self, wave: np.ndarray) -> np.ndarray: ...


class TextFeaturizerLike(Protocol):
    """Transcript -> token ids, mask, segments and hidden states."""

    def __call__(self, text: str) -> TextFeatures: ...


class TranscriberLike(Protocol):
    """16 kHz mono float32 audio -> transcript."""

    def transcribe(self, wave: np.ndarray) -> str: ...


@dataclass
class ClipResult:
    """Features of one clip, before padding."""

    text_bert: np.ndarray  # (3, L) float32: token ids, attention mask, segment ids
    text: np.ndarray  # (L, H) float32 hidden states
    audio: np.ndarray  # (T_a, d_a) float32
    vision: np.ndarray  # (T_v, d_v) float32
    raw_text: str
    transcript_source: str  # "label.csv" | "sidecar" | "asr" | "given"
    face_fraction: float  # share of sampled frames with a face
    duration: float  # seconds of media
    text_truncated: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    decode_errors: int = 0  # errors ffmpeg reported and went on past (corrupt packets), audio + video
    audio_padded: float = 0.0  # seconds of silence added where the audio track ends before the clip
    started: float = 0.0  # time.time() when the extraction began (0 for a cached result)


@dataclass
class _Audio:
    """A clip's decoded audio and the features of it, padded with silence to ``n_samples``."""

    decoded: DecodedAudio
    sample_rate: int
    features: np.ndarray | None = None  # (T_a, d_a)
    n_samples: int = 0  # length of the waveform the features were computed over

    @property
    def seconds(self) -> float:
        return len(self.decoded.wave) / self.sample_rate

    @property
    def padded_seconds(self) -> float:
        return (self.n_samples - len(self.decoded.wave)) / self.sample_rate

    def padded_wave(self, reference: float | None) -> np.ndarray:
        """The waveform (N,) padded with silence to what the features cover so far, or to
        ``reference`` seconds when that is still far longer: (M,), M >= N."""
        wave = self.decoded.wave  # (N,)
        n = max(self.n_samples, len(wave))
        if reference and decoded_duration_problem(reference, n / self.sample_rate) is not None:
            n = round(reference * self.sample_rate)
        return np.pad(wave, (0, n - len(wave))) if n > len(wave) else wave


@dataclass
class _Opened:
    """A probed clip that passed the checks, with its audio when it was decoded ahead of time."""

    info: MediaInfo
    audio: DecodedAudio | None = None


@dataclass
class ClipFailure:
    """A clip that could not be extracted: one line naming the file and the cause."""

    path: str
    id: str
    error_type: str
    message: str
    traceback: str = ""


def run_guarded(work: Callable[[], T], path: str | Path, clip_id: str = "") -> T | ClipFailure:
    """``work()``, or the ClipFailure it raised. A :class:`DependencyError` (a missing package or
    model fails every clip) and ``KeyboardInterrupt`` pass through."""
    try:
        return work()
    except DependencyError:
        raise
    except AlmtError as e:
        return ClipFailure(str(path), clip_id, type(e).__name__, one_line(e))
    except Exception as e:  # an extractor bug must not stop the batch
        return ClipFailure(str(path), clip_id, type(e).__name__,
                           f"{path}: unexpected {type(e).__name__}: {one_line(e)}", traceback.format_exc())


def make_audio_featurizer(cfg: Config) -> AudioFeaturizerLike:
    return AudioFeaturizer(cfg.extract.audio)


def check_feature_widths(cfg: Config, audio_featurizer: AudioFeaturizerLike,
                         face_featurizer: FaceFeaturizer) -> None:
    """The extractors' widths must equal the model config's (the config is never changed)."""
    a, v = int(audio_featurizer.dim), int(face_featurizer.dim)
    if a != cfg.model.audio_dim:
        raise ConfigError(
            f"the audio features are {a}-d ({'+'.join(cfg.extract.audio.features)}) but "
            f"model.audio_dim is {cfg.model.audio_dim}: set model.audio_dim to {a} in the config "
            f"(or change extract.audio)"
        )
    if v != cfg.model.vision_dim:
        backend = cfg.extract.visual.backend
        raise ConfigError(
            f"the '{backend}' face features are {v}-d but model.vision_dim is "
            f"{cfg.model.vision_dim}: use a config made for this backend (e.g. --config "
            f"{backend if backend == 'pyfeat' else 'default'}) or set model.vision_dim to {v}"
        )


class ClipExtractor:
    """Loads the text, audio and face models once; ``extractor(path)`` -> :class:`ClipResult`.

    The speech recogniser is loaded on first need (a clip with no transcript). Bad media raise
    :class:`MediaError` with one line naming the file and the cause.
    """

    def __init__(self, cfg: Config, device: str = "cpu", *,
                 audio_featurizer: AudioFeaturizerLike | None = None,
                 face_featurizer: FaceFeaturizer | None = None,
                 text_featurizer: TextFeaturizerLike | None = None,
                 transcriber: TranscriberLike | None = None,
                 threads: int | None = None):
        self.cfg = cfg
        self.device = str(device)
        self.threads = threads  # CPU threads for speech recognition (None: all cores)
        self.audio_featurizer = audio_featurizer or make_audio_featurizer(cfg)
        self.face_featurizer = face_featurizer or make_face_featurizer(cfg.extract.visual)
        check_feature_widths(cfg, self.audio_featurizer, self.face_featurizer)
        self.text_featurizer = text_featurizer or TextFeaturizer(
            cfg.model.text_model, cfg.model.text_len, device=self.device)
        # a recogniser (e.g. prediction.py's, which may still be loading in the background), or None: load on need
        self._transcriber = transcriber
        self._transcriber_lock = threading.Lock()
        self._ahead: dict[Path, Future[_Opened]] = {}  # clips being opened ahead, oldest first

    @property
    def transcriber(self) -> TranscriberLike:
        with self._transcriber_lock:
            if self._transcriber is None:
                ex = self.cfg.extract
                # faster-whisper takes "cpu" or "cuda" (the index is a separate option)
                self._transcriber = Transcriber(ex.asr_model, language=ex.language,
                                                device=resolve_device(self.device).type, cpu_threads=self.threads)
            return self._transcriber

    def __call__(self, clip_path: str | Path, transcript: str | None = None,
                 transcript_source: str | None = None) -> ClipResult:
        """Extract one clip. Without ``transcript``: sidecar file, else speech recognition."""
        path = Path(clip_path)
        ex = self.cfg.extract
        timings: dict[str, float] = {}
        started = time.time()
        t_start = time.perf_counter()
        opened = self._take_opened(path)  # MediaError for missing, empty or non-media files
        info = opened.info
        timings["probe"] = time.perf_counter() - t_start

        # Video decoding starts now, in ffmpeg and a reader thread, so that it overlaps with the
        # audio and text work; a bounded queue keeps memory flat.
        vis = ex.visual
        stream = iter_frames(path, vis.fps, vis.max_side, info=info)
        frames = PrefetchedFrames(stream, depth=max(PREFETCH_MIN_FRAMES, int(PREFETCH_SECONDS * vis.fps)))
        try:
            audio, transcript, transcript_source = self._audio_and_transcript(
                path, opened, transcript, transcript_source, timings)
            t = time.perf_counter()
            with _one_core_for_ffmpeg(self.device):
                tf = self.text_featurizer(transcript)
            timings["text"] = time.perf_counter() - t

            t = time.perf_counter()
            vf = self.face_featurizer(frames)  # frames are streamed, never all in memory
            timings["video_decode"] = frames.wait_seconds  # time spent waiting for frames
            timings["face"] = time.perf_counter() - t - frames.wait_seconds
        finally:
            frames.close()
        if frames.count == 0:
            raise MediaError(f"{path}: no video frame could be decoded")
        duration = self._check_lengths(path, info, audio, frames.count / vis.fps, timings)
        errors = audio.decoded.decode_errors + stream.log.decode_errors
        if errors:
            first = audio.decoded.first_error or stream.log.first_error
            logger.warning("%s: %d decode error(s) in corrupt data (first: %s); the clip is kept with "
                           "what decoded", path, errors, first)
        face_found = np.asarray(vf.face_found, dtype=bool)  # (T_v,)
        timings["total"] = time.perf_counter() - t_start
        return ClipResult(
            text_bert=np.asarray(tf.text_bert, dtype=np.float32),
            text=np.asarray(tf.hidden, dtype=np.float32),
            audio=np.asarray(audio.features, dtype=np.float32), vision=np.asarray(vf.features, dtype=np.float32),
            raw_text=transcript, transcript_source=transcript_source or "label.csv",
            face_fraction=float(face_found.mean()) if face_found.size else 0.0,
            duration=duration, text_truncated=bool(tf.truncated), timings=timings,
            decode_errors=errors, audio_padded=round(audio.padded_seconds, 3), started=started,
        )

    def _check_lengths(self, path: Path, info: MediaInfo, audio: _Audio, video_s: float,
                       timings: dict[str, float]) -> float:
        """The clip's duration once the decoded lengths are checked against the container's: a
        video far shorter fails (a truncated file); audio far shorter than the clip is padded."""
        expected, audio_s = info.duration, audio.seconds
        if decoded_duration_problem(expected, video_s) is not None:
            if decoded_duration_problem(expected, audio_s) is not None:
                raise MediaError(f"{path}: decoded {video_s:.1f} s of video and {audio_s:.1f} s of audio "
                                 f"of {expected:.1f} s (file truncated?)")
            raise MediaError(f"{path}: video decoded {video_s:.1f} s of {expected:.1f} s while the audio "
                             f"goes on to {audio_s:.1f} s (video track cut short or damaged)")
        reference = max(expected or 0.0, video_s)  # the container's length, or the video's
        if audio.n_samples != len(wave := audio.padded_wave(reference)):
            self._featurize(audio, wave, timings)  # the container gave no duration: pad to the video's
        duration = expected or max(video_s, audio_s)
        if duration < self.cfg.extract.min_duration:
            raise MediaError(_too_short(path, duration, self.cfg.extract.min_duration))
        if audio.padded_seconds > 0:
            logger.warning("%s: the audio track ends at %.1f s of %.1f s; padded %.1f s of silence",
                           path, audio_s, audio.n_samples / audio.sample_rate, audio.padded_seconds)
        return duration

    def _featurize(self, audio: _Audio, wave: np.ndarray, timings: dict[str, float]) -> None:
        """Audio features (T_a, d_a) of ``wave`` (the decoded audio, maybe padded) into ``audio``."""
        from threadpoolctl import threadpool_limits

        t = time.perf_counter()
        # BLAS on one thread, in every engine: the features do not depend on the number of cores
        # (a Ray worker runs with one; several threads round the last float32 bits differently)
        with threadpool_limits(1):
            audio.features = np.asarray(self.audio_featurizer(wave), dtype=np.float32)  # (T_a, d_a)
        audio.n_samples = len(wave)
        timings["audio"] = timings.get("audio", 0.0) + time.perf_counter() - t

    def _open(self, path: Path, decode: bool) -> _Opened:
        """Probe ``path`` and check it can be a clip; with ``decode``, decode its audio too when
        the clip is short (a long clip's waveform is not held ahead of time)."""
        ex = self.cfg.extract
        info = probe(path)  # MediaError for missing, empty or non-media files
        if not info.has_video:
            raise MediaError(f"{path}: no video stream")
        if not info.has_audio:
            raise MediaError(f"{path}: no audio stream (the model needs audio)")
        if info.duration is not None and info.duration < ex.min_duration:
            raise MediaError(_too_short(path, info.duration, ex.min_duration))
        decoded = None
        if decode and info.duration is not None and info.duration <= LOOK_AHEAD_MAX_SECONDS:
            decoded = decode_audio(path, int(self.audio_featurizer.sample_rate), info=info)
        return _Opened(info, decoded)

    def look_ahead(self, clip_path: str | Path) -> None:
        """Start probing ``clip_path`` and decoding its audio in a background thread, so that the
        next call for that clip finds them done: ffmpeg works on the next clip while this process
        computes the current one. Errors are raised by that call, as without looking ahead."""
        path = Path(clip_path)
        future: Future[_Opened] = Future()

        def run() -> None:
            try:
                future.set_result(self._open(path, decode=True))
            except BaseException as e:  # noqa: BLE001 - raised again by the call for this clip
                future.set_exception(e)

        threading.Thread(target=run, name="almt-look-ahead", daemon=True).start()
        self._ahead[path] = future
        while len(self._ahead) > LOOK_AHEAD_KEPT:  # never called for: forgotten
            del self._ahead[next(iter(self._ahead))]

    def _take_opened(self, path: Path) -> _Opened:
        ahead = self._ahead.pop(path, None)
        if ahead is not None:
            return ahead.result()
        return self._open(path, decode=False)

    def _audio_and_transcript(self, path: Path, opened: _Opened, transcript: str | None,
                              source: str | None, timings: dict[str, float]
                              ) -> tuple[_Audio, str, str | None]:
        """The decoded audio with its features (padded to the container's duration when the audio
        track ends far earlier), and the transcript with its source."""
        t = time.perf_counter()
        sr = int(self.audio_featurizer.sample_rate)
        info = opened.info
        audio = _Audio(opened.audio if opened.audio is not None else decode_audio(path, sr, info=info), sr)
        wave = audio.decoded.wave  # (N,) float32 mono
        timings["audio_decode"] = time.perf_counter() - t
        self._featurize(audio, audio.padded_wave(info.duration), timings)

        if transcript is None:
            transcript = read_sidecar_transcript(path)
            source = "sidecar" if transcript is not None else None
        if transcript is None:
            t = time.perf_counter()
            wave16 = wave if sr == ASR_SAMPLE_RATE else load_audio(path, ASR_SAMPLE_RATE, info=info)
            transcript = self.transcriber.transcribe(wave16).strip()
            source = "asr"
            timings["asr"] = time.perf_counter() - t
        return audio, transcript, source


@contextmanager
def _one_core_for_ffmpeg(device: str) -> Iterator[None]:
    """Run torch on one thread fewer while the video decoder works in parallel: busy-waiting
    torch threads competing with ffmpeg for a core make a small model many times slower."""
    n = torch.get_num_threads()
    if device.startswith("cuda") or n <= 1:
        yield
        return
    torch.set_num_threads(n - 1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _too_short(path: Path, duration: float, min_duration: float) -> str:
    return f"{path}: too short ({duration:.2f} s; extract.min_duration is {min_duration:g} s)"
