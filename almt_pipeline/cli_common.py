"""What the ``almt`` commands share: option declarations, logging set-up, one-line errors and
config loading with command-line overrides. Command modules (:mod:`.cli`, :mod:`.cli_analyses`)
import from here, so none of them imports another."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from .config import BUILTIN_CONFIGS, Config, load_config, parse_seed_list, replace_config
from .errors import AlmtError
from .utils import one_line

DEFAULT_FEATURES = Path("features.pkl")
F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = typer.Option(
    "default", "--config", "-c",
    help=f"Built-in config ({', '.join(BUILTIN_CONFIGS)}) or a YAML file.",
)
TextModelOpt = typer.Option(
    None, "--text-model",
    help="Override the config's text model: Hugging Face hub name or local path (BERT architecture).",
)
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")
QuietOpt = typer.Option(
    False, "--quiet", "-q",
    help="No progress bars or per-step messages; warnings, errors and final results only.",
)
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Debug logging.")
CheckpointOpt = typer.Option(None, "--checkpoint", help="Checkpoint directory (default: the newest under runs/).")
DataOpt = typer.Option(DEFAULT_FEATURES, "--data", "-d", help="MMSA-format feature pickle.")
EvalBatchOpt = typer.Option(
    None, "--batch-size",
    help="Samples per batch when scoring (default: the checkpoint config's train.eval_batch_size).",
)


def one_line_errors(func: F) -> F:
    """Turn library errors into ``error: <message>`` and exit status 1, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AlmtError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1) from None
        except OSError as e:  # unwritable output, full disk, ...: the message names the file
            typer.secho(f"error: {one_line(e)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(quiet: bool, verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("almt_pipeline.results").setLevel(min(level, logging.INFO))  # even with --quiet
    for noisy in ("transformers", "huggingface_hub", "faster_whisper", "numba", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:  # transformers' per-load "Loading weights" bar is noise next to our own progress
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def load_cli_config(config: str | Config, text_model: str | None, **sections: dict[str, Any]) -> Config:
    """A config by name/path (or an already loaded one) with command-line overrides applied."""
    cfg = config if isinstance(config, Config) else load_config(config)
    model = dict(sections.pop("model", {}))
    if text_model is not None:
        model["text_model"] = text_model
    return replace_config(cfg, model=model, **sections)


def parse_seeds(seeds: str | None) -> list[int] | None:
    """``--seeds 1,2,3`` as a list (None when not given)."""
    return None if seeds is None else parse_seed_list(seeds)
