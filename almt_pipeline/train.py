"""Training and evaluation of ALMT on MMSA-format feature files.

``train`` runs the released protocol (AdamW on all parameters, MSE on ``regression_labels``,
per-epoch linear warm-up then cosine annealing) and selects the checkpoint on a *validation*
metric. Every epoch it logs train loss and valid/test metrics (``log.jsonl``, ``log.csv``),
saves the selected epoch's checkpoint when it improves and the full training state for
``resume``. Run directory::

    RUN_DIR/run.json        config + data path of the run (checked on resume)
    RUN_DIR/checkpoint/     selected epoch (model/checkpoint.py format)
    RUN_DIR/last/state.pt   resume state: weights, optimizer, scheduler, RNG states, history
    RUN_DIR/log.jsonl, log.csv, curves.png, summary.json

With several seeds each seed gets ``RUN_DIR/seed_<s>/`` with that layout, and ``RUN_DIR`` holds
the mean +- std summary, the overlaid curves and a copy of the best seed's checkpoint.

``evaluate`` scores a checkpoint on one split of a feature file and can write per-sample
predictions.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .errors import ConfigError, FeatureFileError, TrainingError
from .utils import atomic_write, atomic_write_json, package_version, resolve_device, results_log, set_seed
from .utils import first_line as _first_line

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATE_FILE = Path("last") / "state.pt"
CHECKPOINT_DIR = "checkpoint"
SUMMARY_FILE = "summary.json"
STATE_VERSION = 1
# metrics shown on the per-epoch console line (when the data has them)
_BRIEF_KEYS = ("MAE", "Corr", "Non0_acc_2", "Mult_acc_2", "Mult_acc_7")
# reference-style test table: a paired metric is read from the epoch where its anchor metric is best
_PAIRED = {"Has0_F1_score": "Has0_acc_2", "Non0_F1_score": "Non0_acc_2", "Corr": "MAE",
           "F1_score": "Mult_acc_2"}
_INPUT_KEYS = ("text_bert", "audio", "vision", "audio_lengths", "vision_lengths")


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------


def lr_factor(epoch_index: int, epochs: int, warmup_ratio: float) -> float:
    """Multiplier of the base lr for the epoch with 0-based index ``epoch_index``.

    Linear warm-up from 0 over the first ``W = int(warmup_ratio * epochs)`` epochs, then cosine
    annealing over the remaining ``epochs - W`` (epoch index W runs at the full lr).
    """
    warmup = int(warmup_ratio * epochs)
    if epoch_index < warmup:
        return epoch_index / warmup
    t_max = max(epochs - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch_index - warmup) / t_max))


def lr_at_epoch(epoch: int, epochs: int, warmup_ratio: float, lr: float) -> float:
    """Learning rate used during (1-based) ``epoch``."""
    return lr * lr_factor(epoch - 1, epochs, warmup_ratio)


def make_scheduler(optimizer: torch.optim.Optimizer, epochs: int, warmup_ratio: float):
    """LambdaLR stepped once per epoch after the epoch's batches."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, epochs=epochs, warmup_ratio=warmup_ratio)
    )


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class _Split:
    name: str
    ids: np.ndarray  # (N,) str
    inputs: tuple[torch.Tensor, ...]  # text_bert (N,3,L), audio (N,T_a,d_a), vision (N,T_v,d_v), lengths (N,) x2
    labels: torch.Tensor  # (N,) float32, NaN when unlabelled

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> bool:
        return self.n > 0 and bool(torch.isfinite(self.labels).all())


