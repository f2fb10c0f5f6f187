"""Training ALMT on MMSA-format feature files.

``train`` runs the released protocol (AdamW on all parameters, MSE on ``regression_labels``,
per-epoch linear warm-up then cosine annealing) and selects the checkpoint on a *validation*
metric. Every epoch it logs train loss and valid/test metrics, saves the selected epoch's
checkpoint when it improves and the full training state for ``resume`` (the run directory's
layout is :mod:`.runs`'). Scoring a checkpoint afterwards is :mod:`.evaluate`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import runs
from .batches import Batch, Split, amp_dtype, autocast, check_token_ids, forward, make_loader, predict_split, to_split
from .config import Config
from .errors import ConfigError, TrainingError
from .features import FeatureFile, load_features
from .metrics import format_metrics, is_better, split_metric_names, split_metrics
from .model.almt import ALMT
from .model.checkpoint import copy_checkpoint, save_checkpoint
from .model.text_encoder import load_text_model
from .utils import resolve_device, results_log, set_seed

logger = logging.getLogger(__name__)

# metrics shown on the per-epoch console line (when the data has them)
_BRIEF_KEYS = ("MAE", "Corr", "Non0_acc_2", "Mult_acc_2", "Mult_acc_7")
# per-clip provenance in a feature file's meta that a checkpoint does not need
_PROVENANCE_KEYS = ("sources", "transcript_sources", "face_fraction")


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


def make_scheduler(optimizer: torch.optim.Optimizer, epochs: int,
                   warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped once per epoch after the epoch's batches."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, epochs=epochs, warmup_ratio=warmup_ratio)
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


@dataclass
class _Data:
    """What every seed of a run trains and is scored on."""

    splits: dict[str, Split]
    scale: str
    feature_meta: dict[str, Any]
    path: Path


def train(cfg: Config, data_path: str | os.PathLike, out_dir: str | os.PathLike, *, device: str = "auto",
          resume: bool = False, quiet: bool = False, show_test_selected: bool = False) -> dict[str, Any]:
    """Train ALMT on ``data_path`` into ``out_dir``; returns the run summary (also summary.json).

    The checkpoint is selected on ``cfg.train.select_metric`` computed on the validation split;
    its test metrics are reported. ``cfg.train.seeds`` runs each seed in ``seed_<s>/`` and
    reports mean +- std. ``resume`` continues an interrupted run from its last finished epoch
    and gives the same numbers as an uninterrupted run on the same device.
    """
    run_dir = Path(out_dir)
    dev = resolve_device(device)
    saved_cfg = runs.check_run_dir(run_dir, cfg, Path(data_path), resume)
    resuming = saved_cfg is not None
    cfg = saved_cfg or cfg
    seeds = list(cfg.train.seeds) if cfg.train.seeds else None
    if seeds and len(set(seeds)) != len(seeds):
        raise ConfigError(f"train.seeds lists a seed twice: {seeds}")
    data = _load_training_data(cfg, Path(data_path))
    settings = _Settings(device=dev, resume=resuming, quiet=quiet, show_test_selected=show_test_selected)
    # nothing is written before the config and the data pass their checks; a failure before the
    # first epoch finishes takes away the run directory this call made
    try:
        with runs.removed_unless_an_epoch_finishes(run_dir), _deterministic(dev):
            if resuming:
                run_dir.mkdir(parents=True, exist_ok=True)
            else:
                runs.write_run_file(run_dir, cfg, data.path, dev)
            if not seeds:
                return _train_seed(cfg, cfg.train.seed, run_dir, data, settings)
            summaries = {}
            for seed in seeds:
                summaries[seed] = _train_seed(cfg, seed, run_dir / f"seed_{seed}", data, settings,
                                              desc=f"seed {seed} ")
            return _summarise_seeds(cfg, run_dir, summaries, data.scale)
    except KeyboardInterrupt:
        if runs.has_finished_epoch(run_dir):
            logger.warning("interrupted: the last finished epoch is saved; continue with --resume --out %s",
                           run_dir)
        else:
            logger.warning("interrupted before the first epoch finished: nothing was saved")
        raise


def _load_training_data(cfg: Config, data_path: Path) -> _Data:
    """Train and valid must be present and labelled; test is optional (metrics only when labelled)."""
    data = load_features(data_path, model_cfg=cfg.model, label_scale=cfg.train.label_scale, splits=None,
                         require_labels=False)
    splits = {name: to_split(name, arrays) for name, arrays in data.splits.items()}
    for name in ("train", "valid"):
        if name not in splits or splits[name].n == 0:
            raise TrainingError(f"{data_path}: no {name} samples; training needs labelled train and valid splits")
        if not splits[name].labelled:
            raise TrainingError(f"{data_path}: the {name} split has samples without labels; "
                                "training needs labelled train and valid splits")
    if "test" not in splits or not splits["test"].labelled:
        logger.warning("%s: no labelled test split; only validation metrics are reported", data_path)
    select = cfg.train.select_metric
    if select not in split_metric_names(data.label_scale):
        raise ConfigError(
            f"train.select_metric {select!r} is not a metric for label scale {data.label_scale} "
            f"(choose from {', '.join(split_metric_names(data.label_scale))})"
        )
    file_text_model = data.meta.get("text_model")
    if file_text_model and file_text_model != cfg.model.text_model:
        logger.warning(
            "%s: features were tokenized for text model %r but the config trains %r; make sure "
            "they share a vocabulary", data_path, file_text_model, cfg.model.text_model,
        )
    return _Data(splits=splits, scale=data.label_scale, feature_meta=_feature_schema(data), path=data_path)


def _feature_schema(data: FeatureFile) -> dict[str, Any]:
    """Feature meta stored in checkpoints: the file's meta (minus per-clip provenance) + shapes."""
    meta = {k: v for k, v in data.meta.items() if k not in _PROVENANCE_KEYS}
    dims = data.dims
    meta["lengths"] = {"text": dims["text_len"], "audio": dims["audio_len"], "vision": dims["vision_len"]}
    meta["dims"] = {"text": dims["text_dim"], "audio": dims["audio_dim"], "vision": dims["vision_dim"]}
    return json.loads(json.dumps(meta, default=str))  # plain JSON values only


