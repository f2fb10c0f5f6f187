"""Small shared helpers: the results logger, one-line error text, device selection, seeding,
the package version.

torch is imported inside the two functions that need it, so that loading a config or a
feature file (and the CLI's start-up) does not pay for importing it.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from .errors import ConfigError

if TYPE_CHECKING:
    import torch

# Final results (metrics, summaries) are logged here: the CLI shows them even with --quiet.
results_log = logging.getLogger("almt_pipeline.results")


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; otherwise the named device (checked)."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


ONE_LINE_LIMIT = 500  # characters of an exception's message kept on one line


def one_line(e: BaseException) -> str:
    """An exception's message on one line: whitespace folded, cut to ``ONE_LINE_LIMIT``
    characters (its type name when the message is empty)."""
    text = " ".join(str(e).split())
    if len(text) > ONE_LINE_LIMIT:
        text = text[: ONE_LINE_LIMIT - 3].rstrip() + "..."
    return text or type(e).__name__


def package_version() -> str:
    return __version__
