"""``almt serve``: the web page and the HTTP API of :mod:`.serve` on one loaded checkpoint.
:func:`register` adds the command to the main Typer app."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import DeviceOpt, QuietOpt, VerboseOpt, one_line_errors, setup_logging
from .errors import DependencyError
from .utils import one_line

# the defaults of .serve, repeated here so that `almt --help` does not import it (and Gradio, torch)
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_MAX_UPLOAD_MB = "127.0.0.1", 7860, 200.0


@one_line_errors
def serve(
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint",
        help="Checkpoint directory (default: the newest under runs/).",
    ),
    host: str = typer.Option(
        DEFAULT_HOST, "--host",
        help="Address to listen on. The server has no authentication: any other than 127.0.0.1 (or ::1) lets "
             "whoever reaches it use it, and prints a warning.",
    ),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port to listen on (0: any free port; the URL is printed)."),
    max_upload_mb: float = typer.Option(
        DEFAULT_MAX_UPLOAD_MB, "--max-upload-mb",
        help="Largest upload accepted, in MiB (API: the whole request; larger ones are answered HTTP 413).",
    ),
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Serve a web page and an HTTP API that score clips with a trained checkpoint (models loaded once).

    Page: the printed URL. API: POST /api/predict (form field `clip`, optional `transcript`), GET /api/health."""
    setup_logging(quiet, verbose)
    try:
        from .serve import serve as run_serve
    except ImportError as e:  # FastAPI, uvicorn and python-multipart come with Gradio
        raise DependencyError(f"almt serve needs Gradio ({one_line(e)}): pip install 'almt-pipeline[web]'") from e

    def ready(url: str) -> None:
        typer.echo(f"serving on {url} (page; API: {url}api/predict, {url}api/health); Ctrl-C stops")

    run_serve(checkpoint, host=host, port=port, max_upload_mb=max_upload_mb, device=device, access_log=verbose,
              on_ready=ready)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``app``."""
    app.command()(serve)
