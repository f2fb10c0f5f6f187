"""Training run directories: where runs live, what they hold, and how they resume.

``almt train`` writes ``runs/<date-time>/`` (or ``--out``)::

    RUN_DIR/run.json        config + data path of the run (checked on resume)
    RUN_DIR/checkpoint/     selected epoch (model/checkpoint.py format)
    RUN_DIR/last/state.pt   resume state: weights, optimizer, scheduler, RNG states, history
    RUN_DIR/log.jsonl, log.csv, curves.png, summary.json

With several seeds each seed gets ``RUN_DIR/seed_<s>/`` with that layout, and ``RUN_DIR`` holds
the mean +- std summary, the overlaid curves and a copy of the best seed's checkpoint.
This module owns that layout: finding and creating runs, the run file, the resume state (RNG
states included), the per-epoch logs, the learning-curve picture and the summaries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, config_from_dict, config_to_dict
from .errors import CheckpointError, TrainingError
from .files import atomic_write, atomic_write_csv, atomic_write_json
from .metrics import is_better, sort_key
from .utils import one_line, package_version

logger = logging.getLogger(__name__)

DEFAULT_RUNS = Path("runs")
RUN_FILE = "run.json"
STATE_FILE = Path("last") / "state.pt"
CHECKPOINT_DIR = "checkpoint"
SUMMARY_FILE = "summary.json"
STATE_VERSION = 1
# reference-style test table: a paired metric is read from the epoch where its anchor metric is best
_PAIRED = {"Has0_F1_score": "Has0_acc_2", "Non0_F1_score": "Non0_acc_2", "Corr": "MAE",
           "F1_score": "Mult_acc_2"}

History = list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Finding and creating runs
# ---------------------------------------------------------------------------------------------


def new_run_dir(root: Path = DEFAULT_RUNS) -> Path:
    """``root/<date-time>`` (with a ``-N`` suffix when that name is taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / stamp
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return path


def latest_run(root: Path = DEFAULT_RUNS) -> Path:
    """The newest run directory under ``root`` (one holding a run file)."""
    runs = [p for p in root.glob("*") if (p / RUN_FILE).is_file()] if root.is_dir() else []
    if not runs:
        raise TrainingError(f"{root}: no run to resume here; pass --out RUN_DIR")
    return max(runs, key=lambda p: p.stat().st_mtime)


def find_latest_checkpoint(root: str | os.PathLike = DEFAULT_RUNS) -> Path:
    """The newest ``<root>/*/checkpoint`` (by modification time), as ``almt train`` writes them."""
    root = Path(root)
    found = [p for p in root.glob(f"*/{CHECKPOINT_DIR}") if (p / "config.json").is_file()]
    if not found:
        raise CheckpointError(
            f"{root}: no trained checkpoint found; run `almt train` first or pass --checkpoint DIR"
        )
    return max(found, key=lambda p: (p / "config.json").stat().st_mtime)


def read_run_file(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run file (run.json) of a run directory: its config, data path and device."""
    path = Path(run_dir) / RUN_FILE
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TrainingError(f"{path}: not found ({run_dir} is not a training run directory)") from e
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path}: unreadable run file ({one_line(e)})") from e
    if not isinstance(run, dict):
        raise TrainingError(f"{path}: unreadable run file (not a JSON object)")
    return run


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The Config a run directory was started with (for resuming without repeating options)."""
    path = Path(run_dir) / RUN_FILE
    try:
        return config_from_dict(read_run_file(run_dir)["config"], source=str(path))
    except (KeyError, TypeError) as e:
        raise TrainingError(f"{path}: unreadable run file ({one_line(e)})") from e


def check_run_dir(run_dir: Path, cfg: Config, data_path: Path, resume: bool) -> Config | None:
    """Refuse to overwrite a run; on resume return the run's own Config (else None).

    A resumed run keeps the config it was started with (that is what makes its numbers equal
    to an uninterrupted run); differing settings passed now are reported and ignored.
    """
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
    old_data = read_run_file(run_dir).get("data")
    if old_data and Path(old_data).resolve() != data_path.resolve():
        logger.warning("%s: the run was started on %s; resuming on %s", run_dir, old_data, data_path)
    return saved


def write_run_file(run_dir: Path, cfg: Config, data_path: Path, device: torch.device, processes: int = 1) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / RUN_FILE, {
        "config": config_to_dict(cfg), "data": str(data_path.resolve()),
        "package_version": package_version(), "device": str(device),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), **({"processes": processes} if processes > 1 else {}),
    })


