"""``almt serve``: the web page and the HTTP API of :mod:`.serve` on one loaded checkpoint.
:func:`register` adds the command to the main Typer app."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import CheckpointOpt, DeviceOpt, QuietOpt, VerboseOpt, one_line_errors, setup_logging
from .errors import DependencyError
from .utils import one_line

# the defaults of .serve, repeated here so that `almt --help` does not import it (and Gradio, torch)
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_MAX_UPLOAD_MB = "127.0.0.1", 7860, 200.0
DEFAULT_MAX_DURATION, DEFAULT_MAX_QUEUE, DEFAULT_READ_TIMEOUT = 600.0, 8, 120.0


@one_line_errors
def serve(
    checkpoint: Path | None = CheckpointOpt,
    host: str = typer.Option(
        DEFAULT_HOST, "--host",
        help="Address to listen on. The server has no authentication: any other than 127.0.0.1 (or ::1) lets "
             "whoever reaches it use it, and prints a warning.",
    ),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port to listen on (0: any free port; the URL is printed)."),
    max_upload_mb: float = typer.Option(
        DEFAULT_MAX_UPLOAD_MB, "--max-upload-mb",
        help="Largest upload accepted, in MiB. API: the whole request (larger ones are answered HTTP 413). Page: "
             "each file, and the clips of one analysis in all (at most 20 clips per analysis).",
    ),
    max_duration: float = typer.Option(
        DEFAULT_MAX_DURATION, "--max-duration",
        help="Longest clip scored, in seconds (its duration read from the file before scoring; API: HTTP 413).",
    ),
    max_queue: int = typer.Option(
        DEFAULT_MAX_QUEUE, "--max-queue",
        help="API requests received, waiting or being scored at once; more are answered HTTP 503 (Retry-After).",
    ),
    read_timeout: float = typer.Option(
        DEFAULT_READ_TIMEOUT, "--read-timeout",
        help="Seconds an API request's body may take to arrive; a slower one is answered HTTP 408.",
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

    run_serve(checkpoint, host=host, port=port, max_upload_mb=max_upload_mb, max_duration=max_duration,
              max_queue=max_queue, read_timeout=read_timeout, device=device, access_log=verbose, on_ready=ready)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``app``."""
    app.command()(serve)
