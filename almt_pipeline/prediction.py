"""Sentiment of new clips with a trained checkpoint.

The checkpoint records how its training features were made (extractor settings and feature
names); prediction rebuilds exactly those extractors, so a clip is featurised the way the
training clips were. Models are loaded once per :class:`Predictor` and reused across clips.

Text is never cut: a transcript longer than the model's ``text_len`` tokens is scored in
consecutive windows of at most ``text_len`` tokens (cut between words, each window its own
``[CLS] ... [SEP]``); each window is given the stretch of the audio and video frames that matches
its share of the transcript's words (transcripts carry no word timings, so speech is taken to be
evenly spread over the clip), and the clip's score is the mean of the window scores weighted by
their token counts. A transcript that fits is one window: the clip is scored as a whole.

Speech recognition of a clip without a transcript starts in a background thread when the clip
does (in a batch, the next clip's too), so it runs while the clip's audio features are computed;
the ``asr`` timing is then the time the clip still had to wait for its transcript.

    from almt_pipeline import Predictor
    p = Predictor("runs/20260101-120000/checkpoint")
    print(p.predict("clip.mp4").score)
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from .config import Config, config_from_dict, config_to_dict
from .errors import AlmtError, CheckpointError
from .extractors.asr import Transcriber, TranscriptPrefetch, sidecar_paths
from .extractors.clip import ClipExtractor, ClipFailure, ClipResult, TranscriberLike, run_guarded
from .extractors.dataset import ClipSpec, list_plain_clips
from .extractors.text import TextFeaturizer, TextWindow
from .features import fit_length
from .files import atomic_write_csv, atomic_write_text
from .metrics import LABEL_RANGES, canonical_scale, sentiment_class
from .model.checkpoint import MAX_JSON_BYTES, LoadedCheckpoint, load_checkpoint
from .runs import find_latest_checkpoint
from .utils import one_line, resolve_device

log = logging.getLogger(__name__)

# Class names on each label scale (the Acc-7 / Acc-5 classes of the metrics).
MOSI_CLASSES = {
    -3: "strongly negative", -2: "negative", -1: "weakly negative", 0: "neutral",
    1: "weakly positive", 2: "positive", 3: "strongly positive",
}
SIMS_CLASSES = ("negative", "weakly negative", "neutral", "weakly positive", "positive")
POLARITY = ("negative", "neutral", "positive")
WINDOW_BATCH = 32  # windows scored per model call
SHOWN_WINDOWS = 6  # windows listed in the human-readable output


@dataclass
class Window:
    """One scored stretch of a clip: seconds from the start, transcript tokens, score."""

    start: float
    end: float
    tokens: int  # transcript tokens (without [CLS] and [SEP])
    score: float


@dataclass
class Prediction:
    """The result for one clip. ``error`` is set (and the score is NaN) when the clip failed."""

    path: str
    score: float = math.nan
    polarity: str = ""  # negative | neutral | positive
    label_class: str = ""  # e.g. "+1 weakly positive" (7 classes on [-3, 3], 5 on [-1, 1])
    label_scale: str = ""
    transcript: str = ""
    transcript_source: str = ""  # sidecar | asr | given
    face_fraction: float = math.nan
    duration: float = math.nan
    text_tokens: int | None = None  # transcript tokens (without [CLS] and [SEP])
    text_len: int | None = None  # the model's text length: most tokens per window, [CLS]/[SEP] included
    windows: list[Window] = field(default_factory=list)  # score = token-weighted mean of theirs
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("score", "face_fraction", "duration"):
            if isinstance(d[k], float) and math.isnan(d[k]):
                d[k] = None
        d["windows"] = [{"start": round(w.start, 3), "end": round(w.end, 3), "tokens": w.tokens,
                         "score": w.score} for w in self.windows]
        d["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        return d


def polarity(score: float, scale: str) -> str:
    """Negative / neutral / positive: the 3-class bins of the metrics (Mult_acc_3)."""
    k = int(sentiment_class(score, scale, 3)[0])
    return POLARITY[k + 1 if scale != "sims" else k]


def label_class(score: float, scale: str) -> str:
    """The class of ``score`` on the training data's scale: 7 classes on [-3, 3], 5 on [-1, 1]."""
    if scale == "sims":
        return SIMS_CLASSES[int(sentiment_class(score, scale, 5)[0])]
    k = int(sentiment_class(score, scale, 7)[0])
    return f"{k:+d} {MOSI_CLASSES[k]}" if k else f"0 {MOSI_CLASSES[0]}"


