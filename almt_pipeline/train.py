"""Training ALMT on MMSA-format feature files.

``train`` runs the released protocol (AdamW on all parameters, MSE on ``regression_labels``,
per-epoch linear warm-up then cosine annealing) and selects the checkpoint on a *validation*
metric. Every epoch it logs train loss and valid/test metrics, saves the selected epoch's
checkpoint when it improves and the full training state for ``resume`` (the run directory's
layout is :mod:`.runs`'). Scoring a checkpoint afterwards is :mod:`.evaluate`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed, runs
from .batches import (
    N_INPUTS,
    Batch,
    amp_dtype,
    autocast,
    check_token_ids,
    forward,
    make_loader,
    predict_split,
)
from .config import Config
from .distributed import Group
from .errors import ConfigError, FeatureFileError, TrainingError
from .metrics import format_metrics, is_better, split_metrics
from .model.almt import ALMT
from .model.checkpoint import copy_checkpoint, save_checkpoint
from .model.heads import head_spec
from .model.text_encoder import load_text_model
from .objectives import Objective, epoch_line, parameter_groups, unimodal_metrics
from .processes import sigterm_as_interrupt
from .schedule import deterministic, lr_at_epoch, make_scheduler
from .training_data import TrainingData, load_training_data
from .utils import resolve_device, results_log, set_seed

logger = logging.getLogger(__name__)

# metrics shown on the per-epoch console line (when the data has them)
_BRIEF_KEYS = ("MAE", "Corr", "Non0_acc_2", "Mult_acc_2", "Mult_acc_7")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def train(cfg: Config, data_path: str | os.PathLike, out_dir: str | os.PathLike, *, device: str = "auto",
          resume: bool = False, quiet: bool = False, show_test_selected: bool = False) -> dict[str, Any]:
    """Train ALMT on ``data_path`` into ``out_dir``; returns the run summary (also summary.json).

    The checkpoint is selected on ``cfg.train.select_metric`` computed on the validation split;
    its test metrics are reported. ``cfg.train.seeds`` runs each seed in ``seed_<s>/`` and
    reports mean +- std. ``resume`` continues an interrupted run from its last finished epoch
    and gives the same numbers as an uninterrupted run on the same device.
    """
    group = distributed.group_from_env()  # several processes under torchrun, else one
    dev = distributed.join(group, resolve_device(device))
    try:
        with sigterm_as_interrupt():  # torchrun stops the other processes with SIGTERM when one fails
            return _train_run(cfg, Path(data_path), Path(out_dir), group, _Settings(
                device=dev, resume=resume, quiet=quiet, show_test_selected=show_test_selected, group=group))
    finally:
        distributed.leave(group)


def check_before_launch(cfg: Config, data_path: str | os.PathLike, out_dir: str | os.PathLike, resume: bool,
                        device: str, processes: int) -> None:
    """What ``almt train --nproc N`` can check before it starts N processes (each would report it)."""
    saved = runs.check_run_dir(Path(out_dir), cfg, Path(data_path), resume)
    _check_processes(saved or cfg, processes)
    if not Path(data_path).is_file():
        raise FeatureFileError(f"{data_path}: feature file not found")
    distributed.check_devices(resolve_device(device), processes)


def _check_processes(cfg: Config, processes: int) -> None:
    if processes > 1 and cfg.train.objective != "regression":
        raise ConfigError(f"train.objective {cfg.train.objective} trains in one process; with several processes "
                          "use the regression objective")


def _train_run(cfg: Config, data_path: Path, run_dir: Path, group: Group, settings: _Settings) -> dict[str, Any]:
    dev = settings.device
    saved_cfg = runs.check_run_dir(run_dir, cfg, data_path, settings.resume)
    distributed.barrier(group)  # every rank has checked the run directory before rank 0 writes to it
    settings.resume = saved_cfg is not None
    cfg = saved_cfg or cfg
    seeds = list(cfg.train.seeds) if cfg.train.seeds else None
    if seeds and len(set(seeds)) != len(seeds):
        raise ConfigError(f"train.seeds lists a seed twice: {seeds}")
    _check_processes(cfg, group.world)
    data = load_training_data(cfg, data_path)
    # nothing is written before the config and the data pass their checks; a failure before the
    # first epoch finishes takes away the run directory this call made
    try:
        with runs.removed_unless_an_epoch_finishes(run_dir, group.main), deterministic(dev):
            if group.main and settings.resume:
                run_dir.mkdir(parents=True, exist_ok=True)
            elif group.main:
                runs.write_run_file(run_dir, cfg, data.path, dev, group.world)
            if not seeds:
                return _train_seed(cfg, cfg.train.seed, run_dir, data, settings)
            summaries = {}
            for seed in seeds:
                summaries[seed] = _train_seed(cfg, seed, run_dir / f"seed_{seed}", data, settings,
                                              desc=f"seed {seed} ")
            return _summarise_seeds(cfg, run_dir, summaries, data.scale, group)
    except KeyboardInterrupt:
        if runs.has_finished_epoch(run_dir):
            logger.warning("interrupted: the last finished epoch is saved; continue with --resume --out %s",
                           run_dir)
        else:
            logger.warning("interrupted before the first epoch finished: nothing was saved")
        raise


# ---------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------


@dataclass
class _Settings:
    device: torch.device
    resume: bool
    quiet: bool
    show_test_selected: bool
    group: Group  # the training processes (one without torchrun); only its main one writes


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
    trained: torch.nn.Module  # what the training steps call: the model, or it in DistributedDataParallel
    objective: Objective | None = None  # the auxiliary objectives (None: the released regression loss)
    history: runs.History = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"value": None, "epoch": 0, "valid": {}, "test": {}})
    bad_epochs: int = 0
    start: int = 1
    stopped_early: bool = False
    finished: bool = False


def _train_seed(cfg: Config, seed: int, run_dir: Path, data: TrainingData, settings: _Settings,
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
    main = settings.group.main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    st = _start_seed(cfg, seed, data, settings, saved)
    if saved is not None:
        logger.info("%s: resuming at epoch %d/%d", run_dir, st.start, t.epochs)
    train_split = data.splits["train"]
    extra = () if st.objective is None else (torch.arange(train_split.n),)  # sample rows, for generated labels
    train_loader = make_loader(train_split, t.batch_size, st.loader_gen, settings.device.type == "cuda", extra,
                               settings.group)
    for epoch in range(st.start, t.epochs + 1):
        if st.finished:
            break
        # every rank scores the same model, but rank 0's record decides for all of them (selection,
        # early stopping): ranks that disagreed in a last bit would otherwise part ways
        record = distributed.broadcast(settings.group, _run_epoch(cfg, st, train_loader, data, settings, epoch, desc))
        _select(cfg, st, record, run_dir, data, settings.device, seed, main)
        record["time_s"] = time.perf_counter() - record.pop("t0")
        st.history.append(record)
        st.scheduler.step()
        st.stopped_early = t.patience is not None and st.bad_epochs >= t.patience
        st.finished = st.stopped_early or epoch == t.epochs
        state = _state_dict(st, epoch, seed, settings.group)  # on every rank: it gathers their RNG states
        if main:
            runs.write_logs(run_dir, st.history)
            runs.save_state(state_path, state)
        _log_epoch(cfg, record, desc, settings.quiet)
        if st.stopped_early:
            logger.info("%searly stopping at epoch %d: valid %s did not improve for %d epochs",
                        desc, epoch, t.select_metric, t.patience)
    return _finish_seed(cfg, st, seed, run_dir, data.scale, settings, desc)


def _start_seed(cfg: Config, seed: int, data: TrainingData, settings: _Settings,
                saved: dict[str, Any] | None) -> _SeedState:
    """Model, optimizer and schedule for a seed, restored from ``saved`` when resuming."""
    t, device, group = cfg.train, settings.device, settings.group
    set_seed(seed)
    bert, tokenizer = load_text_model(cfg.model.text_model)
    text_config = bert.config.to_dict()
    check_token_ids(data.splits.values(), int(text_config["vocab_size"]), cfg.model.text_model)
    heads = head_spec(t)
    model = ALMT(cfg.model, bert, int(bert.config.hidden_size), heads).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, t), lr=t.lr, weight_decay=t.weight_decay)
    amp = amp_dtype(t.amp, device)
    st = _SeedState(
        model=model, tokenizer=tokenizer, text_config=text_config, optimizer=optimizer,
        scheduler=make_scheduler(optimizer, t.epochs, t.warmup_ratio), amp=amp,
        scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
        loader_gen=torch.Generator(), trained=distributed.wrap(model, group, device),
    )
    st.loader_gen.manual_seed(seed)  # the same on every rank: they share each batch
    if not group.main:  # randomness inside the model (dropout) differs between ranks
        torch.manual_seed(seed + group.rank)
    if model.aux is not None:
        st.objective = Objective(t, data.splits["train"], data.scale, model.aux.letters, str(data.path))
        if seed == (t.seeds or [t.seed])[0] and saved is None:
            logger.info("objective %s%s", t.objective, "".join(
                f"; {m} labels {src}" for m, src in st.objective.label_sources.items()))
    if saved is not None:
        st.model.load_state_dict(saved["model"])
        st.optimizer.load_state_dict(saved["optimizer"])
        st.scheduler.load_state_dict(saved["scheduler"])
        if st.scaler is not None and saved.get("scaler"):
            st.scaler.load_state_dict(saved["scaler"])
        st.history, st.best, st.bad_epochs = saved["history"], saved["best"], saved["bad_epochs"]
        st.start, st.stopped_early, st.finished = saved["epoch"] + 1, saved["stopped_early"], saved["finished"]
        ranks = saved.get("rng_ranks") or [saved["rng"]]
        runs.set_rng_state(ranks[group.rank] if len(ranks) == group.world else saved["rng"], st.loader_gen)
        if st.objective is not None:
            st.objective.load_state_dict(saved["objective"], f"{data.path}: resume")
    return st


def _state_dict(st: _SeedState, epoch: int, seed: int, group: Group) -> dict[str, Any]:
    rng = runs.rng_state(st.loader_gen)
    return {
        "version": runs.STATE_VERSION, "epoch": epoch, "finished": st.finished,
        "stopped_early": st.stopped_early, "seed": seed, "model": st.model.state_dict(),
        "optimizer": st.optimizer.state_dict(), "scheduler": st.scheduler.state_dict(),
        "scaler": st.scaler.state_dict() if st.scaler else {}, "best": st.best,
        "bad_epochs": st.bad_epochs, "history": st.history, "rng": rng,
        **({"rng_ranks": distributed.gather(group, rng)} if group.active else {}),
        **({} if st.objective is None else {"objective": st.objective.state_dict()}),
    }


def _run_epoch(cfg: Config, st: _SeedState, loader: DataLoader[Batch], data: TrainingData, settings: _Settings,
               epoch: int, desc: str) -> dict[str, Any]:
    """Train one epoch, then score the labelled valid/test splits: the epoch's log record."""
    t0 = time.perf_counter()
    lr = float(st.optimizer.param_groups[0]["lr"])
    train_loss = _train_epoch(st, loader, settings, cfg.train.grad_clip, epoch,
                              f"{desc}epoch {epoch}/{cfg.train.epochs}")
    record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": train_loss}
    if st.objective is not None:
        record["objective"] = st.objective.end_epoch()
        if st.model.aux is not None and st.model.aux.stage_logits is not None:
            record["objective"]["stage_weights"] = st.model.aux.stage_weights()
    for name in ("valid", "test"):
        split = data.splits.get(name)
        if split is not None and split.labelled:
            stages: dict[str, Any] | None = None if st.objective is None else {}
            pred = predict_split(st.model, split, cfg.train.eval_batch_size, settings.device, st.amp, stages=stages)
            record[name] = split_metrics(pred, split.labels.numpy(), data.scale)
            if stages:
                record.setdefault("unimodal", {})[name] = unimodal_metrics(stages, split, data.scale)
    record["t0"] = t0  # replaced by "time_s" once the epoch's checkpoint is saved
    return record