# ---------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------


@dataclass
class _Settings:
    device: torch.device
    resume: bool
    quiet: bool
    show_test_selected: bool


@dataclass
class _SeedState:
    """Everything that changes while one seed trains (and is saved for resume)."""

    model: ALMT
    tokenizer: Any
    text_config: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    amp: torch.dtype | None
    loader_gen: torch.Generator
    history: runs.History = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"value": None, "epoch": 0, "valid": {}, "test": {}})
    bad_epochs: int = 0
    start: int = 1
    stopped_early: bool = False
    finished: bool = False


def _train_seed(cfg: Config, seed: int, run_dir: Path, data: _Data, settings: _Settings,
                desc: str = "") -> dict[str, Any]:
    """Train one seed in ``run_dir``; returns its summary (also written to summary.json)."""
    t = cfg.train
    state_path = run_dir / runs.STATE_FILE
    saved = runs.load_state(state_path) if settings.resume and state_path.is_file() else None
    if saved is not None and saved["finished"]:
        logger.log(logging.INFO if desc else logging.WARNING,
                   "%s: this run already finished (epoch %d); nothing to resume", run_dir, saved["epoch"])
        summary = runs.read_summary(run_dir)
        if summary is not None:
            return summary
    run_dir.mkdir(parents=True, exist_ok=True)
    st = _start_seed(cfg, seed, data, settings.device, saved)
    if saved is not None:
        logger.info("%s: resuming at epoch %d/%d", run_dir, st.start, t.epochs)
    train_loader = make_loader(data.splits["train"], t.batch_size, st.loader_gen, settings.device.type == "cuda")
    for epoch in range(st.start, t.epochs + 1):
        if st.finished:
            break
        record = _run_epoch(cfg, st, train_loader, data, settings, epoch, desc)
        _select(cfg, st, record, run_dir, data, settings.device, seed)
        record["time_s"] = time.perf_counter() - record.pop("t0")
        st.history.append(record)
        st.scheduler.step()
        st.stopped_early = t.patience is not None and st.bad_epochs >= t.patience
        st.finished = st.stopped_early or epoch == t.epochs
        runs.write_logs(run_dir, st.history)
        runs.save_state(state_path, _state_dict(st, epoch, seed))
        _log_epoch(cfg, record, desc, settings.quiet)
        if st.stopped_early:
            logger.info("%searly stopping at epoch %d: valid %s did not improve for %d epochs",
                        desc, epoch, t.select_metric, t.patience)
    return _finish_seed(cfg, st, seed, run_dir, data.scale, settings, desc)


