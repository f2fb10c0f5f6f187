"""Robustness to missing modality information: the noise protocol of LNLN (NeurIPS 2024) applied to
trained checkpoints, as a curve over missing rates.

Noise at missing rate r, applied to the modalities asked for:
  text    each token other than [CLS] (position 0) and the last real token (the last position whose
          attention mask is 1, i.e. [SEP]) becomes the checkpoint tokenizer's [UNK] id with
          probability r; attention mask, segment ids and padding positions are left as they are;
  audio,  each frame inside the valid length (index < ``audio_lengths`` / ``vision_lengths``) is
  vision  zeroed (its whole feature vector) with probability r; padding frames are left alone.
The masks are drawn for the whole split at once from a NumPy generator seeded by
``SeedSequence([seed, round(rate * 10**6), modality index])``: a sample's mask depends only on its
index in the split, not on the batch size, the model or the other modalities, so every checkpoint
scored with the same seeds sees the same noise. Rate 0 is scored once, on the clean split, and
gives exactly the metrics of :func:`almt_pipeline.evaluate.evaluate`. A ``w/o <modality>`` row
removes one modality whole (its rate 1, the others clean): deterministic, scored once, std 0.

Files written to ``out_dir`` (default ``./robustness``):
  robustness.csv   long format, one row per (model, condition, metric): ``model`` (display name:
                   the run folder's name, made unique), ``condition`` (the rate as written in the
                   JSON, ``w/o <modality>``, or ``average`` for the mean over rates), ``rate`` (empty
                   for w/o and average rows), ``seeds`` (``;``-separated, empty when scored once),
                   ``metric``, ``mean``, ``std`` (population std over seeds; empty for average);
  robustness.json  the settings (checkpoints, data, split, n, rates, seeds, modalities) and per
                   model every condition's per-seed metrics, mean and std, and the average over
                   rates (non-finite values as null);
  robustness.png   MAE and Acc-2 against the missing rate, one line per model, band: +- std.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .batches import Split, amp_dtype, predict_split
from .config import parse_seed_list
from .errors import CheckpointError, ConfigError, FeatureFileError
from .evaluate import load_scored_split
from .files import atomic_write, atomic_write_csv, atomic_write_json, check_writable
from .metrics import HEADLINE_METRICS, canonical_scale, split_metrics
from .model.checkpoint import LoadedCheckpoint, read_checkpoint_config, recover_dir
from .schema import check_split
from .utils import resolve_device, results_log

logger = logging.getLogger(__name__)

MODALITIES = ("text", "audio", "vision")  # the index of a modality is part of its noise seed
DEFAULT_RATES = tuple(i / 10 for i in range(10))  # 0.0, 0.1, ..., 0.9
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_OUT = Path("robustness")
RATE_DECIMALS = 6  # rates are rounded to this many decimals; the noise seed holds round(rate * 10**6)
MAX_RATES = 1001  # a START:STOP:STEP range longer than this is a typing slip
CSV_COLUMNS = ("model", "condition", "rate", "seeds", "metric", "mean", "std")

Masks = dict[str, np.ndarray]  # modality -> (N, L) tokens or (N, T) frames, True where replaced


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def parse_rates(text: str, what: str = "rates") -> list[float]:
    """``START:STOP:STEP`` (stop included) or comma-separated rates -> sorted distinct rates in [0, 1]."""
    usage = f"{what} expects START:STOP:STEP (e.g. 0:0.9:0.1) or comma-separated rates (e.g. 0,0.3,0.6), got {text!r}"
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if not (math.isfinite(start) and math.isfinite(stop) and math.isfinite(step)) or step <= 0:
                raise ValueError
            count = math.floor((stop - start) / step + 1e-9) + 1
            if count < 1 or count > MAX_RATES:
                raise ConfigError(f"{what}: {text!r} gives {max(count, 0)} rates (1 to {MAX_RATES} allowed)")
            values = [start + i * step for i in range(count)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except (ValueError, OverflowError):  # OverflowError: a step so small the count is infinite
        raise ConfigError(usage) from None
    if not values:
        raise ConfigError(usage)
    return check_rates(values, what)


def check_rates(rates: Iterable[float], what: str = "rates") -> list[float]:
    """Rates rounded to ``RATE_DECIMALS``, sorted, duplicates dropped; each must lie in [0, 1]."""
    out = set()
    for r in rates:
        try:
            value = round(float(r), RATE_DECIMALS) + 0.0  # + 0.0: -0.0 -> 0.0
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(r, (bool, str)) or not 0.0 <= value <= 1.0:  # NaN fails the comparison
            raise ConfigError(f"{what}: each missing rate must lie in [0, 1], got {r!r}")
        if value == 0.0 and float(r) != 0.0:
            raise ConfigError(f"{what}: rates are used to {RATE_DECIMALS} decimals; {r!r} would be 0 (no noise)")
        out.add(value)
    if not out:
        raise ConfigError(f"{what}: no missing rate given")
    return sorted(out)


def parse_seeds(text: str, what: str = "seeds") -> list[int]:
    """Comma-separated non-negative integers (duplicates dropped, order kept)."""
    return check_seeds(parse_seed_list(text, what), what)


def check_seeds(seeds: Iterable[int], what: str = "seeds") -> list[int]:
    out: list[int] = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ConfigError(f"{what}: noise seeds must be non-negative integers, got {s!r}")
        if int(s) not in out:
            out.append(int(s))
    if not out:
        raise ConfigError(f"{what}: no noise seed given")
    return out


def parse_modalities(text: str, what: str = "modalities") -> tuple[str, ...]:
    """A comma-separated subset of text,audio,vision (returned in that order)."""
    return check_modalities([m.strip() for m in text.split(",") if m.strip()], what)


def check_modalities(modalities: Iterable[str], what: str = "modalities") -> tuple[str, ...]:
    given = list(modalities)
    unknown = [m for m in given if m not in MODALITIES]
    if unknown or not given:
        raise ConfigError(f"{what} must be a comma-separated subset of {','.join(MODALITIES)}, "
                          f"got {','.join(given) or 'nothing'!r}")
    return tuple(m for m in MODALITIES if m in given)


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


def eligible_masks(split: Split, modalities: Sequence[str] = MODALITIES) -> Masks:
    """Positions the noise may replace: real tokens except [CLS] and the last real token; frames
    inside the valid length."""
    text_bert, audio, vision, a_len, v_len = split.inputs
    out: Masks = {}
    if "text" in modalities:
        real = text_bert[:, 1, :].numpy() > 0.5  # (N, L) attention mask
        n_pos = real.shape[1]
        pos = np.arange(n_pos)[None, :]  # (1, L)
        last = np.where(real.any(axis=1), n_pos - 1 - np.argmax(real[:, ::-1], axis=1), -1)  # (N,)
        out["text"] = real & (pos != 0) & (pos != last[:, None])
    for name, feats, lengths in (("audio", audio, a_len), ("vision", vision, v_len)):
        if name in modalities:
            out[name] = np.arange(feats.shape[1])[None, :] < lengths.numpy()[:, None]  # (N, T)
    return out


def noise_masks(split: Split, rate: float, seed: int, modalities: Sequence[str] = MODALITIES) -> Masks:
    """The positions replaced at missing ``rate`` with noise seed ``seed`` (see the module docstring)."""
    rate = check_rates([rate])[0]
    seed = check_seeds([seed])[0]
    out: Masks = {}
    for name, eligible in eligible_masks(split, check_modalities(modalities)).items():
        entropy = [seed, round(rate * 10**RATE_DECIMALS), MODALITIES.index(name)]
        draw = np.random.default_rng(np.random.SeedSequence(entropy)).random(eligible.shape)  # (N, L|T)
        out[name] = eligible & (draw < rate)
    return out


def apply_masks(split: Split, masks: Mapping[str, np.ndarray], unk_id: int | None) -> Split:
    """A new Split with the masked tokens set to ``unk_id`` and the masked frames zeroed."""
    text_bert, audio, vision, a_len, v_len = split.inputs
    if "text" in masks:
        if unk_id is None:
            raise ValueError("text noise needs an [UNK] token id")
        text_bert = text_bert.clone()  # (N, 3, L)
        text_bert[:, 0, :][torch.from_numpy(masks["text"])] = float(unk_id)
    if "audio" in masks:
        audio = audio.clone()  # (N, T_a, d_a)
        audio[torch.from_numpy(masks["audio"])] = 0.0
    if "vision" in masks:
        vision = vision.clone()  # (N, T_v, d_v)
        vision[torch.from_numpy(masks["vision"])] = 0.0
    return replace(split, inputs=(text_bert, audio, vision, a_len, v_len))


def apply_noise(split: Split, rate: float, seed: int, modalities: Sequence[str], unk_id: int | None) -> Split:
    """``split`` with LNLN noise at missing ``rate`` on ``modalities`` (the input is not modified)."""
    return apply_masks(split, noise_masks(split, rate, seed, modalities), unk_id)


def remove_modality(split: Split, modality: str, unk_id: int | None) -> Split:
    """``split`` without ``modality``: every eligible token [UNK] or every valid frame zeroed."""
    return apply_masks(split, eligible_masks(split, check_modalities([modality])), unk_id)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def display_names(checkpoints: Sequence[str | os.PathLike]) -> list[str]:
    """Each checkpoint's run folder name (its own name when not called ``checkpoint``), made unique
    with ``-2``, ``-3``, ..."""
    names: list[str] = []
    for c in checkpoints:
        path = Path(os.path.abspath(c))
        base = (path.parent.name if path.name == "checkpoint" else path.name) or str(path)
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def robustness(checkpoints: Sequence[str | os.PathLike], data_path: str | os.PathLike, *, split: str = "test",
               rates: Sequence[float] = DEFAULT_RATES, seeds: Sequence[int] = DEFAULT_SEEDS,
               modalities: Sequence[str] = MODALITIES, out_dir: str | os.PathLike | None = None,
               device: str = "auto", batch_size: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Score each checkpoint on ``split`` under noise at each rate and seed, and without each
    modality; log a table per checkpoint and write the CSV, JSON and PNG into ``out_dir``
    (default ``./robustness``). Returns what the JSON holds."""
    check_split(split)
    rate_list, seed_list = check_rates(rates), check_seeds(seeds)
    mods = check_modalities(modalities)
    if not checkpoints:
        raise ConfigError("no checkpoint to score")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    for c in checkpoints:  # a mistyped second checkpoint fails now, not after the first is scored
        _check_checkpoint_dir(Path(c))
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    check_writable(out, folder=True)
    dev = resolve_device(device)
    names = display_names(checkpoints)
    per_model = sum(1 if r == 0 else len(seed_list) for r in rate_list) + len(mods)
    start = time.perf_counter()
    models = []
    bar: tqdm | None = None  # started once the first checkpoint and split have loaded
    try:
        for name, ckpt_dir in zip(names, checkpoints):
            ckpt, clean = _load(Path(ckpt_dir), Path(data_path), split, dev)
            if bar is None:
                bar = tqdm(total=per_model * len(checkpoints), desc="robustness", unit="eval", disable=quiet)
            models.append(_score_checkpoint(name, Path(ckpt_dir), ckpt, clean, rate_list, seed_list, mods, dev,
                                            batch_size, bar))
            del ckpt
    finally:
        if bar is not None:
            bar.close()
    result: dict[str, Any] = {
        "data": str(data_path), "split": split, "n": models[0]["n"], "rates": rate_list, "seeds": seed_list,
        "modalities": list(mods), "device": str(dev), "checkpoints": [str(c) for c in checkpoints],
        "std": "population (ddof=0) over seeds", "models": models,
        "time_s": round(time.perf_counter() - start, 3),
    }
    for m in models:
        results_log.info("%s", format_table(m, result))
    write_results(out, result)
    results_log.info("%d evaluations in %.1f s; wrote robustness.csv, robustness.json and robustness.png to %s",
                     per_model * len(checkpoints), result["time_s"], out)
    return result