@contextlib.contextmanager
def removed_unless_an_epoch_finishes(run_dir: Path, active: bool = True) -> Iterator[None]:
    """On a failure inside the block, take away what it made of ``run_dir`` while no epoch has
    finished: the directory (and the parents made for it) when it did not exist before, its
    contents when it was an empty directory. A run with a finished epoch stays (it resumes).
    Not ``active``: does nothing (a training process that does not write)."""
    if not active:
        yield
        return
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
    was_empty = run_dir.is_dir() and not any(run_dir.iterdir())
    try:
        yield
    except BaseException:
        if (missing or was_empty) and not has_finished_epoch(run_dir):
            _remove_unfinished(run_dir, missing)
        raise


def has_finished_epoch(run_dir: Path) -> bool:
    """True when ``run_dir`` (or one of its seeds) holds the resume state of a finished epoch."""
    return (run_dir / STATE_FILE).is_file() or any(run_dir.glob(f"seed_*/{STATE_FILE.as_posix()}"))


def _remove_unfinished(run_dir: Path, missing: list[Path]) -> None:
    if not run_dir.is_dir() or (not missing and not any(run_dir.iterdir())):
        return  # nothing was made
    try:
        for child in run_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    except OSError as e:  # the original failure is the one to report
        logger.warning("%s: could not remove the unfinished run (%s)", run_dir, one_line(e))
        return
    for made in missing:  # the run directory, then the parents made for it, while empty
        try:
            made.rmdir()
        except OSError:
            break
    logger.info("%s: removed the unfinished run (no epoch finished)", run_dir)


def config_differences(a: Config, b: Config) -> list[str]:
    """``key: old -> new`` for every setting that differs between two configs."""
    return _dict_diff(config_to_dict(a), config_to_dict(b))


def _dict_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _dict_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


# ---------------------------------------------------------------------------------------------
# Resume state
# ---------------------------------------------------------------------------------------------