class _BatchDataset(Dataset):
    """Indexable by a list of sample indices: returns whole batches by tensor indexing."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(idx, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


def _make_loader(split: _Split, batch_size: int, generator: torch.Generator | None, pin: bool) -> DataLoader:
    """Shuffled (seeded ``generator``) or sequential batches of (inputs..., labels)."""
    ds = _BatchDataset((*split.inputs, split.labels))
    base = RandomSampler(ds, generator=generator) if generator is not None else SequentialSampler(ds)
    sampler = BatchSampler(base, batch_size=batch_size, drop_last=False)
    return DataLoader(ds, sampler=sampler, batch_size=None, generator=generator, pin_memory=pin)


def _to_split(name: str, arrays: dict[str, np.ndarray]) -> _Split:
    def tensor(key: str, dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arrays[key], dtype=dtype))

    inputs = (
        tensor("text_bert", np.float32),  # (N, 3, L)
        tensor("audio", np.float32),  # (N, T_a, d_a)
        tensor("vision", np.float32),  # (N, T_v, d_v)
        tensor("audio_lengths", np.int64),  # (N,)
        tensor("vision_lengths", np.int64),  # (N,)
    )
    n = len(arrays["id"])
    labels = (
        tensor("regression_labels", np.float32).reshape(-1)
        if "regression_labels" in arrays
        else torch.full((n,), float("nan"))
    )  # (N,)
    return _Split(name=name, ids=arrays["id"], inputs=inputs, labels=labels)


def _feature_schema(data: Any) -> dict:
    """Feature meta stored in checkpoints: the file's meta (minus per-clip provenance) + shapes."""
    meta = {k: v for k, v in dict(data.meta).items()
            if k not in ("sources", "transcript_sources", "face_fraction")}
    dims = data.dims
    meta["lengths"] = {"text": dims["text_len"], "audio": dims["audio_len"], "vision": dims["vision_len"]}
    meta["dims"] = {"text": dims["text_dim"], "audio": dims["audio_dim"], "vision": dims["vision_dim"]}
    return json.loads(json.dumps(meta, default=str))  # plain JSON values only


