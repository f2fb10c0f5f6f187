"""The analysis commands of ``almt``: ``robustness`` and ``ablate`` (the paper's
figures and tables as commands). :func:`register` adds them to the main Typer app."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import (
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    EvalBatchOpt,
    QuietOpt,
    TextModelOpt,
    VerboseOpt,
    load_cli_config,
    one_line_errors,
    parse_seeds,
    setup_logging,
)
from .schema import SPLITS, check_split


@one_line_errors
def robustness(
    checkpoint: list[Path] | None = typer.Option(
        None, "--checkpoint",
        help="Checkpoint directory; repeat the option to compare models (default: the newest under runs/).",
    ),
    data: Path = DataOpt,
    split: str = typer.Option("test", "--split", help=f"Labelled split to score ({', '.join(SPLITS)}).",),
    rates: str = typer.Option(
        "0:0.9:0.1", "--rates",
        help="Missing rates: START:STOP:STEP (stop included) or a comma-separated list, each in [0, 1].",
    ),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated noise seeds: mean ± std over them."),
    modalities: str = typer.Option(
        "text,audio,vision", "--modalities",
        help="Modalities that get noise, and a 'w/o' row each: a comma-separated subset of text,audio,vision.",
    ),
    out: Path = typer.Option(
        Path("robustness"), "--out", "-o",
        help="Folder for robustness.csv, robustness.json and robustness.png.",
    ),
    batch_size: int | None = EvalBatchOpt,
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Scores under missing text tokens and audio/vision frames (LNLN protocol), as a table and a curve."""
    setup_logging(quiet, verbose)
    from .robustness import parse_modalities, parse_rates, parse_seeds
    from .robustness import robustness as run_robustness
    from .runs import find_latest_checkpoint

    check_split(split, "--split")
    rate_list = parse_rates(rates, "--rates")
    seed_list = parse_seeds(seeds, "--seeds")
    modality_list = parse_modalities(modalities, "--modalities")
    checkpoints = list(checkpoint or []) or [find_latest_checkpoint()]
    run_robustness(checkpoints, data, split=split, rates=rate_list, seeds=seed_list, modalities=modality_list,
                   out_dir=out, device=device, batch_size=batch_size, quiet=quiet)


@one_line_errors
def ablate(
    data: Path = DataOpt,
    config: str = ConfigOpt,
    variants: str = typer.Option(
        "default", "--variants",
        help="Comma-separated variants or groups: table3 (modalities), table4 (components), table6 (language "
             "guidance), default (full + tables 3 and 4), all; names as `almt describe --variants all` lists.",
    ),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds, the same for every variant."),
    out: Path = typer.Option(Path("ablation"), "--out", "-o", help="Folder of the variants' runs and the table."),
    text_model: str | None = TextModelOpt,
    epochs: int | None = typer.Option(None, "--epochs", help="Number of epochs (config: train.epochs)."),
    patience: int | None = typer.Option(None, "--patience", help="Early stopping patience (config: train.patience)."),
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Train the paper's ablation variants with the same protocol and seeds; one table of test metrics.

    Each variant is a run in OUT/<variant>: rerunning after an interruption continues where it stopped.
    """
    setup_logging(quiet, verbose)
    from .ablation import ablate as run_ablate
    from .ablation import select_variants

    cfg = load_cli_config(config, text_model,
                          train={"seeds": parse_seeds(seeds), "epochs": epochs, "patience": patience})
    run_ablate(cfg, data, select_variants(variants, cfg.model), out_dir=out, device=device, quiet=quiet)


def register(app: typer.Typer) -> None:
    """Add the analysis commands to ``app``."""
    app.command()(robustness)
    app.command()(ablate)
