"""What ALMT attends to: the attention maps of adaptive hyper-modality learning (the paper's Fig. 4
and Fig. 5) for one clip, one sample of a feature file, or averaged over a split.

alpha_j / beta_j: AHL layer j's language -> audio / vision attention (T, T), heads averaged, rows
summing to 1 (row i: query language summary token i; column k: key summary token k). Summary: per
modality, the attention of the T summary tokens of its embedding's last block over its inputs,
renormalised over the real input positions. Seconds of input positions come from the extraction
settings of the features (:func:`frame_seconds`); where the frames may have been pooled by an
unknown factor, or the file has no settings (official MMSA pickles), positions only.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batches import make_loader, to_split
from .config import config_to_dict
from .errors import ConfigError, FeatureFileError
from .evaluate import load_checked_features
from .explain_plots import plot_attention, plot_perturbation, plot_summary
from .features import FeatureFile
from .files import atomic_write_json, check_writable
from .model.checkpoint import LoadedCheckpoint, load_checkpoint
from .prediction import Predictor, Window, frame_span, weighted_score
from .schema import check_split
from .utils import resolve_device

TOP = 3  # input positions listed per summary token
DECIMALS = 5  # attention weights in the JSON
Maps = list[dict[str, np.ndarray]]  # per AHL layer: "audio" (alpha) and/or "vision" (beta), (T, T) each


@dataclass
class Sample:
    """One input to explain: the model's inputs as a batch of one, and how to map positions back."""

    name: str
    inputs: tuple[Tensor, ...]  # text_bert (1, 3, L), audio (1, T_a, d_a), vision (1, T_v, d_v), lengths (1,) x2
    label: float | None = None
    tokens: list[str] = field(default_factory=list)  # the text's real tokens
    seconds: dict[str, np.ndarray] = field(default_factory=dict)  # audio/vision, where known: (n, 2) start, end
    timing: dict[str, str] = field(default_factory=dict)  # audio/vision: how positions map to seconds
    notes: list[str] = field(default_factory=list)
    clip_score: float | None = None  # a clip scored in several text windows: `almt predict`'s score
    split: str | None = None  # a feature-file sample: the split it was found in

    def length(self, modality: str) -> int:
        """Real positions of ``modality``: text tokens with attention mask 1, or frames."""
        if modality == "text":
            return int(self.inputs[0][0, 1].sum())
        index = 3 if modality == "audio" else 4
        return min(int(self.inputs[index][0]), self.inputs[index - 2].shape[1])


@dataclass
class Explanation:
    """The maps of one input (or their average over a split) and the files written."""

    target: str
    score: float  # the model's score (average: the mean over the samples)
    label: float | None
    ahl: Maps
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)  # modality -> see summarise()
    n_samples: int = 1
    settings: dict[str, Any] = field(default_factory=dict)  # checkpoint, kind, data, split ...
    notes: list[str] = field(default_factory=list)
    # modality, frame, seconds ([start, end] or None), noise_std, seed, and after the noise: score, ahl (Maps)
    perturbation: dict[str, Any] | None = None
    files: list[Path] = field(default_factory=list)


