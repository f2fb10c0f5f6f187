"""``almt serve``: a web page and an HTTP API that score clips with one checkpoint, loaded once.

    GET  /api/health    {"status": "ok", "checkpoint", "label_scale", "label_range", "version", "max_upload_mb"}
    POST /api/predict   multipart/form-data: field ``clip`` (the media file) and optionally ``transcript`` (text;
                        blank or absent: speech recognition). 200: the JSON object ``almt predict --json`` prints
                        for the clip (``path`` is the uploaded file's name). Otherwise {"error": "<one line>"}:
                        400 no ``clip`` field, a repeated field, a transcript not UTF-8, not multipart/form-data;
                        408 a body slower than --read-timeout; 413 a request larger than the upload limit
                        (Content-Length is checked first, then the bytes received) or a clip longer than
                        --max-duration; 415 not a media file (probing its content finds no audio or video
                        stream, whatever its name); 422 a media file that cannot be scored (the line ``almt
                        predict`` prints); 500 the server failed (a missing model or package); 503 more than
                        --max-queue requests at once (with Retry-After)
    /                   the page (Gradio, :mod:`.serve_page`)

Clips are scored one at a time: the page's queue runs one job at a time and the page and the API share
one lock around the one :class:`~.prediction.Predictor`. The server keeps its files in a private folder
(mode 0700) under the system's temporary folder, removed when it stops: each API upload in a folder of
its own, removed as soon as the request is answered; the page's uploads in ``page/`` (Gradio's cache:
files older than an hour are removed every hour; the page scores only files there). The server has no
authentication: it listens on 127.0.0.1 unless told otherwise, and warns when told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from io import BufferedWriter
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from . import __version__
from .errors import AlmtError, ConfigError, DependencyError, MediaError
from .metrics import LABEL_RANGES, canonical_scale
from .prediction import Predictor
from .probe import ffmpeg_exe, probe
from .processes import sigterm_as_interrupt
from .serve_page import CSS, FIELD_LIMIT, FaceCrops, build_page, clip_report, duration_error, score_upload
from .utils import one_line, results_log

log = logging.getLogger(__name__)

MB = 1 << 20  # --max-upload-mb counts MiB, as Gradio's upload limit does
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_MAX_UPLOAD_MB = "127.0.0.1", 7860, 200.0
DEFAULT_MAX_DURATION, DEFAULT_MAX_QUEUE, DEFAULT_READ_TIMEOUT = 600.0, 8, 120.0  # s, requests, s
CLIP_FIELD, TRANSCRIPT_FIELD = "clip", "transcript"
LINGER_BYTES, LINGER_S = 8 * MB, 2.0  # a refused body: read and dropped up to this, so the client hears why
SHUTDOWN_S, NAME_CHARS = 3, 120  # s open connections (a page's event stream) get at the stop; chars of a file name
FORCE_S = 10  # then seconds a clip being scored gets to finish before the process exits without it


class ApiError(Exception):
    """A request the API refuses: HTTP status and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """A received request: the clip saved under ``path``, its name on the client, the transcript ("": blank)."""

    path: Path | None = None
    name: str = "clip"
    transcript: str | None = None


