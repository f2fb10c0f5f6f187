"""Ablations of ALMT: named model variants and ``almt ablate``, which trains each with the same
protocol and seeds and tabulates their test metrics.

Each variant is the config's model with one ablation switch of :class:`~.config.ModelConfig` set
(the paper's tables; the switches are documented on the fields and in :mod:`.model.almt`):

- Table 3, modalities: ``no-audio`` and ``no-vision`` build and train the model without that
  modality (no embedding, no AHL keys/values for it); ``text-only`` drops both, and with them AHL
  (which would have nothing to attend to): the fusion transformer attends to the language tokens.
- Table 4, components: ``no-ahl`` (no adaptive hyper-modality learning: the fusion transformer's
  source is the language, audio and vision summary tokens concatenated), ``no-fusion`` (no cross-modality
  fusion transformer: a linear head on the token-averaged last language scale and
  hyper-modality), ``no-embedding`` (no modality-embedding transformer: each modality's T tokens
  are averages of T equal segments of its projected frames).
- Table 6, language guidance: ``guide-<layers>`` keeps language guidance only in the listed AHL
  layers (e.g. ``guide-13``: layers 1 and 3); the other layers become MLPs on the hyper-modality.

Every variant is one training run in ``OUT/<variant>/`` (with ``seed_<s>/`` folders when several
seeds are given), so an interrupted ablation continues where it stopped when rerun: finished
variants are read back, an unfinished one resumes from its last finished epoch.

Files written to ``OUT``: ``ablation.csv`` (one row per variant: parameters, seeds, and
``<metric>_mean`` / ``<metric>_std`` of the test metrics of each seed's validation-selected
epoch), ``ablation.json`` (the same plus each variant's model switches and run folder) and
``ablation.png`` (test MAE and Acc-2 per variant, mean +- std, the full model as a reference line).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, ModelConfig, is_released_architecture, replace_config
from .errors import ConfigError
from .files import atomic_write, atomic_write_csv, atomic_write_json, check_writable
from .metrics import HEADLINE_METRICS, canonical_scale
from .utils import results_log

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("ablation")
GROUPS = ("table3", "table4", "table6", "default", "all")


@dataclass(frozen=True)
class Variant:
    """A named model variant: ``overrides`` are ``model`` config keys applied to the base config."""

    name: str  # folder-safe id, e.g. "no-ahl"
    label: str  # the row title, e.g. "w/o AHL"
    table: str  # the paper table it belongs to ("" for the full model)
    overrides: dict[str, Any] = field(default_factory=dict)


def all_variants(m: ModelConfig) -> dict[str, Variant]:
    """The variants of model config ``m``, by name (guidance subsets depend on ``m.ahl_depth``)."""
    found = [
        Variant("full", "ALMT (full)", ""),
        Variant("no-audio", "w/o audio", "3", {"drop_modalities": ["audio"]}),
        Variant("no-vision", "w/o vision", "3", {"drop_modalities": ["vision"]}),
        Variant("text-only", "w/o audio & vision", "3", {"drop_modalities": ["audio", "vision"], "ahl": False}),
        Variant("no-ahl", "w/o AHL", "4", {"ahl": False}),
        Variant("no-fusion", "w/o fusion transformer", "4", {"fusion": False}),
        Variant("no-embedding", "w/o modality embedding", "4", {"modality_embedding": False}),
    ]
    layers = range(1, m.ahl_depth + 1)
    if m.ahl_depth <= 9:  # one digit per layer in the name; deeper stacks: set model.guided_layers
        for k in range(1, m.ahl_depth):
            for subset in itertools.combinations(layers, k):
                digits = "".join(str(j) for j in subset)
                found.append(Variant(f"guide-{digits}", "guided by " + ", ".join(f"H_l^{j}" for j in subset), "6",
                                     {"guided_layers": list(subset)}))
    return {v.name: v for v in found}


def select_variants(spec: str, m: ModelConfig) -> list[Variant]:
    """Variants named by a comma-separated ``spec`` of names and groups (``table3``, ``table4``,
    ``table6``, ``default`` = full + Tables 3 and 4, ``all``); the full model always comes first."""
    known = all_variants(m)
    chosen: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in ("default", "all"):
            names = [n for n, v in known.items() if item == "all" or v.table in ("", "3", "4")]
        elif item in ("table3", "table4", "table6"):
            names = [n for n, v in known.items() if v.table == item[-1]]
        elif item in known:
            names = [item]
        else:
            raise ConfigError(f"--variants: unknown variant {item!r} (variants: {', '.join(known)}; groups: "
                              f"{', '.join(GROUPS)})")
        chosen += [n for n in names if n not in chosen]
    if not chosen:
        raise ConfigError("--variants: no variant given")
    if "full" not in chosen:
        chosen.insert(0, "full")  # the reference every row is compared with
    return [known["full"]] + [known[n] for n in chosen if n != "full"]


def variant_config(cfg: Config, variant: Variant) -> Config:
    """``cfg`` with the variant's model switches applied (checked like any config)."""
    d = dict(variant.overrides)
    return replace_config(cfg, model=d) if d else cfg


