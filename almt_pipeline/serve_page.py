"""The page of ``almt serve`` (Gradio): drop clips, read per clip its score, transcript, faces, attention
maps and what each modality contributes. :func:`score_upload` is also what the HTTP API runs.

Per clip the page shows what ``almt predict`` prints, plus views computed from the same features (the
clip is featurised once):
  faces          up to ``FACE_CROPS`` frames where the extraction found a face, spread over the clip,
                 cropped around the face with dlib's 68 landmarks fitted and drawn;
  contributions  the score with each modality removed as ``almt robustness`` removes it (text tokens
                 [UNK], audio or vision frames zeroed), text windows weighted as in the clip's score;
  attention      the AHL maps of ``almt explain`` (first text window), when the model has AHL layers.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from . import __version__
from .batches import Split
from .errors import AlmtError, DependencyError
from .explain import Explanation, traced
from .explain_plots import plot_attention
from .extractors.clip import ClipFailure, ClipResult, run_guarded
from .extractors.faces import BOX_NAMES
from .media import iter_frames
from .metrics import LABEL_RANGES, canonical_scale
from .prediction import WINDOW_BATCH, Prediction, Predictor, Window, weighted_score
from .probe import MediaInfo, probe
from .robustness import MODALITIES, remove_modality
from .utils import one_line

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger(__name__)

FACE_CROPS = 3  # face crops shown per clip
FACE_FRAME_SIDE = 640  # frames for the crops are decoded with the longer side at most this (pixels)
DETECT_SIDE = 320  # the face detector runs on the frame scaled down to this
CROP_HEIGHT = 180  # pixels of a face crop on the page
CROP_MARGIN = 0.35  # crop margin around the landmarks, times the landmarks' box size
# 68-point contours drawn between the dots: (first, last, closed)
CONTOURS = ((0, 16, False), (17, 21, False), (22, 26, False), (27, 30, False), (31, 35, False),
            (36, 41, True), (42, 47, True), (48, 59, True), (60, 67, True))
T = TypeVar("T")
FIELD_LIMIT = 1 << 20  # bytes of a transcript, on the page and the API (sidecar transcripts have the same cap)
MAX_FILES = 20  # clips the page takes per analysis
VIEW_WINDOWS = 8  # text windows above which the contributions and the attention maps are not computed
REMOVED = {"text": "text (tokens → [UNK])", "audio": "audio (frames zeroed)", "vision": "vision (frames zeroed)"}

CSS = """
.almt-clip {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 12px 16px; margin: 10px 0}
.almt-clip h3 {margin: 0 0 6px 0}
.almt-headline {font-size: 1.15em}
.almt-score {font-size: 1.6em; font-weight: 700; font-variant-numeric: tabular-nums}
.almt-scale {position: relative; height: 8px; margin: 8px 0 2px 0; border-radius: 4px;
             background: linear-gradient(90deg, #d9534f, #d9d9d9 50%, #5cb85c)}
.almt-marker {position: absolute; top: -4px; width: 4px; height: 16px; margin-left: -2px; background: #222}
.almt-ends {display: flex; justify-content: space-between; font-size: 0.8em; color: var(--body-text-color-subdued)}
.almt-clip dl {display: grid; grid-template-columns: max-content auto; gap: 2px 12px; margin: 8px 0}
.almt-clip dt {font-weight: 600}
.almt-clip dd {margin: 0}
.almt-muted {color: var(--body-text-color-subdued)}
.almt-error {color: #c9302c; font-family: var(--font-mono); white-space: pre-wrap}
.almt-faces {display: flex; gap: 10px; flex-wrap: wrap; margin: 6px 0}
.almt-faces figure {margin: 0; text-align: center}
.almt-faces img {height: 180px; border-radius: 4px}
.almt-contrib td, .almt-contrib th {padding: 2px 10px; text-align: right}
.almt-contrib td:first-child, .almt-contrib th:first-child {text-align: left}
.almt-clip h4 {margin: 14px 0 4px 0}
.almt-clip summary {cursor: pointer}
.almt-clip summary h4 {display: inline-block}
.almt-attention {max-width: min(100%, 760px)}
"""


@dataclass
class Scored:
    """One upload scored: the result as ``almt predict --json`` prints it, the features (None when it
    failed) and who is at fault when it failed: ``input`` (the file) or ``server``."""

    prediction: Prediction
    features: ClipResult | None = None
    fault: str | None = None


@dataclass
class ClipReport:
    """What the page shows for one clip."""

    scored: Scored
    without: dict[str, float | None] = field(default_factory=dict)  # modality -> score without it
    attention_png: bytes | None = None
    faces: list[tuple[float, bytes]] = field(default_factory=list)  # (seconds, PNG) per face crop
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the views' time


def score_upload(predictor: Predictor, path: Path, name: str, transcript: str | None) -> Scored:
    """Score the uploaded file ``path`` as ``almt predict`` scores a clip, with ``name`` (the file's name
    on the client) in place of ``path`` in the result and in the one-line error of a failed clip."""
    try:
        outcome = run_guarded(partial(predictor.predict_with_features, path, transcript), path)
    except DependencyError as e:  # a missing package or model: the server's fault, not the file's
        return Scored(Prediction(path=name, error=one_line(e)), fault="server")
    if isinstance(outcome, ClipFailure):
        if outcome.traceback:
            log.warning("unexpected failure on %s:\n%s", name, outcome.traceback)
        return Scored(Prediction(path=name, error=outcome.message.replace(str(path), name)),
                      fault="server" if outcome.traceback else "input")
    prediction, features = outcome
    prediction.path = name
    return Scored(prediction, features)


def modality_scores(predictor: Predictor, features: ClipResult) -> dict[str, float | None]:
    """The clip's score with each modality removed (see the module's description); None for a modality
    the model is built without, or text when the tokenizer has no [UNK]. Windows go WINDOW_BATCH at a time."""
    windows = predictor._text_windows(features)
    unk = predictor.checkpoint.tokenizer.unk_token_id
    kept = [m for m in MODALITIES if not (m in predictor.cfg.model.drop_modalities or (m == "text" and unk is None))]
    scores: dict[str, list[float]] = {m: [] for m in kept}
    for first in range(0, len(windows), WINDOW_BATCH):
        part = windows[first:first + WINDOW_BATCH]
        inputs = predictor._window_inputs(part, features.audio, features.vision)
        n = len(part)
        split = Split("clip", np.arange(n).astype(str), tuple(t.cpu() for t in inputs), torch.full((n,), math.nan))
        for modality in kept:
            scores[modality] += predictor.score_inputs(remove_modality(split, modality, unk).inputs)
    return {m: weighted_score([Window(0.0, 0.0, w.tokens, s) for w, s in zip(windows, scores[m])])
            if m in scores else None for m in MODALITIES}


def duration_error(info: MediaInfo, name: str, max_duration: float) -> str | None:
    """The one line refusing a clip longer than ``max_duration`` seconds (--max-duration); None when it is not."""
    if info.duration is not None and info.duration > max_duration:
        return f"{name}: the clip lasts {info.duration:g} s, longer than the server's limit of {max_duration:g} s " \
               "(--max-duration)"
    return None


def attention_png(predictor: Predictor, features: ClipResult, name: str, folder: Path) -> bytes | None:
    """The AHL maps of the clip's first text window as ``almt explain`` draws them; None without AHL."""
    if not predictor.cfg.model.ahl:
        return None
    _, inputs = predictor.model_inputs(features)
    scores, ahl, _ = traced(predictor.checkpoint.model, tuple(t[:1] for t in inputs))
    ex = Explanation(target=name, score=float(scores[0]), label=None,
                     ahl=[{k: v[0] for k, v in layer.items()} for layer in ahl])
    path = folder / "attention.png"
    plot_attention(path, ex)
    return path.read_bytes()


class FaceCrops:
    """Face crops with the 68 landmarks drawn (dlib's detector and landmark model, loaded on first use)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self._models: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        if self._models is None:
            try:
                import dlib
            except ImportError as e:
                raise DependencyError("dlib is not installed (pip install dlib-bin): no face crops") from e
            from .extractors.visual import shape_predictor_path

            self._models = (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(shape_predictor_path())))
        return self._models

    def __call__(self, path: Path, features: ClipResult, count: int = FACE_CROPS) -> list[tuple[float, bytes]]:
        """Up to ``count`` crops (seconds, PNG) from frames spread over those where the extraction found a face."""
        found = np.flatnonzero(features.vision[:, 0] > 0.5) if len(features.vision) else np.zeros(0, int)
        if not len(found):
            return []
        picks = sorted({int(found[int((2 * k + 1) * len(found) / (2 * count))]) for k in range(count)})
        fps = float(self.predictor.cfg.extract.visual.fps)
        frames: dict[int, np.ndarray] = {}
        with iter_frames(path, fps, FACE_FRAME_SIDE) as stream:
            for i, (_, frame) in enumerate(stream):
                if i in picks:
                    frames[i] = frame
                if i >= picks[-1]:
                    break
        crops = []
        for i, frame in frames.items():
            pts = self._landmarks(frame, features.vision[i])
            if pts is not None:
                crops.append((i / fps, _draw_crop(frame, pts)))
        return crops

    def _landmarks(self, frame: np.ndarray, row: np.ndarray) -> np.ndarray | None:
        """(68, 2) landmarks in ``frame`` (H, W, 3): in the largest box the detector finds, else in the
        extraction's face box (a frame the extraction reached by tracking)."""
        import cv2
        import dlib

        detector, predictor = self._load()
        gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)  # (H, W)
        h, w = gray.shape
        scale = min(1.0, DETECT_SIDE / max(h, w))
        small = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        rects = list(detector(small, 0))
        if rects:
            r = max(rects, key=lambda r: r.width() * r.height())
            box = [v / scale for v in (r.left(), r.top(), r.right(), r.bottom())]
        else:
            names = self.predictor.extractor.face_featurizer.feature_names
            if not set(BOX_NAMES[:4]) <= set(names):
                return None
            cx, cy, bw, bh = (float(row[names.index(k)]) for k in BOX_NAMES[:4])  # fractions of the frame
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        shape = predictor(gray, dlib.rectangle(*(int(round(v)) for v in box)))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def _draw_crop(frame: np.ndarray, pts: np.ndarray) -> bytes:
    """PNG of ``frame`` (H, W, 3) RGB cropped around landmarks ``pts`` (68, 2), scaled to CROP_HEIGHT, the
    landmarks drawn as dots joined along the face's contours."""
    import cv2

    h, w = frame.shape[:2]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pad = (hi - lo) * CROP_MARGIN
    x0, y0 = np.maximum(np.floor(lo - pad), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(hi + pad), [w, h]).astype(int)
    scale = CROP_HEIGHT / max(y1 - y0, 1)
    crop = cv2.resize(np.ascontiguousarray(frame[y0:y1, x0:x1]), (max(1, round((x1 - x0) * scale)), CROP_HEIGHT),
                      interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    p = np.round((pts - [x0, y0]) * scale).astype(np.int32)  # (68, 2) in the crop
    for first, last, closed in CONTOURS:
        cv2.polylines(crop, [p[first:last + 1]], closed, (90, 200, 255), 1, cv2.LINE_AA)
    for x, y in p:
        cv2.circle(crop, (int(x), int(y)), 2, (40, 255, 80), -1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    assert ok, "PNG encoding of a face crop failed"
    return bytes(png)


def clip_report(predictor: Predictor, faces: FaceCrops, path: Path, name: str, transcript: str | None,
                work_dir: Path) -> ClipReport:
    """Score one clip and compute the page's views of it; a view that fails becomes a note."""
    report = ClipReport(score_upload(predictor, path, name, transcript))
    features = report.scored.features
    if features is None:
        return report
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        report.faces = _view(report, "the face crops", lambda: faces(path, features)) or []
        count = len(report.scored.prediction.windows)
        if count > VIEW_WINDOWS:
            report.notes.append(f"The modality contributions and attention maps are not computed for a transcript "
                                f"of {count} text windows (more than {VIEW_WINDOWS}).")
            report.seconds = time.perf_counter() - t
            return report
        report.without = _view(report, "the modality contributions", lambda: modality_scores(predictor, features)) or {}
        report.attention_png = _view(report, "the attention maps",
                                     lambda: attention_png(predictor, features, name, Path(folder)))
    report.seconds = time.perf_counter() - t
    return report


def _view(report: ClipReport, what: str, make: Callable[[], T]) -> T | None:
    """``make()``, or None with a note on the page when it fails (the clip's score is shown all the same)."""
    try:
        return make()
    except Exception as e:  # a view must never hide the score
        log.log(logging.DEBUG if isinstance(e, AlmtError) else logging.WARNING, "%s of %s failed", what,
                report.scored.prediction.path, exc_info=True)
        report.notes.append(f"{what} could not be made: {one_line(e)}")
        return None


def _img(png: bytes, alt: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_report(report: ClipReport, bound: float, maps_open: bool = True) -> str:
    """One clip's section of the results (HTML; every text from the clip escaped); the attention maps folded
    unless ``maps_open``."""
    r, e = report.scored.prediction, html.escape
    head = f'<section class="almt-clip"><h3>{e(r.path)}</h3>'
    if r.error is not None:
        return head + f'<p class="almt-error">error: {e(r.error)}</p></section>'
    where = 100 * min(max((r.score + bound) / (2 * bound), 0.0), 1.0)
    t = r.timings
    steps = ", ".join(f"{k} {t[k]:.2f} s" for k in ("audio", "asr", "text", "face", "model") if k in t)
    windows = (f"{r.text_tokens} tokens scored as a whole" if len(r.windows) <= 1 else
               f"{r.text_tokens} tokens scored in {len(r.windows)} windows of ≤ {r.text_len} tokens "
               "(score: their token-weighted mean)")
    parts = [
        head,
        f'<div class="almt-headline"><span class="almt-score">{r.score:+.3f}</span> on [{-bound:g}, {bound:g}]: '
        f"<b>{e(r.polarity)}</b> ({e(r.label_class)})</div>",
        f'<div class="almt-scale"><div class="almt-marker" style="left: {where:.1f}%"></div></div>'
        f'<div class="almt-ends"><span>{-bound:g} negative</span><span>0</span><span>positive {bound:g}</span></div>',
        "<dl>",
        f'<dt>Transcript</dt><dd>“{e(r.transcript)}” <span class="almt-muted">(from {e(r.transcript_source)})</span>'
        "</dd>",
        f"<dt>Text</dt><dd>{windows}</dd>",
        f"<dt>Face</dt><dd>found in {100 * r.face_fraction:.0f}% of the sampled frames; clip {r.duration:.1f} s</dd>",
        f'<dt>Time</dt><dd>{t.get("total", math.nan):.2f} s ({steps}); the views below {report.seconds:.2f} s</dd>',
        "</dl>",
    ]
    if report.faces:
        parts.append("<h4>Face crops, dlib's 68 landmarks drawn</h4>" + '<div class="almt-faces">' + "".join(
            f"<figure>{_img(png, f'face at {s:.1f} s')}<figcaption>{s:.1f} s</figcaption></figure>"
            for s, png in report.faces) + "</div>")
    elif r.face_fraction == 0:
        parts.append('<p class="almt-muted">No face was found in the sampled frames.</p>')
    if report.without:
        rows = "".join(
            f"<tr><td>without {REMOVED[m]}</td><td>{s:+.3f}</td><td>{r.score - s:+.3f}</td></tr>" if s is not None
            else f'<tr><td>without {m}</td><td colspan="2" class="almt-muted">not in the model</td></tr>'
            for m, s in report.without.items())
        parts.append("<h4>What each modality contributes</h4>"
                     '<table class="almt-contrib"><tr><th>input</th><th>score</th><th>contribution '
                     f"(score − score without)</th></tr><tr><td>all</td><td>{r.score:+.3f}</td><td></td></tr>"
                     f"{rows}</table>")
    if report.attention_png is not None:
        first = f" (first of {len(r.windows)} text windows)" if len(r.windows) > 1 else ""
        parts.append(f"<details{' open' if maps_open else ''}><summary><h4>AHL attention maps{first}</h4></summary>"
                     "<p>Per layer, what the language summary tokens attend to in the audio (α) and vision (β) "
                     "summary tokens, as <code>almt explain</code> draws them.</p>"
                     + _img(report.attention_png, "AHL attention maps", "almt-attention") + "</details>")
    parts += [f'<p class="almt-muted">{e(n)}</p>' for n in report.notes]
    return "".join(parts) + "</section>"


def check_request(files: list[str] | None, transcript: str | None, page_dir: Path, max_upload_bytes: int) -> str | None:
    """The one line refusing a page request: too many files, a path that is not an upload of this page (inside
    ``page_dir``), more bytes than ``max_upload_bytes`` in all, a transcript longer than FIELD_LIMIT; else None."""
    if len(files or []) > MAX_FILES:
        return f"{len(files or [])} files: the page takes at most {MAX_FILES} clips per analysis"
    total = 0
    for f in files or []:
        path = Path(f).resolve()
        if not path.is_relative_to(page_dir) or not path.is_file():
            return f"{Path(f).name}: not a file uploaded to this page (refused)"
        total += path.stat().st_size
    if total > max_upload_bytes:
        return f"the clips ({total / (1 << 20):.1f} MiB in all) are larger than the server's upload limit of " \
               f"{max_upload_bytes / (1 << 20):g} MiB (--max-upload-mb)"
    if len((transcript or "").encode("utf-8", "replace")) > FIELD_LIMIT:
        return f"the transcript is larger than {FIELD_LIMIT >> 20} MiB"
    return None


def build_page(predictor: Predictor, lock: threading.Lock, work_dir: Path, max_upload_bytes: int = 200 << 20,
               max_duration: float = 600.0) -> gr.Blocks:
    """The Blocks of the page; clips are scored one at a time under ``lock`` (shared with the API). Gradio is
    imported here: it reads its cache folder (GRADIO_TEMP_DIR) when imported."""
    import gradio as gr

    bound = LABEL_RANGES[canonical_scale(predictor.label_scale)]
    faces = FaceCrops(predictor)
    page_dir = (work_dir / "page").resolve()

    def report_of(path: Path, text: str | None) -> ClipReport:
        try:
            refused = duration_error(probe(path), path.name, max_duration)
        except AlmtError:
            refused = None  # scoring gives the file's one-line error
        if refused is not None:
            return ClipReport(Scored(Prediction(path=path.name, error=refused), fault="input"))
        with lock:
            return clip_report(predictor, faces, path, path.name, text, work_dir)

    def analyse(files: list[str] | None, transcript: str | None,
                progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008 - Gradio's progress hook
        refused = check_request(files, transcript, page_dir, max_upload_bytes)
        if refused is not None:
            return "failed", "The request was refused.", gr.Textbox(value=f"error: {refused}", visible=True), "", []
        paths = [Path(f) for f in files or []]
        text = (transcript or "").strip() or None
        if not paths:
            return "", "Drop one or more clips above, then press Analyse.", gr.Textbox(visible=False), "", []
        note = ""
        if text is not None and len(paths) > 1:
            text, note = None, " The transcript applies to a single clip: these were transcribed by speech recognition."
        reports = []
        for i, path in enumerate(paths):
            progress((i, len(paths)), desc=f"{path.name} ({i + 1} of {len(paths)})", unit="clips")
            reports.append(report_of(path, text))
        results = [r.scored.prediction for r in reports]
        errors = [f"error: {r.error}" for r in results if r.error is not None]
        first = results[0]
        status = f"{len(results)} clip(s): {len(results) - len(errors)} scored, {len(errors)} failed.{note}"
        return (f"{first.score:+.3f}" if first.error is None else "failed", status,
                gr.Textbox(value="\n".join(errors), visible=bool(errors)),
                "".join(render_report(r, bound, len(reports) == 1) for r in reports), [r.to_dict() for r in results])

    with gr.Blocks(title="ALMT sentiment", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(
            f"## ALMT sentiment of video clips\nCheckpoint `{predictor.path}` · label scale "
            f"{predictor.label_scale} [{-bound:g}, {bound:g}] · almt-pipeline {__version__} · "
            "HTTP API: `POST /api/predict` (multipart field `clip`, optional `transcript`), `GET /api/health`")
        with gr.Row():
            clips = gr.File(label="Clips (one or several)", file_count="multiple", elem_id="clips")
            with gr.Column():
                transcript = gr.Textbox(label="Transcript (optional, for a single clip; default: speech recognition)",
                                        lines=3, elem_id="transcript")
                run = gr.Button("Analyse", variant="primary", elem_id="analyse")
        with gr.Row():
            score = gr.Textbox(label="Score of the first clip", interactive=False, elem_id="score", scale=1)
            status = gr.Textbox(label="Status", interactive=False, elem_id="status", scale=3)
        errors = gr.Textbox(label="Errors", interactive=False, visible=False, elem_id="errors")
        results = gr.HTML('<p class="almt-muted">The results appear here, one section per clip.</p>',
                          elem_id="results", min_height=90)
        with gr.Accordion("JSON (as `almt predict --json` prints it)", open=False):
            as_json = gr.JSON(elem_id="json")
        run.click(analyse, [clips, transcript], [score, status, errors, results, as_json], concurrency_limit=1,
                  show_progress_on=results)
    page.queue(default_concurrency_limit=1)
    return page
