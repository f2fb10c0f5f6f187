"""Training objectives compared with the same seeds: test metrics, unimodal heads and speed.

For each feature file and objective (``regression``: the released loss; ``multitask``: unimodal
heads trained on ``regression_labels_T/A/V`` or generated labels; ``contrastive``; and
``multitask+contrastive``) this runs

    almt train --data D --config C --objective O --seeds S --epochs E --out OUT/<data>/<objective> -q

in a subprocess (with ``--resume``, so an interrupted run continues; a run whose summary.json
exists is read, not rerun) and reads back what the run wrote:

* ``summary.json``: ``test_mean`` / ``test_std`` (population std over seeds) of the test
  metrics at each seed's checkpoint, selected on the validation split;
* ``seed_<s>/summary.json``: ``train_time_s`` and ``epochs_run``, and with auxiliary objectives
  ``unimodal`` (split -> modality -> metrics of that modality's head) and ``stage_weights``.

Speed is train samples per second: ``n_train * epochs_run / train_time_s``, mean over seeds.
``train_time_s`` is the sum of the epochs' wall times, and an epoch includes scoring the valid
and test splits and, when it improves on validation, writing the checkpoint (the text model
included), so the figure is the throughput of a whole training run, not of the optimizer steps
alone; on a small file (the demo's 24 train samples) that fixed cost per epoch dominates. The
relative speed divides by the regression run's figure on the same file. Runs on one machine in
sequence; other load on it shows in the speeds.

After a run finishes its resume states (``seed_<s>/last/state.pt``, ~300 MB each with MiniLM)
are deleted unless ``--keep-state``; checkpoints and logs stay.

Default data: the sample dataset's features from ``make demo`` (``demo/features.pkl``, built-in
config ``default``) and a CH-SIMS-shaped file from ``benchmarks/make_sims_like.py``, generated
into a temporary folder with its own config. ``--data PATH[:CONFIG]`` replaces them; a file's
config is, in order: the paired ``:CONFIG``, the ``--config`` at the same position,
``PATH`` with the suffix ``.yaml`` when that file exists, else ``default``.

    python benchmarks/objectives.py --epochs 20                  # both files, four objectives, seeds 1,2,3
    python benchmarks/objectives.py --objectives regression --seeds 1 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

OBJECTIVES = ("regression", "multitask", "contrastive", "multitask+contrastive")
BASELINE = "regression"
COLUMNS = {  # (metric key, heading) per label scale; a column shows when the runs have the metric
    "mosi": (("MAE", "MAE"), ("Corr", "Corr"), ("Non0_acc_2", "Acc-2"), ("Mult_acc_5", "Acc-5"),
             ("Mult_acc_7", "Acc-7")),
    "sims": (("MAE", "MAE"), ("Corr", "Corr"), ("Mult_acc_2", "Acc-2"), ("Mult_acc_3", "Acc-3"),
             ("Mult_acc_5", "Acc-5")),
}
HEAD_METRICS = ("MAE", "Corr")
DATA_FILE = "data.json"  # OUT/<data>/data.json: the file, config and train size the runs used


@dataclass
class DataSpec:
    """A feature file to train on; ``generate``: made by make_sims_like.py when a run needs it."""

    name: str
    path: Path | None
    config: str
    generate: bool = False


@dataclass
class Result:
    """One objective on one file: the run's summaries, or why there are none."""

    objective: str
    summary: dict[str, Any] | None = None
    seeds: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    samples_per_s: float = math.nan


def parse_data(data: list[str] | None, configs: list[str] | None) -> list[DataSpec]:
    """``--data PATH[:CONFIG]`` (repeatable) and ``--config`` (by position) as specs."""
    configs = configs or []
    if not data:
        if configs:
            raise SystemExit("--config needs --data (the default files come with their configs)")
        return [DataSpec("demo", ROOT / "demo" / "features.pkl", "default"),
                DataSpec("sims_like", None, "", generate=True)]
    specs: list[DataSpec] = []
    for i, item in enumerate(data):
        path_text, config = item, ""
        if ":" in item and not Path(item).exists():
            path_text, _, config = item.rpartition(":")
        path = Path(path_text)
        if not config and i < len(configs):
            config = configs[i]
        if not config:
            config = str(path.with_suffix(".yaml")) if path.with_suffix(".yaml").is_file() else "default"
        # demo/features.pkl is "demo"; other files are named by their stem
        base = path.parent.name if path.stem == "features" and path.parent.name else path.stem
        name, taken, k = base, {s.name for s in specs}, 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        specs.append(DataSpec(name, path, config))
    return specs


def almt_command() -> list[str]:
    """The ``almt`` next to this interpreter, else the one on PATH, else ``python -m``."""
    here = Path(sys.executable).with_name("almt")
    if here.is_file():
        return [str(here)]
    found = shutil.which("almt")
    return [found] if found else [sys.executable, "-m", "almt_pipeline.cli"]


def count_train(path: Path) -> int:
    """Train samples of a feature file (read with the package's restricted unpickler)."""
    from almt_pipeline.safe_pickle import safe_load_pickle

    data: Any = safe_load_pickle(path)
    return int(len(data["train"]["id"]))


