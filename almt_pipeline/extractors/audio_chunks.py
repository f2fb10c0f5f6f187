"""The waveform that audio features are computed on, whole or chunk by chunk.

A ``Signal`` holds one waveform and the intermediate results features share (the magnitude STFT,
computed once; chroma_cqt, computed once and shared with tonnetz). Without a plan it stands for
the whole waveform and features call librosa on it directly.

Long waveforms are processed in chunks so memory does not grow with clip length. A
``ChunkPlan`` splits the waveform into chunks of ``chunk_seconds`` and a ``Signal`` with a plan
stands for one chunk: each feature computes on a segment of the waveform with enough real signal
on both sides (half an FFT window for the STFT features, the longest constant-Q filter plus
resampling slack for the CQT ones) and is cropped to the chunk's own frames, so the result
matches the whole-waveform computation: only the true start and end of the signal get librosa's
padding. The tuning estimates librosa takes over the whole signal (behind chroma_cqt,
chroma_cens, tonnetz and chroma_stft) are computed by the plan over all chunks: a first pass
collects the spectral peaks. ``reuse_cqt_filters`` lets the chunks share librosa's CQT filter
bases instead of building them once per chunk.

librosa is imported inside the functions that use it, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..config import AudioConfig

CQT_BINS_PER_CHROMA = 3  # librosa's chroma_cqt default: 36 bins per octave for 12 chroma
# librosa defaults that the chunked path has to reproduce.
TUNING_N_FFT = 2048  # estimate_tuning -> piptrack window inside the CQT (hop n_fft // 4)
TUNING_RESOLUTION = 0.01  # estimate_tuning resolution (fractions of a bin)
CQT_OCTAVES = 7  # chroma_cqt n_octaves, starting at C1
# Context for the CQT beyond its longest filter (1.6 s at C1 with 36 bins per octave): the
# octave-by-octave 2:1 resampling filters (soxr) also reach across the chunk edge.
CQT_RESAMPLE_SLACK_SECONDS = 0.25

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


# (basis, n_fft, lengths) as librosa's filter builder returns them; the basis may be a sparse matrix
_Filters = tuple[Any, int, np.ndarray]


class _MemoFilters:
    def __init__(self, fn: Callable[..., _Filters]):
        self.fn = fn
        self.memo: dict[object, _Filters] = {}

    def __call__(self, *args: object, **kwargs: object) -> _Filters:
        try:
            key = _freeze((args, sorted(kwargs.items())))
        except TypeError:
            return self.fn(*args, **kwargs)
        if key not in self.memo:
            self.memo[key] = self.fn(*args, **kwargs)
        basis, n_fft, lengths = self.memo[key]
        return basis.copy(), n_fft, np.copy(lengths)


@contextlib.contextmanager
def reuse_cqt_filters() -> Iterator[None]:
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


class ChunkPlan:
    """Chunking of one long waveform, plus the whole-signal quantities every chunk needs."""

    def __init__(self, y: np.ndarray, cfg: AudioConfig, chunk_seconds: float):
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
            n_bins=CQT_OCTAVES * bins_per_octave, fmin=float(librosa.note_to_hz("C1")),
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
            power = Signal(self.y, self.cfg, self, frames).mag ** 2  # (1 + n_fft/2, t)
            yield librosa.piptrack(S=power, sr=self.sr)


class Signal:
    """One waveform plus lazily computed intermediate results shared between features.

    Without a plan, features see the whole waveform (librosa called directly). With a plan and
    ``frames=(f0, f1)``, features return only those frames, each computed on a segment of the
    waveform with enough real context (``segment``) and cropped.
    """

    def __init__(self, y: np.ndarray, cfg: AudioConfig, plan: ChunkPlan | None = None,
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

    def cqt_kwargs(self, n_chroma: int, extra_context: int = 0) -> tuple[dict[str, Any], slice]:
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
