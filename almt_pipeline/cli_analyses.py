"""The analysis commands of ``almt``: ``robustness``, ``ablate`` and ``explain`` (the paper's
figures and tables as commands). :func:`register` adds them to the main Typer app."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the analysis commands to ``app``."""