def _check_checkpoint_dir(path: Path) -> None:
    """What :func:`load_checkpoint` checks first: the folder and its config.json."""
    if not path.exists():
        recover_dir(path, cleanup=False)  # an interrupted replacement of the checkpoint
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    read_checkpoint_config(path)


def _load(ckpt_dir: Path, data_path: Path, split: str, dev: torch.device) -> tuple[LoadedCheckpoint, Split]:
    """The checkpoint and the split, with :func:`almt_pipeline.evaluate.evaluate`'s checks."""
    ckpt, s = load_scored_split(ckpt_dir, data_path, split, dev)
    if not s.labelled:
        raise FeatureFileError(f"{data_path}: the {split} split has no labels for some or all samples; "
                               "robustness needs a labelled split")
    return ckpt, s


def _score_checkpoint(name: str, ckpt_dir: Path, ckpt: LoadedCheckpoint, clean: Split, rates: list[float],
                      seeds: list[int], mods: tuple[str, ...], dev: torch.device, batch_size: int | None,
                      bar: tqdm) -> dict[str, Any]:
    unk_id = ckpt.tokenizer.unk_token_id
    if "text" in mods and unk_id is None:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint's tokenizer has no [UNK] token; text noise needs one")
    bs = ckpt.cfg.train.eval_batch_size if batch_size is None else batch_size
    amp = amp_dtype(ckpt.cfg.train.amp, dev) if dev.type == "cuda" else None
    labels = clean.labels.numpy()  # (N,)
    bar.set_postfix_str(name)

    def score(s: Split) -> dict[str, float]:
        metrics = split_metrics(predict_split(ckpt.model, s, bs, dev, amp, quiet=True), labels, ckpt.label_scale)
        bar.update(1)
        return metrics

    conditions = []
    for rate in rates:
        if rate == 0:  # no noise: one clean evaluation
            conditions.append(_condition(str(rate), rate, None, [], [score(clean)]))
        else:
            runs = [score(apply_noise(clean, rate, seed, mods, unk_id)) for seed in seeds]
            conditions.append(_condition(str(rate), rate, None, seeds, runs))
    absent = [m for m in mods if m in ckpt.cfg.model.drop_modalities]  # the model never sees them
    for m in mods:
        if m in absent:
            bar.update(1)
            continue
        conditions.append(_condition(f"w/o {m}", None, m, [], [score(remove_modality(clean, m, unk_id))]))
    keys = list(conditions[0]["mean"])
    rate_rows = [c for c in conditions if c["rate"] is not None]
    average = {k: float(np.mean([c["mean"][k] for c in rate_rows])) for k in keys}
    return {
        "name": name, "checkpoint": str(ckpt_dir), "label_scale": ckpt.label_scale, "n": clean.n,
        "batch_size": bs, "unk_id": unk_id, "conditions": conditions, "average": average,
        "absent_modalities": absent,  # built without them (model.drop_modalities): noise on them changes nothing
    }


