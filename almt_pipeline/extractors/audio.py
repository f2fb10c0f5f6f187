"""Acoustic frame features with librosa.

The default recipe is the CH-SIMS 33-d one: at 22050 Hz, hop 512, n_fft 2048, per frame
zero-crossing rate (1) + HTK MFCC (20) + chroma_cqt (12), stacked in that order as (T, 33).
Other librosa features can be listed in ``AudioConfig.features``; every feature is framed with
the same hop (centred frames), so all give the same T. The magnitude STFT is computed once and
shared by the features that use it; chroma_cqt is computed once and shared with tonnetz.

Long waveforms are processed in chunks of ``chunk_seconds`` so memory does not grow with clip
length. Each chunk is computed on a segment of the waveform with enough real signal on both sides
(half an FFT window for the STFT features, the longest constant-Q filter plus resampling slack for
the CQT ones) and cropped to its own frames, so the result matches the whole-waveform computation:
only the true start and end of the signal get librosa's padding. The few quantities librosa takes
over the whole signal are computed over all chunks: the tuning estimate behind chroma_cqt,
chroma_cens, tonnetz and chroma_stft (a first pass collects the spectral peaks) and the
``top_db`` floor of the MFCC's log-mel spectrogram (log-mel frames are kept, 128 rows, and the
MFCC taken at the end). A waveform no longer than one chunk takes the plain whole-signal path.
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
CHUNK_SECONDS = 30.0  # audio per chunk for long waveforms (memory per chunk ~1.3 MB per second)
# librosa defaults that the chunked path has to reproduce.
TUNING_N_FFT = 2048  # estimate_tuning -> piptrack window inside the CQT (hop n_fft // 4)
TUNING_RESOLUTION = 0.01  # estimate_tuning resolution (fractions of a bin)
CQT_OCTAVES = 7  # chroma_cqt n_octaves, starting at C1
MFCC_TOP_DB = 80.0  # power_to_db's top_db: floor relative to the loudest log-mel value of the signal
CENS_SMOOTH_FRAMES = 41 + 2  # chroma_cens win_len_smooth (41) -> smoothing window of 43 frames
# Context for the CQT beyond its longest filter (1.6 s at C1 with 36 bins per octave): the
# octave-by-octave 2:1 resampling filters (soxr) also reach across the chunk edge.
CQT_RESAMPLE_SLACK_SECONDS = 0.25
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


# librosa.core.constantq's private builder of the CQT filter bases. In the chunked path it is
# wrapped (while chunks are computed) so the bases are built once instead of once per chunk; the
# wrapper hands out copies of the same arrays (vqt rescales them in place). Without the hook (other
# librosa versions) chunks simply rebuild the bases.
_CQT_FILTER_HOOK = "__vqt_filter_fft"
_HOOK_LOCK = threading.Lock()
_hook_users = 0


def _freeze(value: object) -> object:
    """A hashable key for an argument (arrays by content)."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (tuple, list)):
        return tuple(_freeze(v) for v in value)
    hash(value)  # TypeError for anything else unhashable
    return value


class _MemoFilters:
    def __init__(self, fn: Callable):
        self.fn = fn
        self.memo: dict[object, tuple] = {}

    def __call__(self, *args, **kwargs):
        try:
            key = _freeze((args, sorted(kwargs.items())))
        except TypeError:
            return self.fn(*args, **kwargs)
        if key not in self.memo:
            self.memo[key] = self.fn(*args, **kwargs)
        basis, n_fft, lengths = self.memo[key]
        return basis.copy(), n_fft, np.copy(lengths)


@contextlib.contextmanager
def _reuse_cqt_filters() -> Iterator[None]:
    """Within the block, librosa's CQT filter bases are built once per parameter set."""
    global _hook_users
    from librosa.core import constantq

    with _HOOK_LOCK:
        installed = callable(getattr(constantq, _CQT_FILTER_HOOK, None))
        if installed:
            if _hook_users == 0:
                setattr(constantq, _CQT_FILTER_HOOK, _MemoFilters(getattr(constantq, _CQT_FILTER_HOOK)))
            _hook_users += 1
    try:
        yield
    finally:
        if installed:
            with _HOOK_LOCK:
                _hook_users -= 1
                if _hook_users == 0:
                    setattr(constantq, _CQT_FILTER_HOOK, getattr(constantq, _CQT_FILTER_HOOK).fn)