def ablate(cfg: Config, data_path: str | os.PathLike, variants: Sequence[Variant], *,
           out_dir: str | os.PathLike = DEFAULT_OUT, device: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Train every variant of ``cfg`` on ``data_path`` (same protocol, same seeds: ``cfg.train``)
    into ``out_dir/<variant>``, continuing unfinished ones; returns and writes the table."""
    from .model.almt import describe_model
    from .model.heads import head_spec
    from .runs import read_summary
    from .train import train

    if not is_released_architecture(cfg.model):
        raise ConfigError(f"{cfg.name}: ablate starts from the full model; remove the ablation switches (model.ahl, "
                          "fusion, modality_embedding, guided_layers, drop_modalities) from the config")
    out = Path(out_dir)
    # every variant's config and earlier run are checked before hours of training start
    configs = [variant_config(cfg, v) for v in variants]
    for variant, vcfg in zip(variants, configs):
        _check_same_settings(out / variant.name, vcfg, Path(data_path))
    check_writable(out, folder=True)
    rows: list[dict[str, Any]] = []
    for i, (variant, vcfg) in enumerate(zip(variants, configs), 1):
        run_dir = out / variant.name
        summary = read_summary(run_dir) if (run_dir / "summary.json").is_file() else None
        if summary is None:
            logger.info("variant %d/%d: %s (%s) -> %s", i, len(variants), variant.name, variant.label, run_dir)
            try:
                with _results_only_at_the_end(quiet):
                    summary = train(vcfg, data_path, run_dir, device=device, resume=True, quiet=quiet)
            except KeyboardInterrupt:
                logger.warning("interrupted in variant %s: rerun the same command to continue", variant.name)
                raise
        else:
            logger.info("variant %d/%d: %s already trained (%s)", i, len(variants), variant.name, run_dir)
        params = describe_model(vcfg.model, head_spec(vcfg.train))["excluding_text"]
        rows.append(_row(variant, vcfg, summary, run_dir, params))
    scale = canonical_scale(rows[0]["label_scale"])
    result = {"data": str(data_path), "config": cfg.name, "seeds": cfg.train.seeds or [cfg.train.seed],
              "label_scale": scale, "std": "population (ddof=0) over seeds", "variants": rows}
    _write(out, result, scale)
    results_log.info("ablation on %s, test metrics of the validation-selected epoch (mean ± std over %d seed(s)):\n%s",
                     data_path, len(result["seeds"]), format_table(rows, scale))
    results_log.info("wrote %s, %s and %s", out / "ablation.csv", out / "ablation.json", out / "ablation.png")
    return result


@contextlib.contextmanager
def _results_only_at_the_end(quiet: bool) -> Iterator[None]:
    """With ``quiet``, each variant's own result lines (selected epoch, per-seed table) are not
    shown: the ablation table at the end has them all."""
    level = results_log.level
    if quiet:
        results_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        results_log.setLevel(level)


def _check_same_settings(run_dir: Path, cfg: Config, data_path: Path) -> None:
    """A variant folder from an earlier call must have been trained with the settings and the data
    asked for now (else its numbers would sit in one table with runs made differently)."""
    from .runs import RUN_FILE, config_differences, load_run_config, read_run_file

    if not (run_dir / RUN_FILE).is_file():
        return
    diff = [d for d in config_differences(load_run_config(run_dir), cfg) if not d.startswith("name:")]
    if diff:
        raise ConfigError(f"{run_dir}: this variant was trained with other settings ({'; '.join(diff[:3])}); "
                          "give the same options as before, or another --out")
    trained_on = read_run_file(run_dir).get("data")
    if trained_on and Path(trained_on).resolve() != data_path.resolve():
        raise ConfigError(f"{run_dir}: this variant was trained on {trained_on}, not {data_path}; "
                          "use another --out for another feature file")


def _row(variant: Variant, cfg: Config, summary: dict[str, Any], run_dir: Path, params: int) -> dict[str, Any]:
    """One table row from a run summary (one seed: ``test``; several: ``test_mean`` / ``test_std``)."""
    if "test_mean" in summary:
        mean, std, seeds = summary["test_mean"], summary["test_std"], summary["seeds"]
    else:
        mean, std, seeds = summary["test"], {k: 0.0 for k in summary["test"]}, [summary["seed"]]
    if not mean:
        raise ConfigError(f"{run_dir}: the run has no test metrics; ablation needs a labelled test split")
    return {"variant": variant.name, "label": variant.label, "table": variant.table, "parameters": params,
            "seeds": seeds, "test_mean": mean, "test_std": std, "label_scale": summary["label_scale"],
            "run": str(run_dir), "model": dict(variant.overrides)}


def format_table(rows: Sequence[dict[str, Any]], scale: str) -> str:
    """The rows as an aligned text table: variant, parameters, "mean ± std" per headline metric."""
    cols = HEADLINE_METRICS[scale]
    header = [f"{'variant':<26}", f"{'params':>10}"] + [f"{title:>15}" for _, title in cols]
    lines = [" ".join(header)]
    for r in rows:
        cells = [f"{r['label']:<26}", f"{r['parameters']:>10,}"]
        cells += [f"{r['test_mean'][k]:>7.4f} ± {r['test_std'][k]:<6.4f}" for k, _ in cols]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def _write(out: Path, result: dict[str, Any], scale: str) -> None:
    rows = result["variants"]
    keys = list(rows[0]["test_mean"])
    header = ["variant", "label", "table", "parameters", "seeds"]
    header += [f"{k}_{part}" for k in keys for part in ("mean", "std")]
    atomic_write_csv(out / "ablation.csv", header, (
        [r["variant"], r["label"], r["table"], r["parameters"], " ".join(str(s) for s in r["seeds"])]
        + [f"{r[f'test_{part}'].get(k, float('nan')):.6g}" for k in keys for part in ("mean", "std")]
        for r in rows
    ))
    atomic_write_json(out / "ablation.json", result)
    plot_ablation(out / "ablation.png", rows, scale)


def plot_ablation(path: Path, rows: Sequence[dict[str, Any]], scale: str) -> None:
    """One row per variant with test MAE and Acc-2 (mean as a point, std as an error bar); the full
    model's value as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [c for c in HEADLINE_METRICS[scale] if c[1] in ("MAE", "Acc-2")]
    labels = [r["label"] for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * len(rows) + 1.6), sharey=True)
    for ax, (key, title) in zip(np.atleast_1d(axes), panels):
        mean = np.array([r["test_mean"][key] for r in rows])
        std = np.array([r["test_std"][key] for r in rows])
        for row, (m, s, r) in enumerate(zip(mean, std, rows)):  # points, not bars: the axis need not start at 0
            ax.errorbar(m, row, xerr=s, fmt="o", color="tab:gray" if r["variant"] == "full" else "tab:blue",
                        capsize=4, markersize=7)
        ax.axvline(mean[0], color="black", linestyle="--", linewidth=1, label="full model")
        ax.margins(x=0.15)
        ax.set_title(f"test {title} ({'lower' if key == 'MAE' else 'higher'} is better)")
        ax.grid(axis="x", alpha=0.3)
    first = np.atleast_1d(axes)[0]
    first.set_yticks(y, labels)
    first.invert_yaxis()
    n = len(rows[0]["seeds"])
    fig.suptitle(f"Ablation: mean ± std over {n} seed{'s' if n > 1 else ''}")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
