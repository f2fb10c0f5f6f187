"""The ``almt`` command line: a thin layer over the library.

    almt extract videos/      # raw clips -> features.pkl (MMSA format)
    almt train                # features.pkl -> runs/<time>/checkpoint
    almt predict clip.mp4     # newest checkpoint -> sentiment score

Each option maps to one keyword argument of a library function. Errors caused by input or
environment are printed as one line (``error: ...``) with a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from . import cli_analyses, cli_explain, cli_serve
from .cli_common import (
    DEFAULT_FEATURES,
    CheckpointOpt,
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
from .config import BUILTIN_CONFIGS, EXTRACTION_CONFIGS, Config, replace_config
from .errors import ConfigError
from .schema import SPLITS, check_split

# The commands' modules import torch and transformers: they are imported inside the commands so
# that `almt --help` and argument errors answer at once.

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Multimodal sentiment analysis with ALMT: extract features from raw clips, train, predict.",
)


@app.command()
@one_line_errors
def extract(
    input: Path = typer.Argument(..., help="A dataset folder (label.csv + Raw/), a folder of clips, or one clip."),
    out: Path = typer.Option(DEFAULT_FEATURES, "--out", "-o", help="Feature file to write (MMSA pickle)."),
    config: str = typer.Option(
        "default", "--config", "-c",
        help=f"Extraction config ({', '.join(EXTRACTION_CONFIGS)}) or a YAML file; its extract section "
             "and model lengths/widths are used.",
    ),
    text_model: str | None = TextModelOpt,
    visual_backend: str | None = typer.Option(None, "--visual-backend", help="landmarks (offline, dlib) or pyfeat."),
    fps: float | None = typer.Option(
        None, "--fps",
        help="Video frames sampled per second (config: extract.visual.fps).",
    ),
    asr_model: str | None = typer.Option(
        None, "--asr-model",
        help="faster-whisper model name or path for clips without a transcript.",
    ),
    workers: int | None = typer.Option(
        None, "--workers", "-j",
        help="Clips processed in parallel (default: 1; with --engine ray: one per CPU of the Ray cluster).",
    ),
    engine: str = typer.Option(
        "local", "--engine",
        help="local (this machine: in-process or --workers processes) or ray (a Ray cluster; needs "
             "the package's ray extra).",
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address",
        help="With --engine ray: auto or HOST:PORT of a running Ray cluster (default: start a local Ray).",
    ),
    unlabeled_split: str = typer.Option(
        "test", "--unlabeled-split",
        help=f"Split that receives clips without labels ({', '.join(SPLITS)}).",
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir",
        help="Per-clip cache (default: .almt_cache next to --out).",
    ),
    pyfeat_weights: Path | None = typer.Option(
        None, "--pyfeat-weights",
        help="pyfeat backend: folder of py-feat's weights in Hugging Face cache layout, filled once with "
             "`hf download py-feat/... --cache-dir DIR` (config: extract.visual.pyfeat_weights; default: "
             "py-feat's package folder, downloaded on first use).",
    ),
    device: str = typer.Option(
        "cpu", "--device",
        help="Device for the text and ASR models; cuda also runs py-feat there (config: extract.visual.pyfeat_device).",
    ),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Turn raw clips into an MMSA-format feature file (text, audio and face features)."""
    setup_logging(quiet, verbose)
    from .extractors.runner import extract as run_extract

    check_split(unlabeled_split, "--unlabeled-split")
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine must be local or ray, got {engine!r}")
    if ray_address is not None and engine != "ray":
        raise ConfigError("--ray-address needs --engine ray")
    if config in BUILTIN_CONFIGS and config not in EXTRACTION_CONFIGS:
        raise ConfigError(
            f"--config {config} is a training config for the official feature files; extraction "
            f"takes {' or '.join(EXTRACTION_CONFIGS)} (or a YAML file)"
        )
    cfg = load_cli_config(
        config, text_model,
        extract={"visual.backend": visual_backend, "visual.fps": fps, "asr_model": asr_model,
                 "visual.pyfeat_weights": str(pyfeat_weights.expanduser().resolve()) if pyfeat_weights else None},
    )
    if device.startswith("cuda") and cfg.extract.visual.backend == "pyfeat":  # py-feat on the GPU too
        cfg = replace_config(cfg, extract={"visual.pyfeat_device": device})
    summary = run_extract(
        input, out, cfg, workers=workers, unlabeled_split=unlabeled_split,
        cache_dir=cache_dir, device=device, quiet=quiet, engine=engine, ray_address=ray_address,
    )
    if summary.failed:
        raise typer.Exit(code=1)