def _segment(n: int, hop: int, f0: int, f1: int, context: int) -> tuple[int, int, slice]:
    """Samples ``[s0, s1)`` of a waveform of ``n`` samples whose centred framing (``hop``) holds
    frames ``[f0, f1)`` with ``context`` frames of real signal beyond them on each side (or the true
    signal edge), and which of the segment's frames are ``[f0, f1)``."""
    s0 = max(0, f0 - context) * hop
    s1 = min(n, (f1 + context) * hop)
    k0 = f0 - s0 // hop
    return s0, s1, slice(k0, k0 + f1 - f0)


def _ceil_div(a: float, b: int) -> int:
    return int(-(-a // b))


class _Plan:
    """Chunking of one long waveform, plus the whole-signal quantities every chunk needs."""

    def __init__(self, y: np.ndarray, cfg: "AudioConfig", chunk_seconds: float):
        self.y, self.cfg, self.sr = y, cfg, int(cfg.sample_rate)
        self.chunk_seconds = chunk_seconds
        self.stft_context = _ceil_div(cfg.n_fft // 2, cfg.hop_length)  # frames
        self._cqt_peaks: tuple[np.ndarray, np.ndarray] | None = None
        self._tunings: dict[tuple[str, int], float] = {}

    def chunk_frames(self, hop: int) -> int:
        return max(1, int(round(self.chunk_seconds * self.sr / hop)))

    def chunks(self, hop: int) -> Iterator[tuple[int, int]]:
        """Own frames ``[f0, f1)`` of each chunk, for centred framing with ``hop``."""
        n_frames = 1 + self.y.size // hop
        step = self.chunk_frames(hop)
        for f0 in range(0, n_frames, step):
            yield f0, min(n_frames, f0 + step)

    def cqt_context(self, bins_per_octave: int) -> int:
        """Frames of real signal each side of a chunk so that its CQT frames match: the longest
        filter (at C1; a full filter length, since librosa frames each octave with an FFT of up
        to twice the filter) plus slack for the resampling filters."""
        import librosa

        freqs = librosa.cqt_frequencies(
            n_bins=CQT_OCTAVES * bins_per_octave, fmin=librosa.note_to_hz("C1"),
            bins_per_octave=bins_per_octave,
        )
        lengths, _ = librosa.filters.wavelet_lengths(freqs=freqs, sr=self.sr)
        slack = CQT_RESAMPLE_SLACK_SECONDS * self.sr
        return _ceil_div(float(np.max(lengths)) + slack, self.cfg.hop_length)

    def _peaks(self, spectra: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Pitches and magnitudes of all piptrack peaks (pitch > 0) over the whole signal."""
        pitches, mags = [], []
        for pitch, mag in spectra:  # (F, t) each
            keep = pitch > 0
            pitches.append(pitch[keep])
            mags.append(mag[keep])
        return np.concatenate(pitches), np.concatenate(mags)

    def _tuning(self, peaks: tuple[np.ndarray, np.ndarray], bins_per_octave: int) -> float:
        """librosa.estimate_tuning from the peaks of the whole signal (same median threshold)."""
        import librosa

        pitch, mag = peaks
        threshold = np.median(mag) if mag.size else 0.0
        return librosa.pitch_tuning(
            pitch[mag >= threshold], resolution=TUNING_RESOLUTION, bins_per_octave=bins_per_octave
        )

    def cqt_tuning(self, bins_per_octave: int) -> float:
        """The tuning ``librosa.cqt(y)`` estimates for the whole waveform."""
        key = ("cqt", bins_per_octave)
        if key not in self._tunings:
            if self._cqt_peaks is None:
                self._cqt_peaks = self._peaks(self._cqt_spectra())
            self._tunings[key] = self._tuning(self._cqt_peaks, bins_per_octave)
        return self._tunings[key]

    def _cqt_spectra(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import librosa

        hop = TUNING_N_FFT // 4
        context = _ceil_div(TUNING_N_FFT // 2, hop)
        for f0, f1 in self.chunks(hop):
            s0, s1, keep = _segment(self.y.size, hop, f0, f1, context)
            pitch, mag = librosa.piptrack(y=self.y[s0:s1], sr=self.sr, n_fft=TUNING_N_FFT)
            yield pitch[:, keep], mag[:, keep]

    def stft_tuning(self, bins_per_octave: int) -> float:
        """The tuning ``librosa.feature.chroma_stft(S=|STFT|**2)`` estimates for the whole waveform."""
        key = ("stft", bins_per_octave)
        if key not in self._tunings:
            self._tunings[key] = self._tuning(self._peaks(self._stft_spectra()), bins_per_octave)
        return self._tunings[key]

    def _stft_spectra(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import librosa

        for frames in self.chunks(self.cfg.hop_length):
            power = _Signal(self.y, self.cfg, self, frames).mag ** 2  # (1 + n_fft/2, t)
            yield librosa.piptrack(S=power, sr=self.sr)


class _Signal:
    """One waveform plus lazily computed intermediate results shared between features.

    Without a plan, features see the whole waveform (librosa called directly). With a plan and
    ``frames=(f0, f1)``, features return only those frames, each computed on a segment of the
    waveform with enough real context (``segment``) and cropped.
    """

    def __init__(self, y: np.ndarray, cfg: "AudioConfig", plan: _Plan | None = None,
                 frames: tuple[int, int] | None = None):
        self.y, self.cfg, self.sr = y, cfg, cfg.sample_rate
        self.plan, self.frames = plan, frames
        self._mag: np.ndarray | None = None
        self._chroma_cqt: np.ndarray | None = None

    @property
    def chunked(self) -> bool:
        return self.plan is not None

    def segment(self, context: int) -> tuple[np.ndarray, slice]:
        """The waveform to compute on and which of its frames to keep (all when not chunked)."""
        if self.plan is None or self.frames is None:
            return self.y, slice(None)
        s0, s1, keep = _segment(self.y.size, self.cfg.hop_length, *self.frames, context)
        return self.y[s0:s1], keep

    def stft_segment(self) -> tuple[np.ndarray, slice]:
        return self.segment(self.plan.stft_context if self.plan else 0)

    @property
    def mag(self) -> np.ndarray:
        """|STFT| (1 + n_fft/2, T), computed once; identical to what librosa computes from ``y``."""
        if self._mag is None:
            import librosa

            y, keep = self.stft_segment()
            stft = librosa.stft(y, n_fft=self.cfg.n_fft, hop_length=self.cfg.hop_length)
            self._mag = np.abs(stft[:, keep])
        return self._mag

    def cqt_kwargs(self, n_chroma: int, extra_context: int = 0) -> tuple[dict, slice]:
        """Arguments of chroma_cqt/chroma_cens (waveform, and the whole signal's tuning when
        chunked) and which output frames to keep."""
        bins_per_octave = CQT_BINS_PER_CHROMA * n_chroma
        kwargs = dict(sr=self.sr, hop_length=self.cfg.hop_length, n_chroma=n_chroma,
                      bins_per_octave=bins_per_octave)
        if self.plan is None:
            return dict(kwargs, y=self.y), slice(None)
        y, keep = self.segment(self.plan.cqt_context(bins_per_octave) + extra_context)
        return dict(kwargs, y=y, tuning=self.plan.cqt_tuning(bins_per_octave)), keep

    def chroma_cqt(self, n_chroma: int) -> np.ndarray:
        import librosa

        if n_chroma != self.cfg.n_chroma or self._chroma_cqt is None:
            kwargs, keep = self.cqt_kwargs(n_chroma)
            chroma = librosa.feature.chroma_cqt(**kwargs)[:, keep]  # (n_chroma, T)
            if n_chroma != self.cfg.n_chroma:
                return chroma
            self._chroma_cqt = chroma
        return self._chroma_cqt


def _zcr(s: _Signal) -> np.ndarray:
    import librosa

    y, keep = s.stft_segment()
    zcr = librosa.feature.zero_crossing_rate(y, frame_length=s.cfg.n_fft, hop_length=s.cfg.hop_length)
    return zcr[:, keep]


def _rms(s: _Signal) -> np.ndarray:
    import librosa

    y, keep = s.stft_segment()
    return librosa.feature.rms(y=y, frame_length=s.cfg.n_fft, hop_length=s.cfg.hop_length)[:, keep]


def _mfcc(s: _Signal) -> np.ndarray:
    import librosa

    # Same as librosa.feature.mfcc(y=..., htk=True): log-power mel spectrogram -> DCT-II (ortho).
    mel = librosa.feature.melspectrogram(S=s.mag**2, sr=s.sr, htk=True)  # (n_mels, T)
    if s.chunked:  # the top_db floor needs the whole signal's maximum: see _mfcc_finish
        return librosa.power_to_db(mel, top_db=None)  # (n_mels, t)
    return librosa.feature.mfcc(S=librosa.power_to_db(mel), sr=s.sr, n_mfcc=s.cfg.n_mfcc)


def _mfcc_finish(log_mel: np.ndarray, cfg: "AudioConfig") -> np.ndarray:
    """(n_mels, T) log-mel of all chunks -> (n_mfcc, T), as power_to_db(top_db) + mfcc would give."""
    import librosa

    log_mel = np.maximum(log_mel, log_mel.max() - MFCC_TOP_DB)
    return librosa.feature.mfcc(S=log_mel, sr=cfg.sample_rate, n_mfcc=cfg.n_mfcc)


def _chroma_cqt(s: _Signal) -> np.ndarray:
    return s.chroma_cqt(s.cfg.n_chroma)


def _chroma_stft(s: _Signal) -> np.ndarray:
    import librosa

    if s.chunked:
        tuning = s.plan.stft_tuning(s.cfg.n_chroma)
        return librosa.feature.chroma_stft(S=s.mag**2, sr=s.sr, n_chroma=s.cfg.n_chroma, tuning=tuning)
    return librosa.feature.chroma_stft(S=s.mag**2, sr=s.sr, n_chroma=s.cfg.n_chroma)


def _chroma_cens(s: _Signal) -> np.ndarray:
    import librosa

    # The temporal smoothing reaches half its window beyond each frame.
    kwargs, keep = s.cqt_kwargs(s.cfg.n_chroma, extra_context=CENS_SMOOTH_FRAMES // 2 + 1)
    return librosa.feature.chroma_cens(**kwargs)[:, keep]


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
    compute: Callable[[_Signal], np.ndarray]  # -> (d, T); in chunked mode the chunk's (d', t)
    # chunked mode only: all chunks' blocks concatenated (d', T) -> (d, T)
    finish: Callable[[np.ndarray, "AudioConfig"], np.ndarray] | None = None


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

    def __init__(self, cfg: "AudioConfig", *, chunk_seconds: float | None = CHUNK_SECONDS):
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
            plan = _Plan(y, self.cfg, self.chunk_seconds)
            if self.frames(y.size) <= plan.chunk_frames(self.cfg.hop_length):
                plan = None  # a single chunk: the whole-signal computation
        current = [self.cfg.features[0]]  # the feature being computed, for the error message
        try:
            if plan is None:
                signal = _Signal(y, self.cfg)
                blocks = []
                for name in self.cfg.features:
                    current[0] = name
                    block = np.asarray(FEATURES[name].compute(signal), dtype=np.float32)  # (d, T)
                    blocks.append(block)
            else:
                blocks = self._compute_chunked(plan, current)
        except Exception as e:  # librosa ParameterError etc. on odd input
            raise ExtractionError(f"audio feature {current[0]!r} failed on {y.size} samples: {e}") from e
        t = min(b.shape[1] for b in blocks)
        out = np.concatenate([b[:, :t] for b in blocks], axis=0).T  # (T, dim)
        if not np.isfinite(out).all():  # silence guard: never hand NaN/inf to the model
            log.debug("non-finite audio features replaced by 0")
            out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _compute_chunked(self, plan: _Plan, current: list[str]) -> list[np.ndarray]:
        """One (d, T) block per feature, computed chunk by chunk; ``current[0]`` names the
        feature being computed."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.cfg.features}
        chunks = list(plan.chunks(self.cfg.hop_length))
        log.debug("audio features in %d chunks of %g s", len(chunks), plan.chunk_seconds)
        with _reuse_cqt_filters():
            for frames in chunks:
                signal = _Signal(plan.y, self.cfg, plan, frames)
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