def _train_epoch(st: _SeedState, loader: DataLoader[Batch], settings: _Settings, grad_clip: float | None,
                 epoch: int, desc: str) -> float:
    """One pass over the training batches; returns the mean loss per sample (the MSE with the
    released objective; with auxiliary objectives their weighted sum)."""
    model, optimizer, scaler, device, group = st.model, st.optimizer, st.scaler, settings.device, settings.group
    model.train()
    total, count = 0.0, 0.0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=settings.quiet or not group.main)
    for b, batch in enumerate(bar, 1):
        y = batch[N_INPUTS].to(device, non_blocking=True)  # (B,)
        n = float(len(y))
        outputs: dict[str, Any] | None = None if st.objective is None else {}
        with autocast(device, st.amp):
            pred = forward(st.trained, batch[:N_INPUTS], device, outputs)  # (B,)
        if group.active:  # this rank's share of the global batch; the last tensor holds row weights
            loss, value, n = distributed.sharded_mse(pred, y, batch[-1].to(device), group, device)
        elif st.objective is None or outputs is None:
            loss = F.mse_loss(pred.float().reshape(-1), y)
        else:
            loss = st.objective.batch_loss(pred, outputs, y, batch[N_INPUTS + 1], epoch)
        if not group.active:
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
        total += value * n
        count += n
        bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    bar.close()
    return total / max(count, 1)