def _condition(label: str, rate: float | None, removed: str | None, seeds: list[int],
               runs: list[dict[str, float]]) -> dict[str, Any]:
    values = {k: np.array([r[k] for r in runs], dtype=np.float64) for k in runs[0]}
    return {
        "condition": label, "rate": rate, "removed": removed, "seeds": list(seeds), "per_seed": runs,
        "mean": {k: float(v.mean()) for k, v in values.items()},
        "std": {k: float(v.std()) for k, v in values.items()},
    }


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def format_table(model: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    """One model's conditions as a text table (mean +- std), then the average over rates."""
    columns = HEADLINE_METRICS[canonical_scale(model["label_scale"])]
    width = 18  # " 0.1234 ± 0.0123" with room for a minus sign
    lines = [
        f"robustness of {model['name']} ({model['checkpoint']}) on the {result['split']} split "
        f"({model['n']} samples); noise on {', '.join(result['modalities'])}; "
        f"seeds {','.join(str(s) for s in result['seeds'])}; mean ± std"
        + (f" (the model has no {' and no '.join(model['absent_modalities'])}: noise there changes nothing)"
           if model.get("absent_modalities") else ""),
        f"{'condition':<12}" + "".join(f" {head:<{width - 1}}" for _, head in columns).rstrip(),
    ]
    for c in model["conditions"]:
        cells = [f"{c['mean'][k]:7.4f} ± {c['std'][k]:.4f}" for k, _ in columns]
        lines.append(f"{c['condition']:<12}" + "".join(f"{cell:<{width}}" for cell in cells).rstrip())
    cells = [f"{model['average'][k]:7.4f}" for k, _ in columns]
    lines.append(f"{'average':<12}" + "".join(f"{cell:<{width}}" for cell in cells).rstrip())
    return "\n".join(lines)


def write_results(out_dir: Path, result: Mapping[str, Any]) -> None:
    """robustness.csv, robustness.json and robustness.png in ``out_dir`` (atomic writes)."""
    rows = []
    for m in result["models"]:
        for c in m["conditions"]:
            seeds = ";".join(str(s) for s in c["seeds"])
            rate = "" if c["rate"] is None else c["rate"]
            rows += [[m["name"], c["condition"], rate, seeds, k, _csv_number(c["mean"][k]), _csv_number(c["std"][k])]
                     for k in c["mean"]]
        seeds = ";".join(str(s) for s in result["seeds"])
        rows += [[m["name"], "average", "", seeds, k, _csv_number(v), ""] for k, v in m["average"].items()]
    atomic_write_csv(out_dir / "robustness.csv", CSV_COLUMNS, rows)
    atomic_write_json(out_dir / "robustness.json", _finite_or_null(result))
    plot_robustness(out_dir / "robustness.png", result)


def _csv_number(v: float) -> str:
    return f"{v:.6f}" if math.isfinite(v) else "nan"


def _finite_or_null(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def plot_robustness(path: str | os.PathLike, result: Mapping[str, Any]) -> None:
    """Two panels, MAE and Acc-2 against the missing rate: one line per model, band: mean +- std."""
    from matplotlib.figure import Figure  # heavy: imported only when the picture is drawn

    fig = Figure(figsize=(11, 4))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.85, wspace=0.22)
    ax_mae, ax_acc = fig.subplots(1, 2)
    acc_keys = set()
    for i, m in enumerate(result["models"]):
        acc_key = {t: k for k, t in HEADLINE_METRICS[canonical_scale(m["label_scale"])]}["Acc-2"]
        acc_keys.add(acc_key)
        rows = [c for c in m["conditions"] if c["rate"] is not None]
        x = np.array([c["rate"] for c in rows])  # (R,)
        for ax, key in ((ax_mae, "MAE"), (ax_acc, acc_key)):
            mean = np.array([c["mean"][key] for c in rows])  # (R,)
            std = np.array([c["std"][key] for c in rows])  # (R,)
            ax.plot(x, mean, marker="o", ms=3, color=f"C{i}", label=m["name"])
            ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2, lw=0)
    acc_title = f"Acc-2 ({acc_keys.pop()})" if len(acc_keys) == 1 else "Acc-2"
    for ax, title in ((ax_mae, "MAE (lower is better)"), (ax_acc, acc_title)):
        ax.set_title(title)
        ax.set_xlabel("missing rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{result['split']} split ({result['n']} samples), noise on {', '.join(result['modalities'])}; "
                 f"band: ± std over {len(result['seeds'])} seed(s)", fontsize="medium")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