def safe_name(filename: str) -> str:
    """The last component of a client's file name, without control characters, at most NAME_CHARS long."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", filename.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return name[-NAME_CHARS:] if name not in ("", ".", "..") else CLIP_FIELD


def stored_name(name: str) -> str:
    """The upload's file name on disk: ``clip`` with the client's extension when it is a plain one (never
    that of a transcript file, which the clip would then read as its own sidecar)."""
    suffix = Path(name).suffix.lower()
    return CLIP_FIELD + (suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) and suffix not in (".txt", ".srt") else "")


class FormReader:
    """Streams a multipart/form-data body: the clip's bytes to a file in ``folder``, the transcript into
    memory, other fields nowhere. Raises :class:`ApiError` (from :meth:`feed`) as soon as a rule is broken."""

    def __init__(self, boundary: bytes, folder: Path) -> None:
        self.folder, self.upload = folder, Upload()
        self._header = [bytearray(), bytearray()]  # the part header being read: field, value
        self._headers: dict[str, bytes] = {}
        self._field = ""
        self._file: BufferedWriter | None = None
        self._text = bytearray()
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": lambda d, s, e: self._header[0].extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header[1].extend(d[s:e]), "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done, "on_part_data": self._data, "on_part_end": self._end,
        })

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as e:
            raise ApiError(400, f"the request is not valid multipart/form-data ({one_line(e)})") from e

    def finish(self) -> Upload:
        try:
            self.parser.finalize()
        except MultipartParseError as e:
            raise ApiError(400, f"the request is not valid multipart/form-data ({one_line(e)})") from e
        if self._file is not None:  # the body ended inside the clip's part
            self._file.close()
            raise ApiError(400, "the request ended in the middle of the clip (upload interrupted?)")
        if self.upload.path is None:
            raise ApiError(400, f"no file in the form field {CLIP_FIELD!r}: send the clip as multipart/form-data, "
                                f"e.g. curl -F {CLIP_FIELD}=@video.mp4")
        return self.upload

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _begin(self) -> None:
        self._headers, self._field = {}, ""

    def _header_end(self) -> None:
        self._headers[self._header[0].decode("latin-1").strip().lower()] = bytes(self._header[1])
        self._header = [bytearray(), bytearray()]

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        self._field = options.get(b"name", b"").decode("utf-8", "replace")
        if self._field == CLIP_FIELD:
            if self.upload.path is not None:
                raise ApiError(400, f"more than one {CLIP_FIELD!r} field: send one clip per request")
            self.upload.name = safe_name(options.get(b"filename", b"").decode("utf-8", "replace"))
            self.upload.path = self.folder / stored_name(self.upload.name)
            self._file = open(self.upload.path, "xb")  # noqa: SIM115 - closed at the part's end or in close()
        elif self._field == TRANSCRIPT_FIELD:
            if self.upload.transcript is not None:
                raise ApiError(400, f"more than one {TRANSCRIPT_FIELD!r} field: send one transcript per request")
            self._text.clear()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._field == CLIP_FIELD and self._file is not None:
            self._file.write(data[start:end])
        elif self._field == TRANSCRIPT_FIELD:
            self._text += data[start:end]
            if len(self._text) > FIELD_LIMIT:
                raise ApiError(413, f"the {TRANSCRIPT_FIELD!r} field is larger than {FIELD_LIMIT // MB} MiB")

    def _end(self) -> None:
        if self._field == CLIP_FIELD and self._file is not None:
            self._file.close()
            self._file = None
        elif self._field == TRANSCRIPT_FIELD:
            try:
                text = " ".join(self._text.decode("utf-8").split())
            except UnicodeDecodeError as e:
                raise ApiError(400, f"the {TRANSCRIPT_FIELD!r} field is not UTF-8 text ({one_line(e)})") from e
            self.upload.transcript = text or ""


class Body:
    """A request's body read from the ASGI channel, chunk by chunk, knowing whether it has all come."""

    def __init__(self, request: Request) -> None:
        self.request, self.received, self.done = request, 0, False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            self.done = not message.get("more_body", False)
            chunk = message.get("body", b"")
            self.received += len(chunk)
            yield chunk

    async def discard(self) -> None:
        """Read and drop what remains of a refused body, at most LINGER_BYTES for LINGER_S seconds, so that the
        client is reading when the answer comes (closing on unread data resets the connection). Nothing is
        read from a client that waits to be told to send it (Expect: 100-continue): reading would tell it."""
        waiting = self.received == 0 and self.request.headers.get("expect", "").lower() == "100-continue"
        if self.done or waiting:
            return
        start = self.received

        async def drop() -> None:
            async for _ in self.chunks():
                if self.received - start > LINGER_BYTES:
                    return

        with contextlib.suppress(asyncio.TimeoutError, ClientDisconnect):
            await asyncio.wait_for(drop(), LINGER_S)


async def read_upload(body: Body, folder: Path, limit: int) -> Upload:
    """The request's form, the clip written to ``folder``; at most ``limit`` bytes of body are accepted."""
    kind, options = parse_options_header(body.request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(400, f"send the clip as multipart/form-data in the field {CLIP_FIELD!r} "
                            f"(got Content-Type {kind.decode('latin-1') or 'none'})")
    length = body.request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, too_large(limit, int(length)))
    reader = FormReader(options[b"boundary"], folder)
    try:
        async for chunk in body.chunks():
            if body.received > limit:  # sent without a length (chunked): the bytes are counted
                raise ApiError(413, too_large(limit))
            reader.feed(chunk)
        return reader.finish()
    finally:
        reader.close()


def too_large(limit: int, length: int | None = None) -> str:
    size = f" ({length / MB:.1f} MiB)" if length is not None else ""
    return f"the request{size} is larger than the server's upload limit of {limit / MB:g} MiB (--max-upload-mb)"