@app.command()
@one_line_errors
def train(
    config: str | None = typer.Option(
        None, "--config", "-c",
        help=f"Built-in config ({', '.join(BUILTIN_CONFIGS)}) or a YAML file "
             "(default: default; with --resume: the run's own config).",
    ),
    data: Path = DataOpt,
    out: Path | None = typer.Option(
        None, "--out", "-o",
        help="Run directory (default: runs/<date-time>; with --resume: the newest run).",
    ),
    text_model: str | None = TextModelOpt,
    # bounds are checked with the config (one error line), not by the option parser
    epochs: int | None = typer.Option(None, "--epochs", help="Number of epochs (config: train.epochs)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size",
        help="Training batch size (config: train.batch_size).",
    ),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (config: train.lr)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (config: train.seed)."),
    seeds: str | None = typer.Option(
        None, "--seeds",
        help="Comma-separated seeds, e.g. 1111,1112,1113: one run each, mean +- std.",
    ),
    patience: int | None = typer.Option(
        None, "--patience",
        help="Early stopping after this many epochs without improvement.",
    ),
    select_metric: str | None = typer.Option(
        None, "--select-metric",
        help="Validation metric that selects the checkpoint (config: train.select_metric).",
    ),
    masked: bool | None = typer.Option(
        None, "--masked/--unmasked",
        help="Mask padding using the lengths (the released ALMT code does not).",
    ),
    amp: str | None = typer.Option(None, "--amp", help="Mixed precision on CUDA: none, bf16 or fp16."),
    objective: str | None = typer.Option(
        None, "--objective",
        help="Training objective: regression (the released loss), multitask, contrastive or "
             "multitask+contrastive (config: train.objective; settings in train.multitask / train.contrastive).",
    ),
    device: str = DeviceOpt,
    nproc: int | None = typer.Option(
        None, "--nproc", min=1,
        help="Train in N processes on this machine (torchrun: DistributedDataParallel, NCCL on GPUs, gloo on CPU).",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished epoch."),
    show_test_selected: bool = typer.Option(
        False, "--show-test-selected",
        help="Also print the reference-style best-per-metric table selected on TEST (not sound model selection).",
    ),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Train ALMT on a feature file; the checkpoint is selected on the validation split."""
    setup_logging(quiet, verbose)
    from .runs import latest_run, load_run_config, new_run_dir
    from .train import train as run_train

    seed_list = parse_seeds(seeds)
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if out is None and under_torchrun:  # each process would pick its own runs/<date-time>
        raise ConfigError("under torchrun, pass --out RUN_DIR: every process must write to the same run")
    out_given = out is not None
    if out is None:
        out = latest_run() if resume else new_run_dir()
    # a resumed run keeps the settings it started with
    base: str | Config = load_run_config(out) if config is None and resume else config or "default"
    cfg = load_cli_config(
        base, text_model,
        model={"masked": masked},
        train={
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "seeds": seed_list,
            "patience": patience, "select_metric": select_metric, "amp": amp, "objective": objective,
        },
    )
    if nproc is not None and nproc > 1 and not under_torchrun:
        from .distributed import launch, without_option
        from .train import check_before_launch

        check_before_launch(cfg, data, out, resume, device, nproc)  # one line here, not one per process
        argv = without_option(sys.argv[1:], "--nproc") + ([] if out_given else ["--out", str(out)])
        launch(nproc, argv)  # replaces this process
    run_train(cfg, data, out, device=device, resume=resume, quiet=quiet, show_test_selected=show_test_selected)


@app.command()
@one_line_errors
def evaluate(
    checkpoint: Path | None = CheckpointOpt,
    data: Path = DataOpt,
    split: str = typer.Option("test", "--split", help=f"Split to score ({', '.join(SPLITS)})."),
    predictions: Path | None = typer.Option(
        None, "--predictions",
        help="Write per-sample predictions (id, label, prediction) to this CSV.",
    ),
    batch_size: int | None = EvalBatchOpt,
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Score a checkpoint on one split of a feature file."""
    setup_logging(quiet, verbose)
    from .evaluate import evaluate as run_evaluate
    from .runs import find_latest_checkpoint

    check_split(split, "--split")
    ckpt = checkpoint if checkpoint is not None else find_latest_checkpoint()
    run_evaluate(ckpt, data, split=split, predictions_path=predictions, device=device,
                 batch_size=batch_size, quiet=quiet)


@app.command()
@one_line_errors
def predict(
    input: Path = typer.Argument(..., help="A clip or a folder of clips."),
    checkpoint: Path | None = CheckpointOpt,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per clip instead of text."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write results to a .jsonl or .csv file."),
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Predict the sentiment of new clips with a trained checkpoint."""
    setup_logging(quiet, verbose)
    from .prediction import Predictor, format_prediction, list_inputs, needs_asr, start_loading_asr, write_predictions
    from .runs import find_latest_checkpoint

    if out is not None and out.suffix.lower() not in (".jsonl", ".csv"):
        raise ConfigError(f"{out}: --out must end in .jsonl or .csv")
    ckpt = checkpoint if checkpoint is not None else find_latest_checkpoint()
    clips = list_inputs(input)
    asr = start_loading_asr(ckpt) if needs_asr(clips) else None
    results = Predictor(ckpt, device=device, transcriber=asr).predict_many(clips, quiet=quiet)
    for r in results:
        if r.error is not None:
            typer.secho(f"error: {r.error}", fg=typer.colors.RED, err=True)
            if not json_out:
                continue
        typer.echo(json.dumps(r.to_dict(), ensure_ascii=False) if json_out else format_prediction(r))
    if out is not None:
        write_predictions(out, results)
    failed = sum(r.error is not None for r in results)
    if len(results) > 1 and not json_out:
        typer.echo(f"{len(results) - failed} clip(s) scored, {failed} failed")
    if failed:
        raise typer.Exit(code=1)


@app.command()
@one_line_errors
def describe(
    config: str = ConfigOpt,
    text_model: str | None = TextModelOpt,
    variants: str | None = typer.Option(
        None, "--variants",
        help="Also count ablation variants: names or groups (table3, table4, table6, default, all); see `almt ablate`.",
    ),
    objective: str | None = typer.Option(
        None, "--objective", help="Count the heads this training objective adds (config: train.objective).",
    ),
) -> None:
    """Print the model's parameter counts, excluding and including the text model."""
    setup_logging(True)
    from .ablation import select_variants, variant_config
    from .model.almt import describe_model
    from .model.heads import head_spec

    cfg = load_cli_config(config, text_model, train={"objective": objective})
    info = describe_model(cfg.model, head_spec(cfg.train))
    typer.echo(f"config:        {cfg.name}")
    if cfg.train.objective != "regression":
        typer.echo(f"objective:     {cfg.train.objective} (its heads are counted)")
    typer.echo(f"text model:    {cfg.model.text_model} (hidden size {info['text_dim']}{info['text_note']})")
    typer.echo(f"parameters excluding the text model: {info['excluding_text']:,}")
    typer.echo(f"parameters including the text model: {info['total']:,}")
    if variants is not None:
        chosen = select_variants(variants, cfg.model)
        typer.echo(f"\n{'variant':<14} {'description':<28} {'excluding text':>15} {'including text':>15}")
        for v in chosen:
            try:
                vcfg = variant_config(cfg, v)
            except ConfigError as e:  # e.g. a text-only variant with the contrastive objective
                typer.echo(f"{v.name:<14} {v.label:<28} not buildable: {str(e).split(': ', 1)[-1]}")
                continue
            counts = describe_model(vcfg.model, head_spec(vcfg.train))
            typer.echo(f"{v.name:<14} {v.label:<28} {counts['excluding_text']:>15,} {counts['total']:>15,}")


@app.command("import-weights")
@one_line_errors
def import_weights(
    file: Path = typer.Argument(..., help="State dict (.pt/.pth/.bin or .safetensors) of an ALMT trained elsewhere."),
    format: str = typer.Option(..., "--format", help="official (the paper's released code) or mmsa (thuiar/MMSA)."),
    config: str = ConfigOpt,
    text_model: str | None = TextModelOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to create."),
) -> None:
    """Convert released ALMT weights into a self-contained checkpoint."""
    setup_logging(False)
    from .model.convert import import_weights as run_import

    if format not in ("official", "mmsa"):
        raise typer.BadParameter("must be official or mmsa", param_hint="--format")
    cfg = load_cli_config(config, text_model)
    run_import(file, format, cfg, None, out)
    typer.echo(f"checkpoint written to {out}")


cli_analyses.register(app)
cli_explain.register(app)
cli_serve.register(app)


def main() -> None:
    """Console entry point."""
    app(prog_name="almt")


if __name__ == "__main__":
    main()