def generate_sims_like(folder: Path) -> tuple[Path, str]:
    """Run make_sims_like.py with its defaults into ``folder``; the file and its config."""
    out = folder / "sims_like.pkl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "make_sims_like.py"), "--out", str(out)]
    print(f"generating the SIMS-like file: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out, str(out.with_suffix(".yaml"))


def prepare(spec: DataSpec, out: Path, tmp: Path, need_file: bool) -> int:
    """The file's train size. The file itself is made available (generated, or checked to exist)
    only when ``need_file`` (a run is missing); the size, file and config are cached in
    OUT/<data>/data.json so that finished runs can be reported without the file."""
    cache = out / spec.name / DATA_FILE
    saved = read_json(cache)
    same = saved is not None and (spec.generate or str(Path(str(spec.path)).resolve()) == saved["path"])
    if saved is not None and same and not need_file:
        if spec.generate:
            spec.path, spec.config = Path(saved["path"]), str(saved["config"])
        return int(saved["n_train"])
    if spec.generate:
        spec.path, spec.config = generate_sims_like(tmp)
    if spec.path is None or not spec.path.is_file():
        hint = " (run `make demo` first)" if spec.name == "demo" else ""
        raise FileNotFoundError(f"{spec.path}: no such feature file{hint}")
    n_train = count_train(spec.path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"path": str(spec.path.resolve()), "config": spec.config, "n_train": n_train},
                                indent=1), encoding="utf-8")
    return n_train


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def train(spec: DataSpec, objective: str, seeds: list[int], epochs: int | None, run_dir: Path,
          plain_regression: bool) -> str | None:
    """Run ``almt train`` for one objective; None on success, else the end of its output."""
    cmd = [*almt_command(), "train", "--data", str(spec.path), "--config", spec.config,
           "--seeds", ",".join(map(str, seeds)), "--out", str(run_dir), "--resume", "-q"]
    if not (plain_regression and objective == BASELINE):
        cmd[2:2] = ["--objective", objective]
    if epochs is not None:
        cmd[2:2] = ["--epochs", str(epochs)]
    print(f"  $ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}", encoding="utf-8")
    print(f"    exit {proc.returncode} after {time.perf_counter() - start:.0f} s (output: {log})", flush=True)
    if proc.returncode == 0:
        return None
    return " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]) or f"exit code {proc.returncode}"


def prune_states(run_dir: Path) -> None:
    """Delete the resume states of a finished run (its summaries, logs and checkpoints stay)."""
    for state in run_dir.glob("seed_*/last/state.pt"):
        state.unlink()


def collect(objective: str, run_dir: Path, seeds: list[int], n_train: int) -> Result:
    """The run's summaries and its mean training throughput."""
    summary = read_json(run_dir / "summary.json")
    if summary is None:
        return Result(objective, error=f"{run_dir}: no summary.json")
    res = Result(objective, summary=summary)
    for s in summary.get("seeds", seeds):
        per_seed = read_json(run_dir / f"seed_{s}" / "summary.json") or summary.get("per_seed", {}).get(str(s))
        if per_seed is not None:
            res.seeds[int(s)] = per_seed
    rates = [n_train * r["epochs_run"] / r["train_time_s"] for r in res.seeds.values()
             if r.get("train_time_s")]
    res.samples_per_s = float(np.mean(rates)) if rates else math.nan
    return res


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if std is not None and math.isfinite(std) else f"{mean:.3f}"


def metrics_table(results: list[Result]) -> list[str]:
    """objective | test metrics (mean ± std over seeds) | samples/s | speed relative to regression."""
    done = [r for r in results if r.summary is not None]
    scale = next((str(r.summary.get("label_scale")) for r in done if r.summary), "mosi")
    have = set().union(*(r.summary.get("test_mean", {}) for r in done if r.summary))
    cols = [(k, h) for k, h in COLUMNS.get(scale, COLUMNS["mosi"]) if k in have]
    if not cols:  # no run finished
        return ["| objective | result |", "|---|---|", *(f"| {r.objective} | failed: {r.error} |" for r in results)]
    base = next((r.samples_per_s for r in done if r.objective == BASELINE), math.nan)
    lines = ["| objective | " + " | ".join(h for _, h in cols) + " | train samples/s | speed vs regression |",
             "|---" * (len(cols) + 3) + "|"]
    for r in results:
        if r.summary is None:
            lines.append(f"| {r.objective} | " + " | ".join("–" for _ in cols) + f" | failed: {r.error} | – |")
            continue
        mean, std = r.summary.get("test_mean", {}), r.summary.get("test_std", {})
        cells = [_pm(mean.get(k), std.get(k)) for k, _ in cols]
        rel = r.samples_per_s / base if math.isfinite(base) and base > 0 else math.nan
        lines.append(f"| {r.objective} | " + " | ".join(cells) + f" | {r.samples_per_s:.1f} | "
                     + (f"{rel:.2f}×" if math.isfinite(rel) else "–") + " |")
    return lines