def _select(cfg: Config, st: _SeedState, record: dict[str, Any], run_dir: Path, data: TrainingData,
            device: torch.device, seed: int, write: bool) -> None:
    """Keep the epoch's checkpoint when its validation metric improves on the best so far."""
    select = cfg.train.select_metric
    value = record["valid"][select]
    record["improved"] = is_better(select, value, st.best["value"])
    if not record["improved"]:
        st.bad_epochs += 1
        return
    st.best = {"value": value, "epoch": record["epoch"], "valid": record["valid"], "test": record.get("test", {})}
    objective: dict[str, Any] = {"objective": cfg.train.objective}
    if st.objective is not None:
        objective["unimodal"] = record.get("unimodal", {})
        objective["stage_weights"] = record["objective"].get("stage_weights", {})
        st.best.update(objective)
    st.bad_epochs = 0
    if write:
        save_checkpoint(
            run_dir / runs.CHECKPOINT_DIR, st.model, cfg, tokenizer=st.tokenizer, text_config=st.text_config,
            feature_meta=data.feature_meta, label_scale=data.scale,
            extra={"epoch": record["epoch"], "seed": seed, "select_metric": select, "valid": record["valid"],
                   "test": record.get("test", {}), "trained_on": str(device), **objective},
        )


def _log_epoch(cfg: Config, record: dict[str, Any], desc: str, quiet: bool) -> None:
    select = cfg.train.select_metric
    test_part = f" | test {_brief(record['test'], select)}" if "test" in record else ""
    logger.log(logging.DEBUG if quiet else logging.INFO,
               "%sepoch %d/%d lr %.2e | train loss %.4f | valid %s%s%s (%.1fs)",
               desc, record["epoch"], cfg.train.epochs, record["lr"], record["train_loss"],
               _brief(record["valid"], select), test_part, " *" if record["improved"] else "", record["time_s"])
    if "objective" in record and not quiet:
        logger.info("%s  %s", desc, epoch_line(record))



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
        "objective": cfg.train.objective,
    }
    if st.objective is not None:
        summary["unimodal"] = best.get("unimodal", {})
        summary["stage_weights"] = best.get("stage_weights", {})
        summary["label_sources"] = st.objective.label_sources
        last = st.history[-1].get("objective", {}) if st.history else {}
        if "generated_labels" in last:
            summary["generated_labels"] = last["generated_labels"]
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
    if settings.group.active:
        summary["processes"] = settings.group.world
    if settings.group.main:
        runs.plot_curves(run_dir / "curves.png", {f"seed {seed}": st.history})
        runs.write_summary(run_dir, summary)
    return summary


def _summarise_seeds(cfg: Config, run_dir: Path, summaries: dict[int, dict[str, Any]], scale: str,
                     group: Group) -> dict[str, Any]:
    """Mean +- std of the selected epochs' metrics over seeds; copy the best seed's checkpoint."""
    select = cfg.train.select_metric
    summary = runs.seed_summary(run_dir, summaries, select, scale)
    best_seed = summary["best_seed"]
    if not group.main:
        return summary
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


__all__ = ["train", "lr_at_epoch", "make_scheduler"]