def traced(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[np.ndarray, Maps, dict[str, np.ndarray]]:
    """One forward pass of ``model`` (put in eval mode) with the trace on: scores (B,), the AHL maps
    per layer (B, T, T) each, and per modality the summary tokens' attention (B, T, K)."""
    model.eval()
    trace: dict[str, Any] = {}
    text_bert, audio, vision, a_len, v_len = inputs
    with torch.inference_mode():
        scores = model(text_bert, audio, vision, audio_lengths=a_len, vision_lengths=v_len, trace=trace)  # (B,)
    ahl = [{k: v.float().cpu().numpy() for k, v in layer.items()} for layer in trace.get("ahl", [])]
    summary = {k: v.float().cpu().numpy() for k, v in trace.get("summary", {}).items()}
    return scores.float().cpu().numpy(), ahl, summary


def summarise(weights: np.ndarray, token_keys: int, n_real: int, labels: list[str] | None = None,
              seconds: np.ndarray | None = None, top: int = TOP) -> dict[str, Any]:
    """One modality's summary-token attention (T, K) (keys: ``token_keys`` summary tokens, then the inputs,
    real ones first) as a report: ``weights`` (T, n_real) renormalised over the real inputs, and per summary
    token its shares (to summary tokens, real inputs, padding) and ``top`` positions (weight, label, seconds)."""
    real = weights[:, token_keys:token_keys + n_real].astype(np.float64)  # (T, n_real)
    share = real.sum(1)  # (T,)
    norm = np.divide(real, share[:, None], out=np.zeros_like(real), where=share[:, None] > 0)  # (T, n_real)
    rows = []
    for i in range(len(weights)):
        best = [int(p) for p in np.argsort(-norm[i], kind="stable")[:top]] if share[i] > 0 else []
        rows.append({
            "token": i, "to_summary_tokens": float(weights[i, :token_keys].sum()), "to_inputs": float(share[i]),
            "to_padding": float(weights[i, token_keys + n_real:].sum()),
            "top": [{"position": p, "weight": float(norm[i, p]), "label": labels[p] if labels else None,
                     "seconds": None if seconds is None else [float(s) for s in seconds[p]]} for p in best],
        })
    return {"positions": n_real, "weights": norm, "labels": labels, "seconds": seconds, "summary_tokens": rows}


def frame_seconds(n_real: int, period: float, max_len: int, raw: int, centred: bool = False) -> np.ndarray:
    """(n_real, 2) start and end seconds of the model's input positions for ``raw`` frames
    ``period`` seconds apart (audio: hop_length / sample_rate, video: 1 / fps), mean-pooled into
    ``max_len`` bins when more (``features.fit_length``): a bin spans the seconds of its frames.
    ``centred``: frame k is centred on k * period (librosa's frames), not starting there."""
    edges = np.arange(n_real + 1) if raw <= max_len else (np.arange(max_len + 1) * raw) // max_len
    shift = 0.5 * period if centred else 0.0
    spans = np.stack([edges[:-1] * period - shift, edges[1:] * period - shift], axis=1)[:n_real]  # (n_real, 2)
    return np.maximum(spans, 0.0)


def frame_periods(settings: Any) -> dict[str, float]:
    """Seconds between audio / video frames from a config's ``extract`` section (a dict); {} if it does not say."""
    try:
        return {"audio": int(settings["audio"]["hop_length"]) / int(settings["audio"]["sample_rate"]),
                "vision": 1.0 / float(settings["visual"]["fps"])}
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return {}


def _tokens(ckpt: LoadedCheckpoint, text_bert: Tensor) -> list[str]:
    """The real text tokens of text_bert (1, 3, L)."""
    n = int(text_bert[0, 1].sum())
    return [str(t) for t in ckpt.tokenizer.convert_ids_to_tokens([int(i) for i in text_bert[0, 0, :n]])]


def clip_sample(predictor: Predictor, clip: str | os.PathLike, transcript: str | None = None) -> Sample:
    """A media file as ``almt predict`` featurises it; a transcript longer than the model's text
    length gives its first window (with the clip's frames for that window)."""
    result, windows, inputs = predictor.inputs(Path(clip), transcript)
    ckpt, m = predictor.checkpoint, predictor.cfg.model
    first = tuple(t[:1] for t in inputs)
    sample = Sample(name=str(clip), inputs=first, tokens=_tokens(ckpt, first[0]),
                    notes=[f"transcript (from {result.transcript_source}): {result.raw_text!r}"])
    periods = frame_periods(config_to_dict(predictor.cfg)["extract"])
    for modality, frames, max_len in (("audio", result.audio, m.audio_len), ("vision", result.vision, m.vision_len)):
        raw = len(frame_span(frames, windows[0].start, windows[0].end))
        sample.seconds[modality] = frame_seconds(sample.length(modality), periods[modality], max_len, raw,
                                                 centred=modality == "audio")
        sample.timing[modality] = (f"{raw} frames mean-pooled into {max_len} positions" if raw > max_len
                                   else f"{raw} frames, one per position")
    if len(windows) > 1:
        scores = predictor.score_windows(windows, result.audio, result.vision)
        scored = [Window(w.start * result.duration, w.end * result.duration, w.tokens, s)
                  for w, s in zip(windows, scores)]
        sample.clip_score = weighted_score(scored)
        sample.notes.append(f"the transcript ({sum(w.tokens for w in windows)} tokens) does not fit the model's "
                            f"text length {m.text_len}: the maps are of its first window ({scored[0].start:.1f}-"
                            f"{scored[0].end:.1f} s) of {len(windows)}; the clip's score is {sample.clip_score:+.3f}")
    return sample


def file_sample(ckpt: LoadedCheckpoint, data: FeatureFile, sample_id: str, device: torch.device) -> Sample:
    """Sample ``sample_id`` of a loaded feature file (the split it is in is recorded in ``split``)."""
    found = [split for split, arrays in data.splits.items() if sample_id in {str(i) for i in arrays["id"]}]
    if not found:
        known = [str(i) for a in data.splits.values() for i in a["id"]]
        raise FeatureFileError(f"{data.path}: no sample {sample_id!r} in split(s) {', '.join(data.splits)}, "
                               f"which hold {len(known)} ids (e.g. {known[0]!r})")
    if len(found) > 1:
        raise FeatureFileError(f"{data.path}: sample id {sample_id!r} is in the {' and '.join(found)} splits; "
                               "choose one with --split")
    arrays = data.splits[found[0]]
    row = [str(i) for i in arrays["id"]].index(sample_id)
    s = to_split(found[0], {k: v[row:row + 1] for k, v in arrays.items()})
    label = float(s.labels[0])
    sample = Sample(name=sample_id, inputs=tuple(t.to(device) for t in s.inputs),
                    label=label if math.isfinite(label) else None, tokens=_tokens(ckpt, s.inputs[0]), split=found[0])
    periods = frame_periods(data.meta.get("extract"))
    for modality, width in (("audio", s.inputs[1].shape[1]), ("vision", s.inputs[2].shape[1])):
        n = sample.length(modality)  # a clip longer than the file's padded width was pooled into it
        if periods and n < width:
            sample.seconds[modality] = frame_seconds(n, periods[modality], width, n, centred=modality == "audio")
        sample.timing[modality] = (
            "the file has no extraction settings: positions only" if not periods
            else f"fills the file's {width} positions, so it may have been pooled: positions only" if n >= width
            else f"{n} frames, one per position")
    return sample


def explain_sample(ckpt: LoadedCheckpoint, sample: Sample) -> Explanation:
    """The maps and the summary-token report of one input."""
    scores, ahl, summary = traced(ckpt.model, sample.inputs)
    keys = ckpt.cfg.model.n_tokens if ckpt.cfg.model.modality_embedding else 0  # without it: pooling weights
    report = {m: {**summarise(w[0], keys, sample.length(m), sample.tokens if m == "text" else None,
                              sample.seconds.get(m)), "timing": sample.timing.get(m, f"{sample.length(m)} tokens")}
              for m, w in summary.items()}  # text, audio, vision (those the model has)
    return Explanation(target=sample.name, score=float(scores[0]), label=sample.label,
                       ahl=[{k: v[0] for k, v in layer.items()} for layer in ahl], summary=report,
                       notes=list(sample.notes))


def perturb(sample: Sample, modality: str, frame: int, noise_std: float = 1.0, seed: int = 0) -> Sample:
    """``sample`` with Gaussian noise on real input frame ``frame`` of audio or vision: standard
    deviation ``noise_std`` times each feature's std over the sample's real frames (1 for a feature
    constant over them), from ``numpy.random.default_rng(seed)`` (the paper's Fig. 5). alpha
    depends only on language and audio, beta only on language and vision."""
    if modality not in ("audio", "vision"):
        raise ConfigError(f"--perturb-modality must be audio or vision, got {modality!r}")
    if seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
    if not (math.isfinite(noise_std) and noise_std > 0):
        raise ConfigError(f"--noise-std must be a positive number, got {noise_std}")
    n = sample.length(modality)
    if not 0 <= frame < n:
        raise ConfigError(f"{sample.name}: --perturb-frame {frame} is not a real {modality} frame "
                          + (f"(it has {n}: 0 to {n - 1})" if n else "(it has none)"))
    index = 1 if modality == "audio" else 2
    x = sample.inputs[index].clone()  # (1, T_m, d_m)
    std = x[0, :n].double().std(0, unbiased=False)  # (d_m,)
    std = torch.where(std > 0, std, torch.ones_like(std))
    noise = torch.from_numpy(np.random.default_rng(seed).standard_normal(x.shape[-1])).to(std.device)  # (d_m,)
    x[0, frame] += (noise * std * noise_std).to(x.dtype)
    return replace(sample, inputs=tuple(x if i == index else t for i, t in enumerate(sample.inputs)))


def average_maps(ckpt: LoadedCheckpoint, data: FeatureFile, split: str, batch_size: int, device: torch.device,
                 quiet: bool = False) -> Explanation:
    """alpha and beta averaged over every sample of ``split`` (the paper's Fig. 4)."""
    s = to_split(split, data.splits[split])
    sums: Maps = []
    predictions: list[np.ndarray] = []
    for batch in tqdm(make_loader(s, batch_size, None, pin=False), desc=f"explain {split}", unit="batch",
                      disable=quiet, leave=False):
        scores, ahl, _ = traced(ckpt.model, tuple(t.to(device) for t in batch[:-1]))
        predictions.append(scores)
        sums = [{k: v.sum(0) + (sums[j][k] if sums else 0.0) for k, v in layer.items()} for j, layer in enumerate(ahl)]
    return Explanation(
        target=f"{split} split of {data.path.name} ({s.n} samples)", score=float(np.concatenate(predictions).mean()),
        label=float(s.labels.mean()) if s.labelled else None, n_samples=s.n,
        ahl=[{k: v / s.n for k, v in layer.items()} for layer in sums],
        notes=["score and label are means over the split; the summary-token report is per input, not averaged"])


def _finish(ex: Explanation, ckpt: LoadedCheckpoint, ckpt_dir: Path, out: Path,
            settings: dict[str, Any]) -> Explanation:
    m = ckpt.cfg.model
    ex.settings = {"checkpoint": str(ckpt_dir), **settings, "label_scale": ckpt.label_scale, "n_tokens": m.n_tokens,
                   "guided_layers": m.guided_layers, "drop_modalities": list(m.drop_modalities)}
    write_outputs(out, ex)
    return ex


def explain(checkpoint: str | os.PathLike, target: str | os.PathLike, out_dir: str | os.PathLike, *,
            data: str | os.PathLike | None = None, split: str | None = None, transcript: str | None = None,
            perturb_frame: int | None = None, perturb_modality: str = "vision", noise_std: float = 1.0,
            seed: int = 0, device: str = "auto") -> Explanation:
    """Explain ``target``: a media file scored as ``almt predict`` does (``transcript``: its text), or with
    ``data`` a sample id of that feature file (searched in ``split``, else every split); with ``perturb_frame``
    also after noise on that frame (:func:`perturb`). Writes :func:`write_outputs` to ``out_dir``."""
    if split is not None:
        check_split(split, "--split")
    ckpt_dir, out = Path(checkpoint), Path(out_dir)
    check_writable(out, folder=True)
    if data is None:
        predictor = Predictor(ckpt_dir, device=device)
        ckpt, sample = predictor.checkpoint, clip_sample(predictor, target, transcript)
        settings: dict[str, Any] = {"kind": "clip", "clip_score": sample.clip_score}
    else:
        ckpt = load_checkpoint(ckpt_dir, resolve_device(device))
        file = load_checked_features(ckpt, ckpt_dir, data, (split,) if split else None)
        sample = file_sample(ckpt, file, str(target), next(ckpt.model.parameters()).device)
        settings = {"kind": "sample", "data": str(data), "split": sample.split}
    ex = explain_sample(ckpt, sample)
    if perturb_frame is not None:
        if perturb_modality in ckpt.cfg.model.drop_modalities:
            raise ConfigError(f"{ckpt_dir}: the model has no {perturb_modality} (model.drop_modalities)")
        after = explain_sample(ckpt, perturb(sample, perturb_modality, perturb_frame, noise_std, seed))
        span = sample.seconds.get(perturb_modality)
        ex.perturbation = {"modality": perturb_modality, "frame": perturb_frame, "noise_std": noise_std, "seed": seed,
                           "seconds": None if span is None else [float(t) for t in span[perturb_frame]],
                           "score": after.score, "ahl": after.ahl}
    return _finish(ex, ckpt, ckpt_dir, out, settings)


def explain_average(checkpoint: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike, *,
                    split: str = "test", batch_size: int | None = None, device: str = "auto",
                    quiet: bool = False) -> Explanation:
    """alpha and beta averaged over ``split`` of ``data`` (Fig. 4), written to ``out_dir``; ``batch_size``
    defaults to the checkpoint's ``train.eval_batch_size``."""
    check_split(split, "--split")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    check_writable(out_dir, folder=True)
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, dev)
    file = load_checked_features(ckpt, checkpoint, data, (split,))
    ex = average_maps(ckpt, file, split, batch_size or ckpt.cfg.train.eval_batch_size, dev, quiet)
    return _finish(ex, ckpt, Path(checkpoint), Path(out_dir), {"kind": "average", "data": str(data), "split": split})