def _start_seed(cfg: Config, seed: int, data: _Data, device: torch.device,
                saved: dict[str, Any] | None) -> _SeedState:
    """Model, optimizer and schedule for a seed, restored from ``saved`` when resuming."""
    t = cfg.train
    set_seed(seed)
    bert, tokenizer = load_text_model(cfg.model.text_model)
    text_config = bert.config.to_dict()
    check_token_ids(data.splits.values(), int(text_config["vocab_size"]), cfg.model.text_model)
    model = ALMT(cfg.model, bert, int(bert.config.hidden_size)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    amp = amp_dtype(t.amp, device)
    st = _SeedState(
        model=model, tokenizer=tokenizer, text_config=text_config, optimizer=optimizer,
        scheduler=make_scheduler(optimizer, t.epochs, t.warmup_ratio), amp=amp,
        scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
        loader_gen=torch.Generator(),
    )
    st.loader_gen.manual_seed(seed)
    if saved is not None:
        st.model.load_state_dict(saved["model"])
        st.optimizer.load_state_dict(saved["optimizer"])
        st.scheduler.load_state_dict(saved["scheduler"])
        if st.scaler is not None and saved.get("scaler"):
            st.scaler.load_state_dict(saved["scaler"])
        st.history, st.best, st.bad_epochs = saved["history"], saved["best"], saved["bad_epochs"]
        st.start, st.stopped_early, st.finished = saved["epoch"] + 1, saved["stopped_early"], saved["finished"]
        runs.set_rng_state(saved["rng"], st.loader_gen)
    return st


def _state_dict(st: _SeedState, epoch: int, seed: int) -> dict[str, Any]:
    return {
        "version": runs.STATE_VERSION, "epoch": epoch, "finished": st.finished,
        "stopped_early": st.stopped_early, "seed": seed, "model": st.model.state_dict(),
        "optimizer": st.optimizer.state_dict(), "scheduler": st.scheduler.state_dict(),
        "scaler": st.scaler.state_dict() if st.scaler else {}, "best": st.best,
        "bad_epochs": st.bad_epochs, "history": st.history, "rng": runs.rng_state(st.loader_gen),
    }


def _run_epoch(cfg: Config, st: _SeedState, loader: DataLoader[Batch], data: _Data, settings: _Settings,
               epoch: int, desc: str) -> dict[str, Any]:
    """Train one epoch, then score the labelled valid/test splits: the epoch's log record."""
    t0 = time.perf_counter()
    lr = float(st.optimizer.param_groups[0]["lr"])
    train_loss = _train_epoch(st, loader, settings.device, cfg.train.grad_clip, epoch,
                              f"{desc}epoch {epoch}/{cfg.train.epochs}", settings.quiet)
    record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": train_loss}
    for name in ("valid", "test"):
        split = data.splits.get(name)
        if split is not None and split.labelled:
            pred = predict_split(st.model, split, cfg.train.eval_batch_size, settings.device, st.amp)
            record[name] = split_metrics(pred, split.labels.numpy(), data.scale)
    record["t0"] = t0  # replaced by "time_s" once the epoch's checkpoint is saved
    return record


def _train_epoch(st: _SeedState, loader: DataLoader[Batch], device: torch.device, grad_clip: float | None,
                 epoch: int, desc: str, quiet: bool) -> float:
    """One pass over the training batches; returns the mean MSE per sample."""
    model, optimizer, scaler = st.model, st.optimizer, st.scaler
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=quiet)
    for b, batch in enumerate(bar, 1):
        y = batch[-1].to(device, non_blocking=True)  # (B,)
        with autocast(device, st.amp):
            pred = forward(model, batch[:-1], device)  # (B,)
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


def _select(cfg: Config, st: _SeedState, record: dict[str, Any], run_dir: Path, data: _Data,
            device: torch.device, seed: int) -> None:
    """Keep the epoch's checkpoint when its validation metric improves on the best so far."""
    select = cfg.train.select_metric
    value = record["valid"][select]
    record["improved"] = is_better(select, value, st.best["value"])
    if not record["improved"]:
        st.bad_epochs += 1
        return
    st.best = {"value": value, "epoch": record["epoch"], "valid": record["valid"], "test": record.get("test", {})}
    st.bad_epochs = 0
    save_checkpoint(
        run_dir / runs.CHECKPOINT_DIR, st.model, cfg, tokenizer=st.tokenizer, text_config=st.text_config,
        feature_meta=data.feature_meta, label_scale=data.scale,
        extra={"epoch": record["epoch"], "seed": seed, "select_metric": select, "valid": record["valid"],
               "test": record.get("test", {}), "trained_on": str(device)},
    )