def heads_table(results: list[Result]) -> list[str]:
    """Test metrics of the unimodal heads (mean ± std over seeds), when the runs report them."""
    rows: list[str] = []
    for r in results:
        per_head: dict[str, dict[str, list[float]]] = {}
        targets: dict[str, str] = {}
        for s in r.seeds.values():
            for m, met in (s.get("unimodal") or {}).get("test", {}).items():
                targets[m] = str(met.get("target", ""))
                for k in HEAD_METRICS:
                    if isinstance(met.get(k), (int, float)):
                        per_head.setdefault(m, {}).setdefault(k, []).append(float(met[k]))
        for m, vals in per_head.items():
            cells = [_pm(float(np.mean(vals[k])), float(np.std(vals[k]))) if k in vals else "–"
                     for k in HEAD_METRICS]
            rows.append(f"| {r.objective} | {m} | {targets.get(m, '')} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["| objective | head | target | " + " | ".join(HEAD_METRICS) + " |",
            "|---" * (len(HEAD_METRICS) + 3) + "|", *rows]


def stage_weights_table(results: list[Result]) -> list[str]:
    """Mean over seeds of each stage's weight in the final score, when the runs report them."""
    rows: list[tuple[str, dict[str, float]]] = []
    stages: list[str] = []
    for r in results:
        per_stage: dict[str, list[float]] = {}
        for s in r.seeds.values():
            for stage, w in (s.get("stage_weights") or {}).items():
                per_stage.setdefault(stage, []).append(float(w))
        if per_stage:
            stages += [st for st in per_stage if st not in stages]
            rows.append((r.objective, {st: float(np.mean(w)) for st, w in per_stage.items()}))
    if not rows:
        return []
    lines = ["| objective | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for objective, w in rows:
        lines.append(f"| {objective} | " + " | ".join(f"{w[st]:.3f}" if st in w else "–" for st in stages) + " |")
    return lines


def report(spec: DataSpec, n_train: int, seeds: list[int], results: list[Result]) -> str:
    """The Markdown section of one feature file."""
    done = [r for r in results if r.summary is not None]
    epochs = sorted({int(s["epochs_run"]) for r in done for s in r.seeds.values() if "epochs_run" in s})
    where = "generated by benchmarks/make_sims_like.py (defaults)" if spec.generate else str(spec.path)
    parts = [f"## {spec.name}: {where} (config {spec.config}; {n_train} train samples; seeds "
             f"{','.join(map(str, seeds))}; epochs run {'/'.join(map(str, epochs)) or '–'})", "",
             "Test metrics at the validation-selected epoch, mean ± std over seeds:", "",
             *metrics_table(results)]
    heads = heads_table(results)
    if heads:
        parts += ["", "Unimodal heads on the test split, mean ± std over seeds:", "", *heads]
    weights = stage_weights_table(results)
    if weights:
        parts += ["", "Stage weights in the final score, mean over seeds:", "", *weights]
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", help="feature file, optionally PATH:CONFIG (repeatable)")
    p.add_argument("--config", action="append", help="config of the --data at the same position (repeatable)")
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated objectives")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, the same for every objective")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the config's)")
    p.add_argument("--out", type=Path, default=Path("/tmp/objectives_bench"), help="runs and results.md go here")
    p.add_argument("--plain-regression", action="store_true",
                   help="train the regression objective without --objective (for a checkout without the option)")
    p.add_argument("--keep-state", action="store_true", help="keep the resume states of finished runs")
    args = p.parse_args()
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not objectives or not seeds:
        p.error("--objectives and --seeds need at least one value each")
    specs = parse_data(args.data, args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    failed = 0
    with tempfile.TemporaryDirectory(prefix="objectives_bench_") as tmp:
        for spec in specs:
            runs = {o: args.out / spec.name / o for o in objectives}
            missing = [o for o, d in runs.items() if not (d / "summary.json").is_file()]
            try:
                n_train = prepare(spec, args.out, Path(tmp), need_file=bool(missing))
            except (FileNotFoundError, subprocess.CalledProcessError) as e:
                print(f"{spec.name}: skipped: {e}", file=sys.stderr)
                failed += 1
                continue
            print(f"{spec.name}: {spec.path} (config {spec.config}, {n_train} train samples)", flush=True)
            results = []
            for o, run_dir in runs.items():
                error = None
                if o in missing:
                    run_dir.parent.mkdir(parents=True, exist_ok=True)
                    error = train(spec, o, seeds, args.epochs, run_dir, args.plain_regression)
                    if error is None and not args.keep_state:
                        prune_states(run_dir)
                else:
                    print(f"  {o}: reusing {run_dir}", flush=True)
                res = collect(o, run_dir, seeds, n_train)
                if error is not None:
                    res = Result(o, error=error)
                failed += res.summary is None
                results.append(res)
            sections.append(report(spec, n_train, seeds, results))
    text = "\n\n".join(sections)
    print("\n" + text)
    if text:
        (args.out / "results.md").write_text(text + "\n", encoding="utf-8")
        print(f"\nwritten to {args.out / 'results.md'}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
