"""Acoustic frame features with librosa.

The default recipe is the CH-SIMS 33-d one: at 22050 Hz, hop 512, n_fft 2048, per frame
zero-crossing rate (1) + HTK MFCC (20) + chroma_cqt (12), stacked in that order as (T, 33).
Other librosa features can be listed in ``AudioConfig.features``; every feature is framed with
the same hop (centred frames), so all give the same T. The magnitude STFT is computed once and
shared by the features that use it; chroma_cqt is computed once and shared with tonnetz.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from ..errors import ConfigError, ExtractionError

if TYPE_CHECKING:
    from ..config import AudioConfig

log = logging.getLogger(__name__)

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
CQT_BINS_PER_CHROMA = 3  # librosa's chroma_cqt default: 36 bins per octave for 12 chroma
CONTRAST_BANDS = 6  # librosa.feature.spectral_contrast default n_bands (gives n_bands + 1 rows)
TONNETZ_NAMES = ("fifth_x", "fifth_y", "minor_x", "minor_y", "major_x", "major_y")
WARMUP_SECONDS = 1.0  # length of the test signal ``warm_up`` runs through the features
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
        except ImportError:  # not POSIX: no cross-process lock
            fcntl = None
        with contextlib.ExitStack() as stack:
            if fcntl is not None:
                try:
                    fd = stack.enter_context(open(_LOCK_FILE, "a"))
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    stack.callback(fcntl.flock, fd, fcntl.LOCK_UN)
                except OSError as e:  # unwritable temp dir: go on without the lock
                    log.debug("no numba warm-up lock (%s)", e)
            yield
        _WARMED.add(key)


class _Signal:
    """One waveform plus lazily computed intermediate results shared between features."""

    def __init__(self, y: np.ndarray, cfg: "AudioConfig"):
        self.y, self.cfg, self.sr = y, cfg, cfg.sample_rate
        self._mag: np.ndarray | None = None
        self._chroma_cqt: np.ndarray | None = None

    @property
    def mag(self) -> np.ndarray:
        """|STFT| (1 + n_fft/2, T), computed once; identical to what librosa computes from ``y``."""
        if self._mag is None:
            import librosa

            self._mag = np.abs(librosa.stft(self.y, n_fft=self.cfg.n_fft, hop_length=self.cfg.hop_length))
        return self._mag

    def chroma_cqt(self, n_chroma: int) -> np.ndarray:
        import librosa

        if n_chroma != self.cfg.n_chroma or self._chroma_cqt is None:
            chroma = librosa.feature.chroma_cqt(
                y=self.y, sr=self.sr, hop_length=self.cfg.hop_length, n_chroma=n_chroma,
                bins_per_octave=CQT_BINS_PER_CHROMA * n_chroma,
            )  # (n_chroma, T)
            if n_chroma != self.cfg.n_chroma:
                return chroma
            self._chroma_cqt = chroma
        return self._chroma_cqt


def _zcr(s: _Signal) -> np.ndarray:
    import librosa

    return librosa.feature.zero_crossing_rate(s.y, frame_length=s.cfg.n_fft, hop_length=s.cfg.hop_length)


def _rms(s: _Signal) -> np.ndarray:
    import librosa

    return librosa.feature.rms(y=s.y, frame_length=s.cfg.n_fft, hop_length=s.cfg.hop_length)


def _mfcc(s: _Signal) -> np.ndarray:
    import librosa

    # Same as librosa.feature.mfcc(y=..., htk=True): log-power mel spectrogram -> DCT-II (ortho).
    mel = librosa.feature.melspectrogram(S=s.mag**2, sr=s.sr, htk=True)  # (n_mels, T)
    return librosa.feature.mfcc(S=librosa.power_to_db(mel), sr=s.sr, n_mfcc=s.cfg.n_mfcc)


def _chroma_cqt(s: _Signal) -> np.ndarray:
    return s.chroma_cqt(s.cfg.n_chroma)


def _chroma_stft(s: _Signal) -> np.ndarray:
    import librosa

    return librosa.feature.chroma_stft(S=s.mag**2, sr=s.sr, n_chroma=s.cfg.n_chroma)


def _chroma_cens(s: _Signal) -> np.ndarray:
    import librosa

    return librosa.feature.chroma_cens(
        y=s.y, sr=s.sr, hop_length=s.cfg.hop_length, n_chroma=s.cfg.n_chroma,
        bins_per_octave=CQT_BINS_PER_CHROMA * s.cfg.n_chroma,
    )


def _spectral(name: str) -> Callable[[_Signal], np.ndarray]:
    def compute(s: _Signal) -> np.ndarray:
        import librosa

        fn = getattr(librosa.feature, name)
        if name == "spectral_flatness":
            return fn(S=s.mag)
        if name == "spectral_contrast":
            return fn(S=s.mag, sr=s.sr, n_bands=CONTRAST_BANDS)
        return fn(S=s.mag, sr=s.sr)

    return compute


def _tonnetz(s: _Signal) -> np.ndarray:
    import librosa

    return librosa.feature.tonnetz(chroma=s.chroma_cqt(len(PITCH_CLASSES)))


def _chroma_names(feature: str, n: int) -> list[str]:
    if n == len(PITCH_CLASSES):
        return [f"{feature}_{p}" for p in PITCH_CLASSES]
    return [f"{feature}_{i:02d}" for i in range(1, n + 1)]


@dataclass(frozen=True)
class AudioFeature:
    names: Callable[["AudioConfig"], list[str]]  # row names, known from the config alone
    compute: Callable[[_Signal], np.ndarray]  # -> (d, T)


FEATURES: dict[str, AudioFeature] = {
    "zcr": AudioFeature(lambda c: ["zcr"], _zcr),
    "rms": AudioFeature(lambda c: ["rms"], _rms),
    "mfcc": AudioFeature(lambda c: [f"mfcc_{i:02d}" for i in range(1, c.n_mfcc + 1)], _mfcc),
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
    """

    def __init__(self, cfg: "AudioConfig"):
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
        self.cfg = cfg
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
        signal = _Signal(y, self.cfg)
        blocks = []
        try:
            for name in self.cfg.features:
                block = np.asarray(FEATURES[name].compute(signal), dtype=np.float32)  # (d, T)
                blocks.append(block)
        except Exception as e:  # librosa ParameterError etc. on odd input
            raise ExtractionError(f"audio feature {name!r} failed on {y.size} samples: {e}") from e
        t = min(b.shape[1] for b in blocks)
        out = np.concatenate([b[:, :t] for b in blocks], axis=0).T  # (T, dim)
        if not np.isfinite(out).all():  # silence guard: never hand NaN/inf to the model
            log.debug("non-finite audio features replaced by 0")
            out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        return np.ascontiguousarray(out, dtype=np.float32)