def _log_epoch(cfg: Config, record: dict[str, Any], desc: str, quiet: bool) -> None:
    select = cfg.train.select_metric
    test_part = f" | test {_brief(record['test'], select)}" if "test" in record else ""
    logger.log(logging.DEBUG if quiet else logging.INFO,
               "%sepoch %d/%d lr %.2e | train loss %.4f | valid %s%s%s (%.1fs)",
               desc, record["epoch"], cfg.train.epochs, record["lr"], record["train_loss"],
               _brief(record["valid"], select), test_part, " *" if record["improved"] else "", record["time_s"])


def _brief(metrics: dict[str, float], select: str) -> str:
    keys = [select] + [k for k in _BRIEF_KEYS if k != select]
    return " ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


def _finish_seed(cfg: Config, st: _SeedState, seed: int, run_dir: Path, scale: str, settings: _Settings,
                 desc: str) -> dict[str, Any]:
    """The seed's summary (selected epoch, its metrics), its curves, and the results lines."""
    select, best = cfg.train.select_metric, st.best
    summary: dict[str, Any] = {
        "seed": seed, "finished": True, "epochs": cfg.train.epochs, "epochs_run": len(st.history),
        "stopped_early": st.stopped_early, "select_metric": select, "label_scale": scale,
        "selected_epoch": best["epoch"], "selected_valid": best["value"],
        "valid": best["valid"], "test": best["test"], "checkpoint": str(run_dir / runs.CHECKPOINT_DIR),
        "train_time_s": round(sum(r["time_s"] for r in st.history), 3), "device": str(settings.device),
    }
    if best["value"] is None or not math.isfinite(best["value"]):
        raise TrainingError(
            f"{run_dir}: valid {select} was not finite at any epoch (the model diverged): lower the "
            "learning rate, set train.grad_clip, or check the features for extreme values"
        )
    results_log.info("%sselected epoch %d by valid %s = %.4f", desc, best["epoch"], select, best["value"])
    if best["test"]:
        results_log.info("%stest metrics of the selected epoch: %s", desc, format_metrics(best["test"]))
    if settings.show_test_selected:
        table = runs.best_per_metric_on_test(st.history)
        summary["test_selected_best_per_metric"] = table
        if table:
            results_log.info(
                "%sbest per metric over all epochs ON TEST (test-selected, optimistic; not a sound "
                "model selection):\n%s", desc,
                "\n".join(f"  {k:<16} {v['value']:.4f}  (epoch {v['epoch']})" for k, v in table.items()),
            )
    runs.plot_curves(run_dir / "curves.png", {f"seed {seed}": st.history})
    runs.write_summary(run_dir, summary)
    return summary


def _summarise_seeds(cfg: Config, run_dir: Path, summaries: dict[int, dict[str, Any]], scale: str) -> dict[str, Any]:
    """Mean +- std of the selected epochs' metrics over seeds; copy the best seed's checkpoint."""
    select = cfg.train.select_metric
    summary = runs.seed_summary(run_dir, summaries, select, scale)
    best_seed = summary["best_seed"]
    copy_checkpoint(run_dir / f"seed_{best_seed}" / runs.CHECKPOINT_DIR, run_dir / runs.CHECKPOINT_DIR)
    runs.plot_curves(run_dir / "curves.png", runs.seed_histories(run_dir, list(summaries)))
    runs.write_summary(run_dir, summary)
    if summary["test_mean"]:
        mean, std = summary["test_mean"], summary["test_std"]
        lines = "\n".join(f"  {k:<16} {mean[k]:.4f} ± {std[k]:.4f}" for k in mean)
        results_log.info("test metrics over %d seeds (each selected by valid %s), mean ± std:\n%s",
                         len(summaries), select, lines)
    results_log.info("best seed by valid %s: %d (checkpoint copied to %s)", select, best_seed,
                     run_dir / runs.CHECKPOINT_DIR)
    return summary


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


__all__ = ["train", "lr_factor", "lr_at_epoch", "make_scheduler"]