class Predictor:
    """A checkpoint plus the extractors its features need, loaded once."""

    def __init__(self, checkpoint: str | Path | None = None, device: str = "auto",
                 preload_asr: bool = False, transcriber: Future[TranscriberLike] | None = None):
        """``preload_asr`` starts loading the speech recogniser in the background at once (for
        clips without transcripts); otherwise it loads on the first clip that needs it.
        ``transcriber`` is one already loading (see :func:`start_loading_asr`)."""
        ckpt_dir = Path(checkpoint) if checkpoint is not None else find_latest_checkpoint()
        if transcriber is None and preload_asr:
            transcriber = start_loading_asr(ckpt_dir)
        self.device = resolve_device(device)
        t = time.perf_counter()
        self.checkpoint = load_checkpoint(ckpt_dir, device=self.device)
        self.path = ckpt_dir
        self.cfg = _extraction_config(self.checkpoint, ckpt_dir)
        self.label_scale = self.checkpoint.label_scale
        # token ids only: the checkpoint runs its own fine-tuned text model
        self.text = TextFeaturizer(str(ckpt_dir), self.cfg.model.text_len, tokenizer=self.checkpoint.tokenizer)
        ex = self.cfg.extract
        # the recogniser ClipExtractor would load on first need, unless one is already loading
        self.asr = TranscriptPrefetch(transcriber if transcriber is not None else
                                      partial(Transcriber, ex.asr_model, language=ex.language, device="cpu"))
        self.extractor = _make_extractor(self.cfg, self.checkpoint, ckpt_dir, self.text, transcriber=self.asr)
        self.load_seconds = time.perf_counter() - t
        log.debug("loaded %s in %.2f s", ckpt_dir, self.load_seconds)

    def predict(self, clip: str | Path, transcript: str | None = None,
                transcript_source: str | None = None) -> Prediction:
        """Score one clip; raises :class:`AlmtError` for bad media (see :meth:`predict_many`).

        Without ``transcript``: the clip's sidecar file, else speech recognition. A transcript
        longer than ``text_len`` tokens is scored in windows (see the module's description).
        """
        return self.predict_with_features(clip, transcript, transcript_source)[0]

    def predict_with_features(self, clip: str | Path, transcript: str | None = None,
                              transcript_source: str | None = None) -> tuple[Prediction, ClipResult]:
        """:meth:`predict`, and the clip's features it scored (see :meth:`model_inputs`)."""
        t0 = time.perf_counter()
        if transcript is not None and transcript_source is None:
            transcript_source = "given"
        result = self._extract(clip, transcript, transcript_source)
        t = time.perf_counter()
        text_windows = self._text_windows(result)
        scores = self.score_windows(text_windows, result.audio, result.vision)
        windows = [Window(w.start * result.duration, w.end * result.duration, w.tokens, s)
                   for w, s in zip(text_windows, scores, strict=True)]
        value = weighted_score(windows)
        timings = dict(result.timings)
        timings["model"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        return Prediction(
            path=str(clip), score=value, polarity=polarity(value, self.label_scale),
            label_class=label_class(value, self.label_scale), label_scale=self.label_scale,
            transcript=result.raw_text, transcript_source=result.transcript_source,
            face_fraction=result.face_fraction, duration=result.duration,
            text_tokens=sum(w.tokens for w in windows), text_len=self.cfg.model.text_len,
            windows=windows, timings=timings,
        ), result

    def inputs(self, clip: str | Path, transcript: str | None = None) -> tuple[
            ClipResult, list[TextWindow], tuple[torch.Tensor, ...]]:
        """What :meth:`predict` feeds the model for ``clip``: its features, its text windows (one
        when the transcript fits) and the model's inputs, one row per window, on the predictor's
        device: text_bert (W, 3, L), audio (W, T_a, d_a), vision (W, T_v, d_v), audio and vision
        lengths (W,). Row i scores window i; :func:`weighted_score` of those is the clip's score."""
        result = self._extract(clip, transcript, None if transcript is None else "given")
        return (result, *self.model_inputs(result))

    def _extract(self, clip: str | Path, transcript: str | None, transcript_source: str | None) -> ClipResult:
        """The extractor's features of ``clip``, its speech recognition started ahead."""
        self._start_asr(clip, transcript)
        try:
            return self.extractor(clip, transcript=transcript, transcript_source=transcript_source)
        finally:
            self.asr.discard(clip)

    def _start_asr(self, clip: str | Path, transcript: str | None) -> None:
        """Start recognising the clip's speech in the background when it has no transcript (given
        or in a sidecar file): it runs while the extractor computes the audio features."""
        if transcript is None and not any(p.is_file() for p in sidecar_paths(clip)):
            self.asr.submit(clip)

    def model_inputs(self, result: ClipResult) -> tuple[list[TextWindow], tuple[torch.Tensor, ...]]:
        """A clip's text windows and the model's inputs for them, one row per window (see :meth:`inputs`)."""
        windows = self._text_windows(result)
        return windows, self._window_inputs(windows, result.audio, result.vision)

    def _text_windows(self, result: ClipResult) -> list[TextWindow]:
        if result.text_truncated:
            return self.text.windows(result.raw_text)
        # the whole transcript fits: the clip as a whole, as `almt extract` lays it out
        n = int(result.text_bert[1].sum()) - 2  # attention mask minus [CLS] and [SEP]
        return [TextWindow(result.text_bert, max(n, 0), 0.0, 1.0)]

    def _window_inputs(self, windows: Sequence[TextWindow], audio: np.ndarray,
                       vision: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The model's inputs for windows with their stretch of the audio (T_a, d_a) and video
        (T_v, d_v) frames, pooled or padded to the model's lengths."""
        m, dev = self.cfg.model, self.device
        a = [fit_length(frame_span(audio, w.start, w.end), m.audio_len) for w in windows]
        v = [fit_length(frame_span(vision, w.start, w.end), m.vision_len) for w in windows]
        return (
            torch.from_numpy(np.stack([w.text_bert for w in windows])).to(dev),  # (B, 3, L)
            torch.from_numpy(np.stack([x for x, _ in a])).to(dev),  # (B, T_a, d_a)
            torch.from_numpy(np.stack([x for x, _ in v])).to(dev),  # (B, T_v, d_v)
            torch.tensor([n for _, n in a], device=dev),  # (B,)
            torch.tensor([n for _, n in v], device=dev),  # (B,)
        )

    def score_windows(self, windows: Sequence[TextWindow], audio: np.ndarray, vision: np.ndarray) -> list[float]:
        """The model's score for each window (see :meth:`_window_inputs`)."""
        scores: list[float] = []
        for first in range(0, len(windows), WINDOW_BATCH):
            scores += self.score_inputs(self._window_inputs(windows[first:first + WINDOW_BATCH], audio, vision))
        return scores

    def score_inputs(self, inputs: Sequence[torch.Tensor]) -> list[float]:
        """The model's score for each row of ``inputs`` (text_bert, audio, vision, audio and vision
        lengths, as :meth:`inputs` gives them), in one model call."""
        text_bert, a, v, a_len, v_len = (t.to(self.device) for t in inputs)
        with torch.inference_mode():
            out = self.checkpoint.model(text_bert, a, v, audio_lengths=a_len, vision_lengths=v_len)  # (B,)
        return [float(x) for x in out.reshape(-1).cpu()]

    def predict_many(self, clips: Iterable[str | Path | ClipSpec], quiet: bool = True) -> list[Prediction]:
        """Score several clips; a bad clip gives a Prediction with ``error`` set, the rest go on.

        A :class:`~.extractors.dataset.ClipSpec` brings its transcript (read once, when listed).
        """
        items = [(i.path, i.text, i.text_source) if isinstance(i, ClipSpec) else (Path(i), None, None)
                 for i in clips]
        out: list[Prediction] = []
        try:
            for k, (path, text, source) in enumerate(tqdm(items, unit="clip", disable=quiet or len(items) < 2,
                                                          desc="predict")):
                for ahead in items[k:k + 2]:  # this clip's speech recognition, then the next one's
                    self._start_asr(ahead[0], ahead[1])
                outcome = run_guarded(partial(self.predict, path, text, source), path)
                if isinstance(outcome, ClipFailure):
                    if outcome.traceback:
                        log.debug("unexpected failure on %s:\n%s", path, outcome.traceback)
                    outcome = Prediction(path=str(path), error=outcome.message)
                out.append(outcome)
        finally:
            self.asr.discard()  # an interrupted batch leaves no transcription running ahead
        return out


def frame_span(frames: np.ndarray, start: float, end: float) -> np.ndarray:
    """The frames (T, d) from fraction ``start`` to fraction ``end`` of the clip (at least one;
    neighbouring spans share the frame at their boundary)."""
    n = len(frames)
    lo = min(math.floor(start * n), max(n - 1, 0))
    hi = max(math.ceil(end * n), lo + 1)
    return frames[lo:hi]


def weighted_score(windows: Sequence[Window]) -> float:
    """The clip's score: the window scores' mean weighted by their token counts (plain mean when
    no window has a token)."""
    total = sum(w.tokens for w in windows)
    if total == 0:
        return sum(w.score for w in windows) / len(windows)
    return sum(w.score * w.tokens for w in windows) / total


def predict(clips: str | Path | Sequence[str | Path], checkpoint: str | Path | None = None,
            device: str = "auto") -> list[Prediction]:
    """Score a clip, a folder of clips or a list of them with one loaded :class:`Predictor`."""
    paths = [clips] if isinstance(clips, (str, Path)) else list(clips)
    items = [spec for p in paths for spec in list_inputs(p)]
    predictor = Predictor(checkpoint, device=device, preload_asr=needs_asr(items))
    return predictor.predict_many(items)


def needs_asr(items: Sequence[str | Path | ClipSpec]) -> bool:
    """True when some clip has no transcript (listed clips carry their sidecar's text)."""
    return any(not isinstance(item, ClipSpec) or item.text is None for item in items)


def list_inputs(path: str | Path) -> list[ClipSpec]:
    """A single file as is (whatever its extension), or the clips of a folder (recursive), each
    with its sidecar transcript when it has one."""
    path = Path(path)
    if not path.exists():
        raise AlmtError(f"{path}: no such file or folder")
    return list_plain_clips(path)


def format_prediction(r: Prediction) -> str:
    """A few lines for people: score, polarity and class, transcript, text windows, face share,
    timings."""
    bound = LABEL_RANGES[canonical_scale(r.label_scale)]
    scale = f"[{-bound:g}, {bound:g}]"
    t = r.timings
    steps = ", ".join(f"{k} {t[k]:.2f}s" for k in ("audio", "asr", "text", "face", "model") if k in t)
    transcript = r.transcript if len(r.transcript) <= 200 else r.transcript[:197] + "..."
    return "\n".join([
        f"{r.path}",
        f"  sentiment   {r.score:+.3f} on {scale}: {r.polarity} ({r.label_class})",
        f"  transcript  \"{transcript}\" (from {r.transcript_source})",
        f"  text        {_windows_text(r)}",
        f"  face found  in {100 * r.face_fraction:.0f}% of sampled frames; clip {r.duration:.1f} s",
        f"  time        {t.get('total', math.nan):.2f} s ({steps})",
    ])


def _windows_text(r: Prediction) -> str:
    """The windows line: ``240 tokens scored in 5 windows of <= 50 tokens (...): +0.12 0.0-14.8 s,
    ...``, or ``23 tokens scored as a whole`` when the transcript fits."""
    if len(r.windows) <= 1:
        return f"{r.text_tokens} tokens scored as a whole"
    shown = ", ".join(f"{w.score:+.2f} {w.start:.1f}-{w.end:.1f} s" for w in r.windows[:SHOWN_WINDOWS])
    more = f", and {len(r.windows) - SHOWN_WINDOWS} more" if len(r.windows) > SHOWN_WINDOWS else ""
    return (f"{r.text_tokens} tokens scored in {len(r.windows)} windows of <= {r.text_len} tokens "
            f"(score: their token-weighted mean): {shown}{more}")


def write_predictions(path: Path, results: list[Prediction]) -> None:
    """Write results as JSON lines (.jsonl) or CSV (.csv), atomically. The CSV has one row per
    clip: its ``windows`` column is the number of windows (the JSON lines list them)."""
    rows = [r.to_dict() for r in results]
    if path.suffix.lower() == ".csv":
        fields = [k for k in rows[0] if k not in ("windows", "timings")] + ["windows", "seconds"] if rows else []
        atomic_write_csv(path, fields, (
            [*(row[k] if row[k] is not None else "" for k in fields[:-2]),
             len(row["windows"]) if row["error"] is None else "", row["timings"].get("total", "")]
            for row in rows
        ))
    else:
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _extraction_config(ckpt: LoadedCheckpoint, ckpt_dir: Path) -> Config:
    """The checkpoint's config with the extractor settings its training features were made with."""
    meta = ckpt.feature_meta or {}
    settings = meta.get("extract")
    if not settings:
        raise CheckpointError(
            f"{ckpt_dir}: this checkpoint was trained on a feature file without extraction "
            "settings (e.g. an official MOSI/MOSEI/SIMS pickle), so its features cannot be made "
            "from raw clips; train on a file written by `almt extract` to predict on clips"
        )
    d = config_to_dict(ckpt.cfg)
    d["extract"] = dict(settings)
    if isinstance(settings.get("visual"), dict) and "pyfeat_device" in settings["visual"]:
        # the device the features were made on says nothing about this machine's
        d["extract"]["visual"] = {**settings["visual"], "pyfeat_device": "auto"}
    try:
        return config_from_dict(d, source=f"{ckpt_dir} (feature settings)")
    except AlmtError as e:
        raise CheckpointError(
            f"{ckpt_dir}: the stored extraction settings are not understood by this version "
            f"of almt-pipeline ({one_line(e)})"
        ) from e


def start_loading_asr(ckpt_dir: Path) -> Future[TranscriberLike] | None:
    """Load the checkpoint's speech recogniser in a background thread; None if unknown.

    Whisper loads in C++ outside the GIL, so this overlaps well with loading the rest.
    """
    config = ckpt_dir / "config.json"
    if not config.is_file() or config.stat().st_size > MAX_JSON_BYTES:
        return None  # the full checkpoint load reports what is wrong with it
    try:  # a light read: the full checkpoint load validates everything later
        meta = json.loads(config.read_text(encoding="utf-8"))
        settings = meta["feature_meta"]["extract"]
        model, language = settings["asr_model"], settings.get("language")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr-preload")
    future = pool.submit(Transcriber, model, language=language, device="cpu")
    pool.shutdown(wait=False)
    return cast("Future[TranscriberLike]", future)  # Future is invariant; a Transcriber is TranscriberLike


def _make_extractor(cfg: Config, ckpt: LoadedCheckpoint, ckpt_dir: Path, text: TextFeaturizer,
                    transcriber: TranscriberLike | None = None) -> ClipExtractor:
    """A ClipExtractor whose features match the checkpoint's feature names exactly."""
    extractor = ClipExtractor(cfg, device="cpu", text_featurizer=text, transcriber=transcriber)
    expected = (ckpt.feature_meta or {}).get("feature_names") or {}
    produced = {
        "audio": list(extractor.audio_featurizer.feature_names),
        "vision": list(extractor.face_featurizer.feature_names),
    }
    for modality, names in produced.items():
        want = expected.get(modality)
        if want is not None and list(want) != names:
            raise CheckpointError(
                f"{ckpt_dir}: the checkpoint expects {len(want)} {modality} features "
                f"({_names(want)}) but the installed extractors produce {len(names)} "
                f"({_names(names)}); use the almt-pipeline version that trained it"
            )
    return extractor


def _names(names: Sequence[str]) -> str:
    names = list(names)
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