def rng_state(loader_gen: torch.Generator) -> dict[str, Any]:
    """All RNG states as weights_only-loadable values (tensors, lists, numbers, strings)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [str(np_name), torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_gen.get_state(),
    }


def set_rng_state(state: dict[str, Any], loader_gen: torch.Generator) -> None:
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys_np: np.ndarray = keys.numpy().astype(np.uint32)  # (624,) Mersenne Twister key
    np.random.set_state((name, keys_np, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning("saved CUDA RNG states are for %d device(s); not restored", len(state["cuda"]))
    loader_gen.set_state(state["loader"])


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file next to ``path``, then rename (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:  # torch reports a failed write (a full disk, ...) this way
            raise OSError(f"{path}: cannot write the resume state ({one_line(e)})") from e


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors of many kinds
        raise TrainingError(f"{path}: cannot read the resume state ({one_line(e)})") from e
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise TrainingError(f"{path}: not a resume state of this version of almt-pipeline")
    return state


# ---------------------------------------------------------------------------------------------
# Logs and curves
# ---------------------------------------------------------------------------------------------


def write_logs(run_dir: Path, history: History) -> None:
    """Rewrite log.jsonl and log.csv from the full history (atomic, so always consistent)."""
    with atomic_write(run_dir / "log.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in history))
    columns = ["epoch", "lr", "train_loss"]
    for part in ("valid", "test"):
        keys: list[str] = []
        for r in history:
            keys += [k for k in r.get(part, {}) if k not in keys]
        columns += [f"{part}_{k}" for k in keys]
    columns += ["selected", "time_s"]
    rows = []
    for r in history:
        flat = {"epoch": r["epoch"], "lr": r["lr"], "train_loss": r["train_loss"],
                "selected": int(r["improved"]), "time_s": round(r["time_s"], 3)}
        for part in ("valid", "test"):
            flat.update({f"{part}_{k}": v for k, v in r.get(part, {}).items()})
        rows.append([flat.get(c, "") for c in columns])
    atomic_write_csv(run_dir / "log.csv", columns, rows)


def plot_curves(path: str | os.PathLike, histories: dict[str, History]) -> None:
    """Learning curves PNG: train/valid/test loss, valid/test MAE and lr per epoch."""
    from matplotlib.figure import Figure  # optional heavy import, only when a run ends

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
            for ax, key in ((ax_loss, "Loss"), (ax_mae, "MAE")):
                if any(key in r.get(part, {}) for r in history):
                    ax.plot(ep, [r.get(part, {}).get(key, np.nan) for r in history], style,
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


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


def best_per_metric_on_test(history: History) -> dict[str, dict[str, Any]]:
    """Reference-style best value per metric over all epochs on TEST (test-selected: optimistic).

    F1 scores are read from the epoch of their accuracy's best, Corr from the best MAE's epoch,
    as the released code reports them.
    """
    rows = [r for r in history if r.get("test")]
    if not rows:
        return {}
    best_epoch: dict[str, dict[str, Any]] = {}
    for key in rows[0]["test"]:
        for r in rows:
            value = r["test"].get(key, math.nan)
            best = best_epoch[key]["test"][key] if key in best_epoch else None
            if math.isfinite(value) and is_better(key, value, best):
                best_epoch[key] = r
    table = {}
    for key in rows[0]["test"]:
        anchor = _PAIRED.get(key) if _PAIRED.get(key) in best_epoch else key
        if anchor not in best_epoch:
            continue
        r = best_epoch[anchor]
        table[key] = {"value": r["test"][key], "epoch": r["epoch"]}
    return table


def seed_summary(run_dir: Path, summaries: dict[int, dict[str, Any]], select: str, scale: str) -> dict[str, Any]:
    """Mean +- std over seeds of the selected epochs' metrics, and the best seed by validation."""
    seeds = list(summaries)
    agg: dict[str, Any] = {}
    for part in ("valid", "test"):
        keys = list(summaries[seeds[0]][part])
        values = {k: np.array([summaries[s][part].get(k, np.nan) for s in seeds], dtype=np.float64) for k in keys}
        agg[f"{part}_mean"] = {k: float(v.mean()) for k, v in values.items()}
        agg[f"{part}_std"] = {k: float(v.std()) for k, v in values.items()}
    best_seed = min(seeds, key=lambda s: sort_key(select, summaries[s]["selected_valid"]))
    agg.update(_objective_means([summaries[s] for s in seeds]))
    return {
        "seeds": seeds, "select_metric": select, "label_scale": scale, "std": "population (ddof=0)",
        **agg, "best_seed": best_seed, "checkpoint": str(run_dir / CHECKPOINT_DIR),
        "per_seed": {str(s): summaries[s] for s in seeds},
    }


def _objective_means(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds of the auxiliary objectives' reports: the unimodal heads' test metrics and
    the balanced stage weights (nothing for the released objective)."""
    out: dict[str, Any] = {}
    heads = [p.get("unimodal", {}).get("test", {}) for p in per_seed]
    if heads and all(heads):
        out["unimodal_test_mean"] = {
            m: {k: float(np.mean([h[m][k] for h in heads])) for k, v in heads[0][m].items() if not isinstance(v, str)}
            for m in heads[0]
        }
    weights = [p.get("stage_weights") for p in per_seed]
    if weights and all(weights):
        out["stage_weights_mean"] = {k: float(np.mean([w[k] for w in weights if w])) for k in weights[0] or {}}
    return out


def seed_histories(run_dir: Path, seeds: list[int]) -> dict[str, History]:
    """Each seed's per-epoch history, read back from its resume state."""
    histories = {}
    for s in seeds:
        state_path = run_dir / f"seed_{s}" / STATE_FILE
        histories[f"seed {s}"] = load_state(state_path)["history"] if state_path.is_file() else []
    return histories


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