# ---------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if device.type != "cuda":
        logger.warning("amp=%s is only used on CUDA; training in float32 on %s", amp, device)
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _forward(model, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
    text_bert, audio, vision, a_len, v_len = (t.to(device, non_blocking=True) for t in batch)
    return model(text_bert, audio, vision, audio_lengths=a_len, vision_lengths=v_len)  # (B,)


@torch.no_grad()
def _predict(model, split: _Split, batch_size: int, device: torch.device, amp: torch.dtype | None,
             quiet: bool = True) -> np.ndarray:
    """Predictions (N,) float32 in sample order."""
    model.eval()
    loader = _make_loader(split, batch_size, None, pin=device.type == "cuda")
    out = []
    from tqdm.auto import tqdm

    for batch in tqdm(loader, desc=f"predict {split.name}", unit="batch", leave=False, disable=quiet):
        with _autocast(device, amp):
            pred = _forward(model, batch[:-1], device)  # (B,)
        out.append(pred.float().reshape(-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def _metrics(pred: np.ndarray, truth: np.ndarray, scale: str) -> dict[str, float]:
    from .metrics import regression_metrics

    m = {k: float(v) for k, v in regression_metrics(pred, truth, scale).items()}
    m["Loss"] = float(np.mean((pred.astype(np.float64) - truth.astype(np.float64)) ** 2))
    return m


def _train_epoch(model, loader, optimizer, scaler, amp, device, grad_clip, epoch: int, epochs: int,
                 desc: str, quiet: bool) -> float:
    """One pass over the training batches; returns the mean MSE per sample."""
    from tqdm.auto import tqdm

    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"{desc}epoch {epoch}/{epochs}", unit="batch", leave=False, disable=quiet)
    for b, batch in enumerate(bar, 1):
        y = batch[-1].to(device, non_blocking=True)  # (B,)
        with _autocast(device, amp):
            pred = _forward(model, batch[:-1], device)  # (B,)
        loss = F.mse_loss(pred.float().reshape(-1), y)
        value = float(loss.item())
        if not math.isfinite(value):
            raise TrainingError(
                f"training loss is {value} at epoch {epoch}, batch {b}: lower the learning rate, "
                "set train.grad_clip, or check the features for extreme values"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        total += value * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    bar.close()
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Reproducibility and resume state
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels where torch has them (restored afterwards)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    prev_bench = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark = prev_bench


def _rng_state(loader_gen: torch.Generator) -> dict:
    """All RNG states as weights_only-loadable values (tensors, lists, numbers, strings)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [str(np_name), torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_gen.get_state(),
    }


def _set_rng_state(state: dict, loader_gen: torch.Generator) -> None:
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning("saved CUDA RNG states are for %d device(s); not restored", len(state["cuda"]))
    loader_gen.set_state(state["loader"])


def _save_state(path: Path, state: dict) -> None:
    """torch.save to a temporary file next to ``path``, then rename (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def _load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors of many kinds
        raise TrainingError(f"{path}: cannot read the resume state ({_first_line(e)})") from e
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise TrainingError(f"{path}: not a resume state of this version of almt-pipeline")
    return state


# ---------------------------------------------------------------------------------------------
# Run directory, logs, plots
# ---------------------------------------------------------------------------------------------


def load_run_config(run_dir: str | os.PathLike):
    """The Config a run directory was started with (for resuming without repeating options)."""
    from .config import config_from_dict

    path = Path(run_dir) / RUN_FILE
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        return config_from_dict(run["config"], source=str(path))
    except FileNotFoundError as e:
        raise TrainingError(f"{path}: not found ({run_dir} is not a training run directory)") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainingError(f"{path}: unreadable run file ({_first_line(e)})") from e


def _check_run_dir(run_dir: Path, cfg, data_path: Path, resume: bool):
    """Refuse to overwrite a run; on resume return the run's own Config (else None).

    A resumed run keeps the config it was started with (that is what makes its numbers equal
    to an uninterrupted run); differing settings passed now are reported and ignored.
    """
    from .config import config_to_dict

    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"{run_dir}: exists and is not a directory; choose another --out")
    has_files = run_dir.is_dir() and any(run_dir.iterdir())
    if not resume:
        if has_files:
            raise TrainingError(
                f"{run_dir}: output directory exists and is not empty; use --resume to continue "
                "that run or choose another --out"
            )
        return None
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        if has_files:
            raise TrainingError(f"{run_dir}: cannot resume: no {RUN_FILE} (not a training run directory)")
        logger.info("%s: nothing to resume; starting a new run", run_dir)
        return None
    saved = load_run_config(run_dir)
    diff = _dict_diff(config_to_dict(saved), config_to_dict(cfg))
    if diff:
        shown = ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
        logger.warning("%s: resuming with the run's own config; ignoring the differing settings "
                       "given now (%s)", run_dir, shown)
    old_data = json.loads(run_file.read_text(encoding="utf-8")).get("data")
    if old_data and Path(old_data).resolve() != data_path.resolve():
        logger.warning("%s: the run was started on %s; resuming on %s", run_dir, old_data, data_path)
    return saved


def _dict_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _dict_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def _write_logs(run_dir: Path, history: list[dict]) -> None:
    """Rewrite log.jsonl and log.csv from the full history (atomic, so always consistent)."""
    lines = "".join(json.dumps(r) + "\n" for r in history)
    with atomic_write(run_dir / "log.jsonl", "w") as f:
        f.write(lines)
    columns = ["epoch", "lr", "train_loss"]
    for part in ("valid", "test"):
        keys: list[str] = []
        for r in history:
            keys += [k for k in r.get(part, {}) if k not in keys]
        columns += [f"{part}_{k}" for k in keys]
    columns += ["selected", "time_s"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in history:
        flat = {"epoch": r["epoch"], "lr": r["lr"], "train_loss": r["train_loss"],
                "selected": int(r["improved"]), "time_s": round(r["time_s"], 3)}
        for part in ("valid", "test"):
            flat.update({f"{part}_{k}": v for k, v in r.get(part, {}).items()})
        writer.writerow([flat.get(c, "") for c in columns])
    with atomic_write(run_dir / "log.csv", "w") as f:
        f.write(buf.getvalue())


def plot_curves(path: str | os.PathLike, histories: dict[str, list[dict]]) -> None:
    """Learning curves PNG: train/valid/test loss, valid/test MAE and lr per epoch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    ax_loss, ax_mae, ax_lr = fig.subplots(1, 3)
    several = len(histories) > 1
    for i, (label, history) in enumerate(histories.items()):
        if not history:
            continue
        ep = [r["epoch"] for r in history]
        tag = f"{label} " if several else ""
        color = {"color": f"C{i}"} if several else {}
        ax_loss.plot(ep, [r["train_loss"] for r in history], label=f"{tag}train", **color)
        for part, style in (("valid", "--"), ("test", ":")):
            if any("Loss" in r.get(part, {}) for r in history):
                ax_loss.plot(ep, [r.get(part, {}).get("Loss", np.nan) for r in history], style,
                             label=f"{tag}{part}", **color)
            if any("MAE" in r.get(part, {}) for r in history):
                ax_mae.plot(ep, [r.get(part, {}).get("MAE", np.nan) for r in history], style,
                            label=f"{tag}{part}", **color)
        selected = [r["epoch"] for r in history if r.get("improved")]
        if selected:
            ax_mae.axvline(selected[-1], color=color.get("color", "grey"), lw=0.8, alpha=0.6)
        ax_lr.plot(ep, [r["lr"] for r in history], label=label if several else None, **color)
    titles = ((ax_loss, "loss (MSE)"), (ax_mae, "MAE (vertical line: selected epoch)"), (ax_lr, "learning rate"))
    for ax, title in titles:
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def _is_better(metric: str, new: float, best: float | None) -> bool:
    from .metrics import LOWER_IS_BETTER

    if best is None:
        return True
    if not math.isfinite(new):
        return False
    if not math.isfinite(best):
        return True
    return new < best if metric in LOWER_IS_BETTER else new > best


def _brief(metrics: dict[str, float], select: str) -> str:
    keys = [select] + [k for k in _BRIEF_KEYS if k != select]
    return " ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


def _format_table(metrics: dict[str, float]) -> str:
    try:
        from .metrics import format_metrics

        return format_metrics(metrics)
    except ImportError:
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def best_per_metric_on_test(history: list[dict], select_lower: set[str] | None = None) -> dict[str, dict]:
    """Reference-style best value per metric over all epochs on TEST (test-selected: optimistic).

    F1 scores are read from the epoch of their accuracy's best, Corr from the best MAE's epoch,
    as the released code reports them.
    """
    from .metrics import LOWER_IS_BETTER

    lower = LOWER_IS_BETTER if select_lower is None else select_lower
    rows = [r for r in history if r.get("test")]
    if not rows:
        return {}
    best_epoch: dict[str, dict] = {}
    for key in rows[0]["test"]:
        values = [(r["test"][key], r) for r in rows if math.isfinite(r["test"].get(key, math.nan))]
        if not values:
            continue
        pick = min(values, key=lambda v: v[0]) if key in lower else max(values, key=lambda v: v[0])
        best_epoch[key] = pick[1]
    table = {}
    for key in rows[0]["test"]:
        anchor = _PAIRED.get(key) if _PAIRED.get(key) in best_epoch else key
        if anchor not in best_epoch:
            continue
        r = best_epoch[anchor]
        table[key] = {"value": r["test"][key], "epoch": r["epoch"]}
    return table


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(cfg, data_path, out_dir, *, device: str = "auto", resume: bool = False, quiet: bool = False,
          show_test_selected: bool = False) -> dict:
    """Train ALMT on ``data_path`` into ``out_dir``; returns the run summary (also summary.json).

    The checkpoint is selected on ``cfg.train.select_metric`` computed on the validation split;
    its test metrics are reported. ``cfg.train.seeds`` runs each seed in ``seed_<s>/`` and
    reports mean +- std. ``resume`` continues an interrupted run from its last finished epoch
    and gives the same numbers as an uninterrupted run on the same device.
    """
    from .config import config_to_dict
    from .features import load_features

    run_dir = Path(out_dir)
    data_path = Path(data_path)
    dev = resolve_device(device)
    saved_cfg = _check_run_dir(run_dir, cfg, data_path, resume)
    resuming = saved_cfg is not None
    cfg = saved_cfg or cfg
    t = cfg.train
    seeds = list(t.seeds) if t.seeds else None
    if seeds and len(set(seeds)) != len(seeds):
        raise ConfigError(f"train.seeds lists a seed twice: {seeds}")

    # train and valid must be present and labelled; test is optional (metrics only when labelled)
    data = load_features(data_path, model_cfg=cfg.model, label_scale=t.label_scale, splits=None,
                         require_labels=False)
    scale = data.label_scale
    splits = {name: _to_split(name, arrays) for name, arrays in data.splits.items()}
    for name in ("train", "valid"):
        if name not in splits or splits[name].n == 0:
            raise TrainingError(f"{data_path}: no {name} samples; training needs labelled train and valid splits")
        if not splits[name].labelled:
            raise TrainingError(f"{data_path}: the {name} split has samples without labels; "
                                "training needs labelled train and valid splits")
    if "test" not in splits or not splits["test"].labelled:
        logger.warning("%s: no labelled test split; only validation metrics are reported", data_path)
    _check_select_metric(t.select_metric, scale, splits["valid"])
    file_text_model = data.meta.get("text_model")
    if file_text_model and file_text_model != cfg.model.text_model:
        logger.warning(
            "%s: features were tokenized for text model %r but the config trains %r; make sure "
            "they share a vocabulary", data_path, file_text_model, cfg.model.text_model,
        )
    feature_meta = _feature_schema(data)
    del data

    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        atomic_write_json(run_dir / RUN_FILE, {
            "config": config_to_dict(cfg), "data": str(data_path.resolve()),
            "package_version": package_version(), "device": str(dev),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        })
    common = dict(splits=splits, scale=scale, feature_meta=feature_meta, device=dev, resume=resuming,
                  quiet=quiet, show_test_selected=show_test_selected)
    try:
        with _deterministic(dev):
            if not seeds:
                return _train_seed(cfg, t.seed, run_dir, **common)
            summaries = {}
            for seed in seeds:
                summaries[seed] = _train_seed(cfg, seed, run_dir / f"seed_{seed}", desc=f"seed {seed} ",
                                              **common)
            return _summarise_seeds(cfg, run_dir, summaries, scale, quiet)
    except KeyboardInterrupt:
        logger.warning("interrupted: the last finished epoch is saved; continue with --resume --out %s", run_dir)
        raise


def _check_select_metric(name: str, scale: str, valid: _Split) -> None:
    probe = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
    with np.errstate(all="ignore"):
        known = _metrics(probe, probe[::-1].copy(), scale)
    if name not in known:
        raise ConfigError(
            f"train.select_metric {name!r} is not a metric for label scale {scale} "
            f"(choose from {', '.join(known)})"
        )
    if not valid.labelled:
        raise TrainingError("the valid split has missing labels; it cannot select the checkpoint")


def _check_token_ids(splits: dict[str, _Split], vocab_size: int, text_model: str) -> None:
    """Token ids beyond the text model's vocabulary mean the file was tokenized for another model."""
    top = max(int(s.inputs[0][:, 0].max()) for s in splits.values() if s.n)
    if top >= vocab_size:
        raise TrainingError(
            f"the feature file holds token id {top} but text model {text_model!r} has only {vocab_size} "
            "tokens: it was tokenized for another text model; pass the one used by `almt extract` "
            "with --text-model"
        )


def _build_model(cfg, device: torch.device):
    from .model.almt import ALMT
    from .model.text_encoder import load_text_model

    bert, tokenizer = load_text_model(cfg.model.text_model)
    text_dim = int(bert.config.hidden_size)
    model = ALMT(cfg.model, bert, text_dim).to(device)
    return model, tokenizer, bert.config.to_dict()


def _train_seed(cfg, seed: int, run_dir: Path, *, splits: dict[str, _Split], scale: str, feature_meta: dict,
                device: torch.device, resume: bool, quiet: bool, show_test_selected: bool,
                desc: str = "") -> dict:
    """Train one seed in ``run_dir``; returns its summary (also written to summary.json)."""
    from .model.checkpoint import save_checkpoint

    t = cfg.train
    state_path = run_dir / STATE_FILE
    state = _load_state(state_path) if resume and state_path.is_file() else None
    if state is not None and state["finished"]:
        logger.log(logging.INFO if desc else logging.WARNING,
                   "%s: this run already finished (epoch %d); nothing to resume", run_dir, state["epoch"])
        summary_file = run_dir / SUMMARY_FILE
        if summary_file.is_file():
            return json.loads(summary_file.read_text(encoding="utf-8"))
    run_dir.mkdir(parents=True, exist_ok=True)

    set_seed(seed)
    model, tokenizer, text_config = _build_model(cfg, device)
    _check_token_ids(splits, int(text_config["vocab_size"]), cfg.model.text_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = make_scheduler(optimizer, t.epochs, t.warmup_ratio)
    amp = _amp_dtype(t.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    loader_gen = torch.Generator()
    loader_gen.manual_seed(seed)
    pin = device.type == "cuda"
    train_loader = _make_loader(splits["train"], t.batch_size, loader_gen, pin)

    history: list[dict] = []
    best: dict[str, Any] = {"value": None, "epoch": 0, "valid": {}, "test": {}}
    bad_epochs, start = 0, 1
    stopped_early = False
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, best, bad_epochs = state["history"], state["best"], state["bad_epochs"]
        start = state["epoch"] + 1
        stopped_early = state["stopped_early"]
        _set_rng_state(state["rng"], loader_gen)
        logger.info("%s: resuming at epoch %d/%d", run_dir, start, t.epochs)

    select = t.select_metric
    line_level = logging.DEBUG if quiet else logging.INFO
    finished = state is not None and state["finished"]
    epoch = start - 1
    for epoch in range(start, t.epochs + 1):
        if finished:
            break
        t0 = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])
        train_loss = _train_epoch(model, train_loader, optimizer, scaler, amp, device, t.grad_clip,
                                  epoch, t.epochs, desc, quiet)
        record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": train_loss}
        for name in ("valid", "test"):
            split = splits.get(name)
            if split is not None and split.labelled:
                pred = _predict(model, split, t.eval_batch_size, device, amp)
                record[name] = _metrics(pred, split.labels.numpy(), scale)
        value = record["valid"][select]
        improved = _is_better(select, value, best["value"])
        if improved:
            best = {"value": value, "epoch": epoch, "valid": record["valid"], "test": record.get("test", {})}
            bad_epochs = 0
            save_checkpoint(
                run_dir / CHECKPOINT_DIR, model, cfg, tokenizer=tokenizer, text_config=text_config,
                feature_meta=feature_meta, label_scale=scale,
                extra={"epoch": epoch, "seed": seed, "select_metric": select, "valid": record["valid"],
                       "test": record.get("test", {}), "trained_on": str(device)},
            )
        else:
            bad_epochs += 1
        record["improved"] = improved
        record["time_s"] = time.perf_counter() - t0
        history.append(record)
        scheduler.step()
        stopped_early = t.patience is not None and bad_epochs >= t.patience
        finished = stopped_early or epoch == t.epochs
        _write_logs(run_dir, history)
        _save_state(state_path, {
            "version": STATE_VERSION, "epoch": epoch, "finished": finished, "stopped_early": stopped_early,
            "seed": seed, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
            "best": best, "bad_epochs": bad_epochs, "history": history, "rng": _rng_state(loader_gen),
        })
        test_part = f" | test {_brief(record['test'], select)}" if "test" in record else ""
        logger.log(line_level, "%sepoch %d/%d lr %.2e | train loss %.4f | valid %s%s%s (%.1fs)",
                   desc, epoch, t.epochs, lr, train_loss, _brief(record["valid"], select), test_part,
                   " *" if improved else "", record["time_s"])
        if stopped_early:
            logger.info("%searly stopping at epoch %d: valid %s did not improve for %d epochs",
                        desc, epoch, select, t.patience)
            break

    summary = {
        "seed": seed, "finished": True, "epochs": t.epochs, "epochs_run": len(history),
        "stopped_early": stopped_early, "select_metric": select, "label_scale": scale,
        "selected_epoch": best["epoch"], "selected_valid": best["value"],
        "valid": best["valid"], "test": best["test"], "checkpoint": str(run_dir / CHECKPOINT_DIR),
        "train_time_s": round(sum(r["time_s"] for r in history), 3), "device": str(device),
    }
    results_log.info("%sselected epoch %d by valid %s = %.4f", desc, best["epoch"], select, best["value"])
    if best["test"]:
        results_log.info("%stest metrics of the selected epoch: %s", desc, _format_table(best["test"]))
    if show_test_selected:
        table = best_per_metric_on_test(history)
        summary["test_selected_best_per_metric"] = table
        if table:
            results_log.info(
                "%sbest per metric over all epochs ON TEST (test-selected, optimistic; not a sound "
                "model selection):\n%s", desc,
                "\n".join(f"  {k:<16} {v['value']:.4f}  (epoch {v['epoch']})" for k, v in table.items()),
            )
    plot_curves(run_dir / "curves.png", {f"seed {seed}": history})
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _summarise_seeds(cfg, run_dir: Path, summaries: dict[int, dict], scale: str, quiet: bool) -> dict:
    """Mean +- std of the selected epochs' metrics over seeds; copy the best seed's checkpoint."""
    from .metrics import LOWER_IS_BETTER
    from .model.checkpoint import copy_checkpoint

    select = cfg.train.select_metric
    seeds = list(summaries)
    agg: dict[str, Any] = {}
    for part in ("valid", "test"):
        keys = [k for k in summaries[seeds[0]][part]]
        values = {k: np.array([summaries[s][part].get(k, np.nan) for s in seeds], dtype=np.float64) for k in keys}
        agg[f"{part}_mean"] = {k: float(v.mean()) for k, v in values.items()}
        agg[f"{part}_std"] = {k: float(v.std()) for k, v in values.items()}

    def key(s: int) -> float:
        v = summaries[s]["selected_valid"]
        v = v if v is not None and math.isfinite(v) else math.inf
        return v if select in LOWER_IS_BETTER else -v

    best_seed = min(seeds, key=key)
    copy_checkpoint(run_dir / f"seed_{best_seed}" / CHECKPOINT_DIR, run_dir / CHECKPOINT_DIR)
    summary = {
        "seeds": seeds, "select_metric": select, "label_scale": scale, "std": "population (ddof=0)",
        **agg, "best_seed": best_seed, "checkpoint": str(run_dir / CHECKPOINT_DIR),
        "per_seed": {str(s): summaries[s] for s in seeds},
    }
    histories = {}
    for s in seeds:
        state_path = run_dir / f"seed_{s}" / STATE_FILE
        histories[f"seed {s}"] = _load_state(state_path)["history"] if state_path.is_file() else []
    plot_curves(run_dir / "curves.png", histories)
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    if agg["test_mean"]:
        lines = "\n".join(
            f"  {k:<16} {agg['test_mean'][k]:.4f} ± {agg['test_std'][k]:.4f}" for k in agg["test_mean"]
        )
        results_log.info("test metrics over %d seeds (each selected by valid %s), mean ± std:\n%s",
                    len(seeds), select, lines)
    results_log.info("best seed by valid %s: %d (checkpoint copied to %s)", select, best_seed, run_dir / CHECKPOINT_DIR)
    return summary


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(checkpoint_dir, data_path, *, split: str = "test", predictions_path=None, device: str = "auto",
             batch_size: int = 128, quiet: bool = False) -> dict:
    """Score a checkpoint on one split; optionally write ``id,label,prediction`` CSV.

    An unlabelled split gives predictions only (``metrics`` is None).
    """
    from .features import SPLITS, load_features
    from .model.checkpoint import load_checkpoint

    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint_dir, dev)
    data = load_features(data_path, model_cfg=ckpt.cfg.model, splits=(split,), require_labels=False,
                         label_scale=ckpt.label_scale)
    _check_feature_names(ckpt.feature_meta, data.meta, Path(checkpoint_dir), Path(data_path))
    s = _to_split(split, data.splits[split])
    if data.label_scale != ckpt.label_scale:
        logger.warning("%s: label scale %s differs from the checkpoint's %s; using the checkpoint's",
                       data_path, data.label_scale, ckpt.label_scale)
    amp = _amp_dtype(ckpt.cfg.train.amp, dev) if dev.type == "cuda" else None
    pred = _predict(ckpt.model, s, batch_size, dev, amp, quiet=quiet)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir), "data": str(data_path), "split": split, "n": s.n,
        "label_scale": ckpt.label_scale, "metrics": None,
        "predictions_path": str(predictions_path) if predictions_path else None,
    }
    labels = s.labels.numpy()
    if s.labelled:
        result["metrics"] = _metrics(pred, labels, ckpt.label_scale)
        results_log.info("%s split (%d samples): %s", split, s.n, _format_table(result["metrics"]))
    else:
        results_log.info("%s split (%d samples) has no labels: predictions only", split, s.n)
    if predictions_path:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["id", "label", "prediction"])
        for i, y, p in zip(s.ids, labels, pred):
            writer.writerow([i, f"{float(y):.6g}" if math.isfinite(y) else "", f"{float(p):.6f}"])
        with atomic_write(predictions_path, "w") as f:
            f.write(buf.getvalue())
        results_log.info("wrote %d predictions to %s", s.n, predictions_path)
    return result


def _check_feature_names(ckpt_meta: dict, file_meta: dict, ckpt_dir: Path, data_path: Path) -> None:
    """Same widths are not enough: features from a different recipe must not be scored silently."""
    a, b = ckpt_meta.get("feature_names") or {}, file_meta.get("feature_names") or {}
    for modality in sorted(set(a) & set(b)):
        if list(a[modality]) != list(b[modality]):
            raise FeatureFileError(
                f"{data_path}: {modality} features differ from those the checkpoint {ckpt_dir} was "
                "trained on (feature_names); extract them with the checkpoint's config"
            )




__all__ = ["train", "evaluate", "lr_factor", "lr_at_epoch", "make_scheduler", "load_run_config",
           "plot_curves", "best_per_metric_on_test"]
