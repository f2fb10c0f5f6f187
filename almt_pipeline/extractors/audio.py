"""Acoustic frame features with librosa: the feature definitions and ``AudioFeaturizer``.

The default recipe is the CH-SIMS 33-d one: at 22050 Hz, hop 512, n_fft 2048, per frame
zero-crossing rate (1) + HTK MFCC (20) + chroma_cqt (12), stacked in that order as (T, 33).
Other librosa features can be listed in ``AudioConfig.features``; every feature is framed with
the same hop (centred frames), so all give the same T. The magnitude STFT is computed once and
shared by the features that use it; chroma_cqt is computed once and shared with tonnetz.

Long waveforms are processed in chunks of ``chunk_seconds`` so memory does not grow with clip
length, with the same result as the whole-waveform computation; how a chunk is cut and what it
needs from the whole signal lives in ``audio_chunks``. Besides the tuning estimates (handled
there), the one whole-signal quantity is the ``top_db`` floor of the MFCC's log-mel spectrogram:
in chunked mode log-mel frames are kept (128 rows) and the MFCC taken at the end. A waveform no
longer than one chunk takes the plain whole-signal path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, ExtractionError
from ..utils import one_line
from .audio_chunks import ChunkPlan, Signal, reuse_cqt_filters

if TYPE_CHECKING:
    from ..config import AudioConfig

log = logging.getLogger(__name__)

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
CONTRAST_BANDS = 6  # librosa.feature.spectral_contrast default n_bands (gives n_bands + 1 rows)
TONNETZ_NAMES = ("fifth_x", "fifth_y", "minor_x", "minor_y", "major_x", "major_y")
WARMUP_SECONDS = 1.0  # length of the test signal ``warm_up`` runs through the features
CHUNK_SECONDS = 30.0  # audio per chunk for long waveforms (memory per chunk ~1.3 MB per second)
MFCC_TOP_DB = 80.0  # power_to_db's top_db: floor relative to the loudest log-mel value of the signal
CENS_SMOOTH_FRAMES = 41 + 2  # chroma_cens win_len_smooth (41) -> smoothing window of 43 frames
# librosa messages that are expected for short or silent clips and say nothing useful to a user.
_QUIET_WARNINGS = (r"n_fft=\d+ is too large", r"Trying to estimate tuning from empty frequency set")

# librosa's numba kernels are compiled on first use and cached on disk. Two processes compiling
# the same kernel at once can leave a mixed cache that crashes every later process (upstream
# numba#10128), so the first call of each feature set is serialised across processes by a file lock.
_WARMED: set[tuple[str, ...]] = set()
_WARM_THREAD_LOCK = threading.Lock()
_LOCK_FILE = os.path.join(tempfile.gettempdir(), "almt-pipeline-numba.lock")


@contextlib.contextmanager
def _first_use_guard(key: tuple[str, ...]) -> Iterator[None]:
    if key in _WARMED:
        yield
        return
    with _WARM_THREAD_LOCK:
        try:
            import fcntl

            posix = True
        except ImportError:  # not POSIX: no cross-process lock
            posix = False
        with contextlib.ExitStack() as stack:
            if posix:
                try:
                    fd = stack.enter_context(open(_LOCK_FILE, "a"))
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    stack.callback(fcntl.flock, fd, fcntl.LOCK_UN)
                except OSError as e:  # unwritable temp dir: go on without the lock
                    log.debug("no numba warm-up lock (%s)", e)
            yield
        _WARMED.add(key)


def _zcr(s: Signal) -> np.ndarray:
    import librosa

    y, keep = s.stft_segment()
    zcr = librosa.feature.zero_crossing_rate(y, frame_length=s.cfg.n_fft, hop_length=s.cfg.hop_length)
    return zcr[:, keep]


def _rms(s: Signal) -> np.ndarray:
    import librosa

    y, keep = s.stft_segment()
    return librosa.feature.rms(y=y, frame_length=s.cfg.n_fft, hop_length=s.cfg.hop_length)[:, keep]


def _mfcc(s: Signal) -> np.ndarray:
    import librosa

    # Same as librosa.feature.mfcc(y=..., htk=True): log-power mel spectrogram -> DCT-II (ortho).
    mel = librosa.feature.melspectrogram(S=s.mag**2, sr=s.sr, htk=True)  # (n_mels, T)
    if s.chunked:  # the top_db floor needs the whole signal's maximum: see _mfcc_finish
        return librosa.power_to_db(mel, top_db=None)  # (n_mels, t)
    return librosa.feature.mfcc(S=librosa.power_to_db(mel), sr=s.sr, n_mfcc=s.cfg.n_mfcc)


def _mfcc_finish(log_mel: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """(n_mels, T) log-mel of all chunks -> (n_mfcc, T), as power_to_db(top_db) + mfcc would give."""
    import librosa

    log_mel = np.maximum(log_mel, log_mel.max() - MFCC_TOP_DB)
    return librosa.feature.mfcc(S=log_mel, sr=cfg.sample_rate, n_mfcc=cfg.n_mfcc)


def _chroma_cqt(s: Signal) -> np.ndarray:
    return s.chroma_cqt(s.cfg.n_chroma)


def _chroma_stft(s: Signal) -> np.ndarray:
    import librosa

    if s.plan is not None:  # chunked
        tuning = s.plan.stft_tuning(s.cfg.n_chroma)
        return librosa.feature.chroma_stft(S=s.mag**2, sr=s.sr, n_chroma=s.cfg.n_chroma, tuning=tuning)
    return librosa.feature.chroma_stft(S=s.mag**2, sr=s.sr, n_chroma=s.cfg.n_chroma)


def _chroma_cens(s: Signal) -> np.ndarray:
    import librosa

    # The temporal smoothing reaches half its window beyond each frame.
    kwargs, keep = s.cqt_kwargs(s.cfg.n_chroma, extra_context=CENS_SMOOTH_FRAMES // 2 + 1)
    return librosa.feature.chroma_cens(**kwargs)[:, keep]


def _spectral(name: str) -> Callable[[Signal], np.ndarray]:
    def compute(s: Signal) -> np.ndarray:
        import librosa

        fn = getattr(librosa.feature, name)
        if name == "spectral_flatness":
            return fn(S=s.mag)
        if name == "spectral_contrast":
            return fn(S=s.mag, sr=s.sr, n_bands=CONTRAST_BANDS)
        return fn(S=s.mag, sr=s.sr)

    return compute


def _tonnetz(s: Signal) -> np.ndarray:
    import librosa

    return librosa.feature.tonnetz(chroma=s.chroma_cqt(len(PITCH_CLASSES)))


def _chroma_names(feature: str, n: int) -> list[str]:
    if n == len(PITCH_CLASSES):
        return [f"{feature}_{p}" for p in PITCH_CLASSES]
    return [f"{feature}_{i:02d}" for i in range(1, n + 1)]


@dataclass(frozen=True)
class AudioFeature:
    names: Callable[[AudioConfig], list[str]]  # row names, known from the config alone
    compute: Callable[[Signal], np.ndarray]  # -> (d, T); in chunked mode the chunk's (d', t)
    # chunked mode only: all chunks' blocks concatenated (d', T) -> (d, T)
    finish: Callable[[np.ndarray, AudioConfig], np.ndarray] | None = None


FEATURES: dict[str, AudioFeature] = {
    "zcr": AudioFeature(lambda c: ["zcr"], _zcr),
    "rms": AudioFeature(lambda c: ["rms"], _rms),
    "mfcc": AudioFeature(lambda c: [f"mfcc_{i:02d}" for i in range(1, c.n_mfcc + 1)], _mfcc, _mfcc_finish),
    "chroma_cqt": AudioFeature(lambda c: _chroma_names("chroma_cqt", c.n_chroma), _chroma_cqt),
    "chroma_stft": AudioFeature(lambda c: _chroma_names("chroma_stft", c.n_chroma), _chroma_stft),
    "chroma_cens": AudioFeature(lambda c: _chroma_names("chroma_cens", c.n_chroma), _chroma_cens),
    "spectral_centroid": AudioFeature(lambda c: ["spectral_centroid"], _spectral("spectral_centroid")),
    "spectral_bandwidth": AudioFeature(lambda c: ["spectral_bandwidth"], _spectral("spectral_bandwidth")),
    "spectral_rolloff": AudioFeature(lambda c: ["spectral_rolloff"], _spectral("spectral_rolloff")),
    "spectral_flatness": AudioFeature(lambda c: ["spectral_flatness"], _spectral("spectral_flatness")),
    "spectral_contrast": AudioFeature(
        lambda c: [f"spectral_contrast_{i}" for i in range(1, CONTRAST_BANDS + 2)],
        _spectral("spectral_contrast"),
    ),
    "tonnetz": AudioFeature(lambda c: [f"tonnetz_{n}" for n in TONNETZ_NAMES], _tonnetz),
}


class AudioFeaturizer:
    """``(N,)`` mono waveform at ``cfg.sample_rate`` -> ``(T, dim)`` float32 frame features, finite.

    ``feature_names``/``dim`` come from the config alone (known before any audio is seen).
    Waveforms longer than ``chunk_seconds`` are processed chunk by chunk (same result, memory
    bounded by the chunk length); ``chunk_seconds=None`` processes every waveform at once.
    """

    def __init__(self, cfg: AudioConfig, *, chunk_seconds: float | None = CHUNK_SECONDS):
        unknown = [f for f in cfg.features if f not in FEATURES]
        if unknown:
            raise ConfigError(f"unknown audio feature(s) {unknown}; known: {sorted(FEATURES)}")
        if not cfg.features:
            raise ConfigError("audio.features is empty; list at least one feature")
        if len(set(cfg.features)) != len(cfg.features):
            raise ConfigError(f"audio.features lists a feature twice: {cfg.features}")
        for key in ("sample_rate", "hop_length", "n_fft", "n_mfcc", "n_chroma"):
            if int(getattr(cfg, key)) <= 0:
                raise ConfigError(f"audio.{key} must be > 0, got {getattr(cfg, key)}")
        if chunk_seconds is not None and not chunk_seconds > 0:
            raise ConfigError(f"audio chunk length must be > 0 seconds, got {chunk_seconds}")
        self.cfg = cfg
        self.chunk_seconds = chunk_seconds
        self.sample_rate = int(cfg.sample_rate)
        self.feature_names: list[str] = [n for f in cfg.features for n in FEATURES[f].names(cfg)]
        self.dim = len(self.feature_names)

    def frames(self, n_samples: int) -> int:
        """Number of frames T for a waveform of ``n_samples`` (centred framing)."""
        return 1 + n_samples // self.cfg.hop_length

    def warm_up(self) -> None:
        """Run the features once on a short test signal (loads/compiles librosa's numba kernels),
        so later calls, timings and worker processes start warm."""
        n = int(self.sample_rate * WARMUP_SECONDS)
        noise = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.1  # (N,)
        self(noise)

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        """(N,) waveform at ``sample_rate`` -> (T, dim) float32."""
        with _first_use_guard(tuple(self.cfg.features)), warnings.catch_warnings():
            for pattern in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
            return self._compute(wave)

    def _compute(self, wave: np.ndarray) -> np.ndarray:
        y = np.ascontiguousarray(np.asarray(wave, dtype=np.float32).reshape(-1))  # (N,)
        if y.size == 0:
            raise ExtractionError("audio is empty (0 samples)")
        if not np.isfinite(y).all():
            y = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
        plan = None
        if self.chunk_seconds is not None:
            plan = ChunkPlan(y, self.cfg, self.chunk_seconds)
            if self.frames(y.size) <= plan.chunk_frames(self.cfg.hop_length):
                plan = None  # a single chunk: the whole-signal computation
        current = [self.cfg.features[0]]  # the feature being computed, for the error message
        try:
            if plan is None:
                signal = Signal(y, self.cfg)
                blocks = []
                for name in self.cfg.features:
                    current[0] = name
                    block = np.asarray(FEATURES[name].compute(signal), dtype=np.float32)  # (d, T)
                    blocks.append(block)
            else:
                blocks = self._compute_chunked(plan, current)
        except Exception as e:  # librosa ParameterError etc. on odd input
            raise ExtractionError(f"audio feature {current[0]!r} failed on {y.size} samples: {one_line(e)}") from e
        t = min(b.shape[1] for b in blocks)
        out = np.concatenate([b[:, :t] for b in blocks], axis=0).T  # (T, dim)
        if not np.isfinite(out).all():  # silence guard: never hand NaN/inf to the model
            log.debug("non-finite audio features replaced by 0")
            out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _compute_chunked(self, plan: ChunkPlan, current: list[str]) -> list[np.ndarray]:
        """One (d, T) block per feature, computed chunk by chunk; ``current[0]`` names the
        feature being computed."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.cfg.features}
        chunks = list(plan.chunks(self.cfg.hop_length))
        log.debug("audio features in %d chunks of %g s", len(chunks), plan.chunk_seconds)
        with reuse_cqt_filters():
            for frames in chunks:
                signal = Signal(plan.y, self.cfg, plan, frames)
                for name in self.cfg.features:
                    current[0] = name
                    block = np.asarray(FEATURES[name].compute(signal), dtype=np.float32)  # (d', t)
                    parts[name].append(block)
        blocks = []
        for name in self.cfg.features:
            current[0] = name
            block = np.concatenate(parts.pop(name), axis=1)  # (d', T)
            finish = FEATURES[name].finish
            if finish is not None:
                block = np.asarray(finish(block, self.cfg), dtype=np.float32)  # (d, T)
            blocks.append(block)
        return blocks