def _layers_json(ahl: Maps) -> list[dict[str, Any]]:
    return [{"layer": j, "alpha": layer.get("audio"), "beta": layer.get("vision")} for j, layer in enumerate(ahl, 1)]


def to_json(ex: Explanation) -> dict[str, Any]:
    """The explanation as plain JSON: numbers rounded to DECIMALS, AHL layers numbered from 1, summary
    tokens and input positions from 0, seconds [start, end], alpha/beta null where a layer has none."""
    out = {"target": ex.target, **ex.settings, "n_samples": ex.n_samples, "score": ex.score, "label": ex.label,
           "notes": ex.notes, "ahl": _layers_json(ex.ahl),
           "summary_weights": "renormalised over each modality's real input positions", "summary": ex.summary}
    if ex.perturbation is not None:
        p = ex.perturbation
        out["perturbation"] = {
            **{k: p[k] for k in ("modality", "frame", "seconds", "noise_std", "seed")},
            "noise": "Gaussian, std = noise_std x each feature's std over the sample's real frames",
            "score_before": ex.score, "score_after": p["score"], "ahl_after": _layers_json(p["ahl"])}
    text = json.dumps(out, default=lambda x: x.tolist())  # numpy arrays and scalars
    return dict(json.loads(text, parse_float=lambda f: round(float(f), DECIMALS)))


def write_outputs(out_dir: str | os.PathLike, ex: Explanation) -> list[Path]:
    """attention.png and .json, summary_attention.png and perturbation.png when there is something to show."""
    plots = [("attention.png", plot_attention), ("summary_attention.png", plot_summary if ex.summary else None),
             ("perturbation.png", plot_perturbation if ex.perturbation is not None else None)]
    ex.files = [Path(out_dir) / "attention.json"] + [Path(out_dir) / name for name, plot in plots if plot]
    atomic_write_json(ex.files[0], to_json(ex))
    for path, plot in zip(ex.files[1:], (plot for _, plot in plots if plot)):
        plot(path, ex)
    return ex.files