class Service:
    """The loaded predictor, the lock that makes clips go one at a time, the server's folder and limit."""

    def __init__(self, predictor: Predictor, work_dir: Path, limit: int, max_duration: float, max_queue: int,
                 read_timeout: float) -> None:
        self.predictor, self.work_dir, self.limit = predictor, work_dir, limit
        self.max_duration, self.max_queue, self.read_timeout = max_duration, max_queue, read_timeout
        self.active = 0  # API requests being received, waiting or scored (changed on the event loop only)
        self.lock = threading.Lock()
        self.uploads = work_dir / "api"
        self.uploads.mkdir(mode=0o700, exist_ok=True)

    def health(self) -> dict[str, Any]:
        bound = LABEL_RANGES[canonical_scale(self.predictor.label_scale)]
        return {"status": "ok", "checkpoint": str(self.predictor.path), "label_scale": self.predictor.label_scale,
                "label_range": [-bound, bound], "version": __version__, "max_upload_mb": self.limit / MB}

    def score(self, upload: Upload) -> tuple[int, dict[str, Any]]:
        """HTTP status and JSON body for a received upload (see the module's description)."""
        assert upload.path is not None
        path, name = upload.path, upload.name
        try:
            info = probe(path)
        except MediaError as e:
            return 415, {"error": one_line(e).replace(str(path), name)}
        except DependencyError as e:
            return 500, {"error": one_line(e)}
        if not (info.has_audio or info.has_video):
            return 415, {"error": f"{name}: no audio or video stream (not a media file)"}
        too_long = duration_error(info, name, self.max_duration)
        if too_long is not None:
            return 413, {"error": too_long}
        with self.lock:
            scored = score_upload(self.predictor, path, name, upload.transcript or None)
        result = scored.prediction
        status = 200 if scored.fault is None else 422 if scored.fault == "input" else 500
        if status == 200:
            log.info("%s: %+.3f in %.2f s", name, result.score, result.timings.get("total", math.nan))
        else:
            log.info("%s: HTTP %d, %s", name, status, result.error)
        return status, result.to_dict() if status == 200 else {"error": result.error}


def build_app(predictor: Predictor, work_dir: Path, max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * MB),
              max_duration: float = DEFAULT_MAX_DURATION, max_queue: int = DEFAULT_MAX_QUEUE,
              read_timeout: float = DEFAULT_READ_TIMEOUT) -> FastAPI:
    """The API and the page on one app; their files go under ``work_dir`` (an existing private folder; see
    :func:`use_gradio_cache`)."""
    gr = use_gradio_cache(work_dir)
    service = Service(predictor, work_dir, max_upload_bytes, max_duration, max_queue, read_timeout)
    app = FastAPI(title="almt serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.post("/api/predict")
    async def predict(request: Request) -> Response:
        body = Body(request)
        if service.active >= service.max_queue:
            await body.discard()
            busy = f"the server is busy ({service.max_queue} requests waiting or being scored, --max-queue): try later"
            return JSONResponse({"error": busy}, status_code=503, headers={"Retry-After": "30"})
        service.active += 1
        folder = Path(tempfile.mkdtemp(dir=service.uploads))
        try:
            upload = await asyncio.wait_for(read_upload(body, folder, service.limit), service.read_timeout)
            status, answer = await run_in_threadpool(service.score, upload)
        except ApiError as e:
            await body.discard()
            status, answer = e.status, {"error": str(e)}
        except ClientDisconnect:
            return Response(status_code=400)  # nobody reads it
        except asyncio.TimeoutError:  # an OSError: before that
            status, answer = 408, {"error": f"the request's body did not arrive within {service.read_timeout:g} s"}
        except OSError as e:  # a full disk, ...
            status, answer = 500, {"error": f"the server cannot store the upload ({one_line(e)})"}
        finally:
            service.active -= 1
            shutil.rmtree(folder, ignore_errors=True)
        if status == 200:  # the bytes of `almt predict --json` (NaN kept as the CLI prints it)
            return Response(json.dumps(answer, ensure_ascii=False), media_type="application/json")
        return JSONResponse(answer, status_code=status)

    page = build_page(predictor, service.lock, work_dir, max_upload_bytes, max_duration)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app = gr.mount_gradio_app(app, page, "/", theme=theme, css=CSS, footer_links=[], run_history=False,
                              mcp_server=False, max_file_size=max_upload_bytes, show_error=True)
    page.has_launched = True  # Gradio checks the paths in a request only then: files outside its cache are refused
    return app


def use_gradio_cache(work_dir: Path) -> Any:
    """Gradio (the module), its cache (the page's uploads and pictures) put in ``work_dir/page`` through
    GRADIO_TEMP_DIR for this process: entirely so when Gradio is first imported here (some of its parts read
    the variable once, when imported). :class:`DependencyError` when Gradio is not installed."""
    os.environ["GRADIO_TEMP_DIR"] = str(work_dir / "page")
    try:
        import gradio
    except ImportError as e:
        raise DependencyError(f"almt serve needs Gradio ({one_line(e)}): pip install 'almt-pipeline[web]'") from e
    return gradio


def check_upload_limit(max_upload_mb: float, **others: float) -> int:
    """--max-upload-mb in bytes (positive); ``others`` (option name with _ for -: value) must be positive too."""
    if not (max_upload_mb > 0 and max_upload_mb * MB < 2**62):
        raise ConfigError(f"--max-upload-mb must be a positive number of MiB, got {max_upload_mb:g}")
    for option, value in others.items():
        if not 0 < value < math.inf:
            raise ConfigError(f"--{option.replace('_', '-')} must be a positive number, got {value:g}")
    return int(max_upload_mb * MB)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: any free port), not yet listening."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: cannot be resolved to an address ({one_line(e)})") from e
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host} port {port} ({one_line(e)}); choose another --port or --host") \
            from e
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def stop_scoring(folder: Path) -> None:
    """Give the threads still scoring FORCE_S seconds to end; if one has not, remove ``folder`` and exit (130)."""
    end = time.monotonic() + FORCE_S
    others = [t for t in threading.enumerate() if not t.daemon and t is not threading.current_thread()]
    for thread in others:
        thread.join(max(0.0, end - time.monotonic()))
    if not any(t.is_alive() for t in others):
        return
    log.warning("interrupted: stopped without finishing the clip being scored")
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(130)


