"""Sentiment of new clips with a trained checkpoint.

The checkpoint records how its training features were made (extractor settings and feature
names); prediction rebuilds exactly those extractors, so a clip is featurised the way the
training clips were. Models are loaded once per :class:`Predictor` and reused across clips.

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

import torch
from tqdm import tqdm

from .config import Config, config_from_dict, config_to_dict
from .errors import AlmtError, CheckpointError
from .extractors.asr import Transcriber
from .extractors.clip import ClipExtractor, ClipFailure, TranscriberLike, run_guarded
from .extractors.dataset import ClipSpec, list_plain_clips
from .extractors.text import TextFeaturizer
from .features import fit_length
from .metrics import LABEL_RANGES, canonical_scale, sentiment_class
from .model.checkpoint import LoadedCheckpoint, load_checkpoint
from .runs import find_latest_checkpoint
from .utils import atomic_write_csv, atomic_write_text, one_line, resolve_device

log = logging.getLogger(__name__)

# Class names on each label scale (the Acc-7 / Acc-5 classes of the metrics).
MOSI_CLASSES = {
    -3: "strongly negative", -2: "negative", -1: "weakly negative", 0: "neutral",
    1: "weakly positive", 2: "positive", 3: "strongly positive",
}
SIMS_CLASSES = ("negative", "weakly negative", "neutral", "weakly positive", "positive")
POLARITY = ("negative", "neutral", "positive")


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
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("score", "face_fraction", "duration"):
            if isinstance(d[k], float) and math.isnan(d[k]):
                d[k] = None
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
        self.extractor = _make_extractor(self.cfg, self.checkpoint, ckpt_dir, transcriber=transcriber)
        self.load_seconds = time.perf_counter() - t
        log.debug("loaded %s in %.2f s", ckpt_dir, self.load_seconds)

    def predict(self, clip: str | Path, transcript: str | None = None,
                transcript_source: str | None = None) -> Prediction:
        """Score one clip; raises :class:`AlmtError` for bad media (see :meth:`predict_many`).

        Without ``transcript``: the clip's sidecar file, else speech recognition.
        """
        t0 = time.perf_counter()
        if transcript is not None and transcript_source is None:
            transcript_source = "given"
        result = self.extractor(clip, transcript=transcript, transcript_source=transcript_source)
        m = self.cfg.model
        audio, audio_len = fit_length(result.audio, m.audio_len)  # (T_a, d_a)
        vision, vision_len = fit_length(result.vision, m.vision_len)  # (T_v, d_v)
        t = time.perf_counter()
        dev = self.device
        with torch.inference_mode():
            score = self.checkpoint.model(
                torch.from_numpy(result.text_bert[None]).to(dev),  # (1, 3, L)
                torch.from_numpy(audio[None]).to(dev),  # (1, T_a, d_a)
                torch.from_numpy(vision[None]).to(dev),  # (1, T_v, d_v)
                audio_lengths=torch.tensor([audio_len], device=dev),
                vision_lengths=torch.tensor([vision_len], device=dev),
            )
        value = float(score.reshape(-1)[0])
        timings = dict(result.timings)
        timings["model"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        return Prediction(
            path=str(clip), score=value, polarity=polarity(value, self.label_scale),
            label_class=label_class(value, self.label_scale), label_scale=self.label_scale,
            transcript=result.raw_text, transcript_source=result.transcript_source,
            face_fraction=result.face_fraction, duration=result.duration, timings=timings,
        )

    def predict_many(self, clips: Iterable[str | Path | ClipSpec], quiet: bool = True) -> list[Prediction]:
        """Score several clips; a bad clip gives a Prediction with ``error`` set, the rest go on.

        A :class:`~.extractors.dataset.ClipSpec` brings its transcript (read once, when listed).
        """
        items = list(clips)
        out: list[Prediction] = []
        for item in tqdm(items, unit="clip", disable=quiet or len(items) < 2, desc="predict"):
            path, text, source = (item.path, item.text, item.text_source) if isinstance(item, ClipSpec) \
                else (Path(item), None, None)
            outcome = run_guarded(partial(self.predict, path, text, source), path)
            if isinstance(outcome, ClipFailure):
                if outcome.traceback:
                    log.debug("unexpected failure on %s:\n%s", path, outcome.traceback)
                outcome = Prediction(path=str(path), error=outcome.message)
            out.append(outcome)
        return out


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
    """A few lines for people: score, polarity and class, transcript, face share, timings."""
    bound = LABEL_RANGES[canonical_scale(r.label_scale)]
    scale = f"[{-bound:g}, {bound:g}]"
    t = r.timings
    steps = ", ".join(f"{k} {t[k]:.2f}s" for k in ("audio", "asr", "text", "face", "model") if k in t)
    transcript = r.transcript if len(r.transcript) <= 200 else r.transcript[:197] + "..."
    return "\n".join([
        f"{r.path}",
        f"  sentiment   {r.score:+.3f} on {scale}: {r.polarity} ({r.label_class})",
        f"  transcript  \"{transcript}\" (from {r.transcript_source})",
        f"  face found  in {100 * r.face_fraction:.0f}% of sampled frames; clip {r.duration:.1f} s",
        f"  time        {t.get('total', math.nan):.2f} s ({steps})",
    ])


def write_predictions(path: Path, results: list[Prediction]) -> None:
    """Write results as JSON lines (.jsonl) or CSV (.csv), atomically."""
    rows = [r.to_dict() for r in results]
    if path.suffix.lower() == ".csv":
        fields = [k for k in rows[0] if k != "timings"] + ["seconds"] if rows else []
        atomic_write_csv(path, fields, (
            [*(row[k] if row[k] is not None else "" for k in fields[:-1]), row["timings"].get("total", "")]
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
    d["extract"] = settings
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
    try:  # a light read: the full checkpoint load validates everything later
        meta = json.loads((ckpt_dir / "config.json").read_text(encoding="utf-8"))
        settings = meta["feature_meta"]["extract"]
        model, language = settings["asr_model"], settings.get("language")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr-preload")
    future = pool.submit(Transcriber, model, language=language, device="cpu")
    pool.shutdown(wait=False)
    return cast("Future[TranscriberLike]", future)  # Future is invariant; a Transcriber is TranscriberLike


def _make_extractor(cfg: Config, ckpt: LoadedCheckpoint, ckpt_dir: Path,
                    transcriber: Future[TranscriberLike] | None = None) -> ClipExtractor:
    """A ClipExtractor whose features match the checkpoint's feature names exactly."""
    text = TextFeaturizer(str(ckpt_dir), cfg.model.text_len, tokenizer=ckpt.tokenizer)  # ids only
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