def warm_up(predictor: Predictor, folder: Path) -> None:
    """Wait for the speech recogniser and score a generated 2-second clip once, with the page's views, so that
    one-time costs (lazy loading, compilation) are paid before the first request. A failure is logged: the
    server runs anyway."""
    try:
        predictor.extractor.transcriber.transcribe(np.zeros(16000, dtype=np.float32))
    except AlmtError as e:
        log.warning("speech recognition is unavailable (%s): clips need a transcript", one_line(e))
    clip = folder / "warm-up.mp4"
    try:
        subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                        "testsrc2=size=320x240:rate=25:duration=2", "-f", "lavfi", "-i",
                        "sine=frequency=220:duration=2", "-c:v", "mpeg4", "-c:a", "aac", "-shortest", str(clip)],
                       check=True, capture_output=True, timeout=60)
        clip_report(predictor, FaceCrops(predictor), clip, clip.name, "warm up", folder)
    except (AlmtError, OSError, subprocess.SubprocessError) as e:
        log.debug("warm-up skipped: %s", one_line(e))
    finally:
        clip.unlink(missing_ok=True)


def serve(checkpoint: str | Path | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_duration: float = DEFAULT_MAX_DURATION,
          max_queue: int = DEFAULT_MAX_QUEUE, read_timeout: float = DEFAULT_READ_TIMEOUT, device: str = "auto",
          access_log: bool = False, on_ready: Callable[[str], None] | None = None) -> None:
    """Load ``checkpoint`` (default: the newest under runs/) and its extractors, then serve the page and the
    API on ``host``:``port`` until Ctrl-C or SIGTERM; ``on_ready(url)`` is called once it accepts requests."""
    limit = check_upload_limit(max_upload_mb, max_duration=max_duration, max_queue=max_queue,
                               read_timeout=read_timeout)
    with sigterm_as_interrupt(), bind(host, port) as sock, \
            tempfile.TemporaryDirectory(prefix="almt-serve-", ignore_cleanup_errors=True) as folder:  # mode 0700
        work_dir = Path(folder)
        if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
            log.warning("warning: the server has no authentication: on %s anyone who can reach port %d can send "
                        "it clips and read the results (--host 127.0.0.1 keeps it to this machine)",
                        host, sock.getsockname()[1])
        use_gradio_cache(work_dir)
        t = time.perf_counter()
        predictor = Predictor(checkpoint, device=device, preload_asr=True)
        warm_up(predictor, work_dir)
        app = build_app(predictor, work_dir, limit, max_duration, max_queue, read_timeout)
        for name in ("uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).setLevel(logging.INFO if access_log else logging.WARNING)
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=access_log, lifespan="on",
                                               timeout_graceful_shutdown=SHUTDOWN_S))
        sock.listen(128)
        log.info("loaded %s and warmed up in %.1f s", predictor.path, time.perf_counter() - t)
        (on_ready or (lambda u: results_log.info("serving on %s", u)))(url_of(sock))
        try:
            server.run(sockets=[sock])
        finally:
            stop_scoring(work_dir)
        if server.should_exit:  # a signal stopped it; uvicorn re-raises it, unless this process ignores SIGINT
            raise KeyboardInterrupt
