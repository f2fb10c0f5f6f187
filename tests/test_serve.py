"""`almt serve`: the HTTP API on a real server (`almt serve` in a subprocess on 127.0.0.1, a free port) with a
tiny checkpoint trained on the committed mini dataset; the answers are compared with `Predictor.predict` and
with `almt predict --json` on the same clip. The argument checks and upload-name rules run without a server.

`start_server` and `tiny_checkpoint` are shared with test_serve_browser.py (one checkpoint per session)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="almt serve needs the web extra: pip install -e '.[web]'")
import httpx  # noqa: E402 - with Gradio
from typer.testing import CliRunner  # noqa: E402

from almt_pipeline.cli import app  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
CLIP = SAMPLES / "new_clip.mp4"
TRANSCRIPT = "I really loved this film, it was wonderful."
LIMIT_MB = 1  # the test server's --max-upload-mb
MAX_DURATION, MAX_QUEUE, READ_TIMEOUT = 60, 3, 3  # and its --max-duration, --max-queue, --read-timeout
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A checkpoint trained for 3 epochs on tests/data/mini_dataset, made once per session."""
    from almt_pipeline.config import load_config, replace_config
    from almt_pipeline.extractors.runner import extract
    from almt_pipeline.train import train

    root = tmp_path_factory.getbasetemp() / "serve-checkpoint"
    ckpt = root / "run" / "checkpoint"
    if not (ckpt / "config.json").is_file():
        cfg = replace_config(load_config("default"), train={"epochs": 3})
        extract(data_dir / "mini_dataset", root / "features.pkl", cfg, quiet=True)
        train(cfg, root / "features.pkl", root / "run", device="cpu", quiet=True)
    return ckpt


@dataclass
class Server:
    """`almt serve` running in a subprocess; ``tmp`` is its TMPDIR (its private folder is made there)."""

    proc: subprocess.Popen[str]
    url: str
    tmp: Path
    log: Path

    def folders(self) -> list[Path]:
        return sorted(self.tmp.glob("almt-serve-*"))

    def stop(self) -> int:
        """Ctrl-C, as a person stops it; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(ckpt: Path, root: Path, *args: str, timeout: float = 300.0) -> Server:
    """Start `almt serve --checkpoint ckpt --port 0 ...` (loopback by default) and wait for its URL line."""
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "almt_pipeline.cli", "serve", "--checkpoint", str(ckpt), "--port", "0", *args]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"),  # noqa: SIM115
                            text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout or []], daemon=True).start()
    end = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=1.0)
            break
        except queue.Empty:
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                raise AssertionError(f"no URL from the server (exit status {proc.poll()}); its log:\n"
                                     f"{log.read_text()}") from None
    assert line.startswith("serving on http://"), line + log.read_text()
    return Server(proc, line.split()[2], tmp, log)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir) -> Path:
    return tiny_checkpoint(tmp_path_factory, data_dir)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[Server]:
    s = start_server(checkpoint, tmp_path_factory.mktemp("serve"), "--max-upload-mb", str(LIMIT_MB),
                     "--max-duration", str(MAX_DURATION), "--max-queue", str(MAX_QUEUE),
                     "--read-timeout", str(READ_TIMEOUT))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def predictor(checkpoint):
    from almt_pipeline.prediction import Predictor

    return Predictor(checkpoint, device="cpu")


def post(server: Server, path: Path, name: str | None = None, **data: str) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(server.url + "api/predict", files={"clip": (name or path.name, f)}, data=data,
                          timeout=120)


def cli_json(clip: Path, checkpoint: Path) -> dict:
    r = invoke("predict", clip, "--checkpoint", checkpoint, "--json", "--quiet")
    return json.loads([ln for ln in r.output.splitlines() if ln.startswith("{")][0])


def cli_error(clip: Path, checkpoint: Path) -> str:
    """`almt predict`'s one-line error for ``clip``, with the path as the API names it (its file name)."""
    r = invoke("predict", clip, "--checkpoint", checkpoint, "--quiet")
    assert r.exit_code == 1, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("error: "))
    return line.removeprefix("error: ").replace(str(clip), clip.name)


# ----------------------------------------------------------------------------- with a server


@pytest.mark.slow
def test_health(server, checkpoint):
    from almt_pipeline import __version__

    r = httpx.get(server.url + "api/health", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "checkpoint": str(checkpoint), "label_scale": "mosi",
                        "label_range": [-3.0, 3.0], "version": __version__, "max_upload_mb": LIMIT_MB}


@pytest.mark.slow
def test_binds_loopback_by_default(server):
    assert server.url.startswith("http://127.0.0.1:")
    port = int(server.url.rstrip("/").rsplit(":", 1)[1])
    assert "no authentication" not in server.log.read_text()
    tcp = Path("/proc/net/tcp")
    if not tcp.is_file():
        pytest.skip("no /proc/net/tcp to read the listening address from")
    listening = [cols[1] for cols in (ln.split() for ln in tcp.read_text().splitlines()[1:]) if cols[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening  # 127.0.0.1, little-endian
    assert not any(a.endswith(f":{port:04X}") and a != f"0100007F:{port:04X}" for a in listening)


@pytest.mark.slow
def test_predict_with_transcript_equals_predictor_and_cli(server, checkpoint, predictor, tmp_path):
    r = post(server, CLIP, transcript=TRANSCRIPT)
    assert r.status_code == 200, r.text
    got = r.json()
    want = predictor.predict(CLIP, transcript=TRANSCRIPT).to_dict()
    assert list(got) == list(want)  # the keys of `almt predict --json`, in its order
    assert got["path"] == "new_clip.mp4" and got["transcript_source"] == "given"
    assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    for key in ("polarity", "label_class", "label_scale", "transcript", "face_fraction", "duration", "text_tokens",
                "text_len", "error"):
        assert got[key] == want[key], key
    clip = tmp_path / "new_clip.mp4"  # `almt predict` takes its transcript from a sidecar file
    shutil.copy(CLIP, clip)
    clip.with_suffix(".txt").write_text(TRANSCRIPT + "\n")
    cli = cli_json(clip, checkpoint)
    assert cli["transcript"] == got["transcript"] and cli["transcript_source"] == "sidecar"
    assert cli["score"] == pytest.approx(got["score"], abs=1e-5)
    assert list(cli) == list(got)


@pytest.mark.slow
def test_predict_without_transcript_uses_speech_recognition(server, predictor):
    r = post(server, CLIP)  # no sidecar can reach the server: speech recognition
    assert r.status_code == 200, r.text
    got, want = r.json(), predictor.predict(CLIP).to_dict()
    assert got["transcript_source"] == "asr" and got["transcript"] == want["transcript"] != ""
    assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert "asr" in got["timings"]
    blank = post(server, CLIP, transcript="   ")  # a blank transcript is no transcript
    assert blank.json()["transcript_source"] == "asr"


@pytest.mark.slow
def test_concurrent_requests_are_scored_one_at_a_time(server):
    from concurrent.futures import ThreadPoolExecutor

    t = time.perf_counter()
    with ThreadPoolExecutor(3) as pool:
        answers = [f.result().json() for f in [pool.submit(post, server, CLIP, transcript=TRANSCRIPT)
                                               for _ in range(3)]]
    wall = time.perf_counter() - t
    assert len({a["score"] for a in answers}) == 1
    assert sum(a["timings"]["total"] for a in answers) <= wall  # each clip's time is spent alone (one lock)


@pytest.mark.slow
def test_not_media_by_content_is_415(server, checkpoint, data_dir, tmp_path):
    text = tmp_path / "clip.mp4"  # a text file with a video's name
    text.write_text("these are words, not a video\n")
    r = post(server, text, name="../../somewhere/clip.mp4")  # only the last part of a client's name is used
    assert r.status_code == 415
    assert r.json() == {"error": cli_error(text, checkpoint)}
    assert r.json()["error"].startswith("clip.mp4: not a media file")
    empty = post(server, data_dir / "empty.mp4")
    assert empty.status_code == 415 and "empty" in empty.json()["error"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["too_short.mp4", "no_audio.mp4", "truncated.mp4"])
def test_bad_media_is_422_with_the_cli_line(server, checkpoint, data_dir, name):
    r = post(server, data_dir / name)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error == cli_error(data_dir / name, checkpoint) and "\n" not in error
    assert error.startswith(f"{name}: ")


@pytest.mark.slow
def test_requests_without_a_clip_are_400(server):
    url = server.url + "api/predict"
    r = httpx.post(url, files={"video": ("a.mp4", CLIP.read_bytes())}, timeout=30)
    assert r.status_code == 400 and "'clip'" in r.json()["error"]
    r = httpx.post(url, json={"clip": "a.mp4"}, timeout=30)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]


@pytest.mark.slow
def test_oversized_requests_are_413(server):
    url = server.url + "api/predict"
    big = os.urandom(LIMIT_MB * (1 << 20) + 1000)
    r = httpx.post(url, files={"clip": ("big.mp4", big)}, timeout=30)  # Content-Length says so
    assert r.status_code == 413 and "upload limit of 1 MiB" in r.json()["error"]

    def unannounced() -> Iterator[bytes]:  # chunked: no Content-Length, the bytes are counted
        yield b'--b0undary\r\nContent-Disposition: form-data; name="clip"; filename="big.mp4"\r\n\r\n'
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]
        yield b"\r\n--b0undary--\r\n"

    r = httpx.post(url, content=unannounced(), headers={"content-type": "multipart/form-data; boundary=b0undary"},
                   timeout=30)
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413
    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # a client that waits to be let send
        s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 999999999\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 413 ")  # at once, not "100 Continue"
    assert httpx.get(server.url + "api/health", timeout=30).status_code == 200  # and the server goes on


def page_call(server: Server, files: list[str], transcript: str = "") -> str:
    """The page's `analyse` called as Gradio's API is (POST, then the event stream of the result): the stream."""
    data = [[{"path": f, "meta": {"_type": "gradio.FileData"}} for f in files], transcript]
    r = httpx.post(server.url + "gradio_api/call/analyse", json={"data": data}, timeout=30)
    assert r.status_code == 200, r.text
    return httpx.get(server.url + f"gradio_api/call/analyse/{r.json()['event_id']}", timeout=120).text


@pytest.mark.slow
def test_page_scores_no_file_outside_its_uploads(server):
    for path in ("/etc/passwd", str(CLIP)):
        stream = page_call(server, [path])
        assert "event: error" in stream or "not a file uploaded to this page" in stream, stream
        assert "root:" not in stream and '"score"' not in stream
    names = {p.name for folder in server.folders() for p in folder.rglob("*")}
    assert not names & {"passwd", CLIP.name}  # nothing copied into the server's folder


def long_clip(folder: Path) -> Path:
    """A small file of MAX_DURATION + 10 s of silence (low-bitrate Opus)."""
    from almt_pipeline.probe import ffmpeg_exe

    long = folder / "long.ogg"
    subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono",
                    "-t", str(MAX_DURATION + 10), "-c:a", "libopus", "-b:a", "6k", str(long)], check=True)
    assert long.stat().st_size < 200_000
    return long


@pytest.mark.slow
def test_page_refuses_long_clips_and_too_many(server, tmp_path):
    long = long_clip(tmp_path)
    (path,) = httpx.post(server.url + "gradio_api/upload", files=[("files", (long.name, long.read_bytes()))],
                         timeout=30).json()
    stream = page_call(server, [path])
    assert "event: complete" in stream and "(--max-duration)" in stream and "the clip lasts 70" in stream, stream
    stream = page_call(server, [path] * 21)
    assert "21 files: the page takes at most 20 clips per analysis" in stream, stream


@pytest.mark.slow
def test_clips_longer_than_max_duration_are_413(server, tmp_path):
    long = long_clip(tmp_path)
    r = post(server, long, transcript=TRANSCRIPT)
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error.startswith("long.ogg: the clip lasts 70") and "\n" not in error
    assert error.endswith(f"longer than the server's limit of {MAX_DURATION:g} s (--max-duration)")


@pytest.mark.slow
def test_repeated_or_undecodable_transcripts_are_400(server):
    url, clip = server.url + "api/predict", {"clip": ("a.mp4", CLIP.read_bytes())}
    r = httpx.post(url, files={**clip, "transcript": (None, "one")}, data={"transcript": ["one", "two"]}, timeout=60)
    assert r.status_code == 400 and "more than one 'transcript'" in r.json()["error"]
    r = httpx.post(url, files=[("clip", ("a.mp4", CLIP.read_bytes())), ("transcript", (None, b"caf\xe9"))],
                   timeout=60)
    assert r.status_code == 400 and "not UTF-8" in r.json()["error"]


@pytest.mark.slow
def test_queue_is_bounded_slow_bodies_time_out_and_health_answers(server):
    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    stalled = []
    for _ in range(MAX_QUEUE):  # headers and a part of the body, then nothing
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"clip\"; "
                  b"filename=\"a.mp4\"\r\n\r\nabc")
        stalled.append(s)
    time.sleep(0.5)
    t = time.perf_counter()
    assert httpx.get(server.url + "api/health", timeout=30).status_code == 200
    assert time.perf_counter() - t < 1.0
    busy = post(server, CLIP, transcript=TRANSCRIPT)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "30" and "--max-queue" in busy.json()["error"]
    (folder,) = server.folders()
    assert len(list((folder / "api").iterdir())) == MAX_QUEUE
    for s in stalled:
        assert s.recv(100).startswith(b"HTTP/1.1 408 ")
        s.close()
    assert list((folder / "api").iterdir()) == []
    assert post(server, CLIP, transcript=TRANSCRIPT).status_code == 200  # the queue is free again


@pytest.mark.slow
def test_uploads_are_removed_and_the_folder_on_exit(server):
    post(server, CLIP, transcript=TRANSCRIPT)
    (folder,) = server.folders()
    assert folder.stat().st_mode & 0o777 == 0o700
    assert list((folder / "api").iterdir()) == []  # one folder per request, removed with the answer
    others = {p.name for p in server.tmp.iterdir()} - {folder.name, "almt-pipeline-numba.lock"}  # (audio.py's)
    assert others == set()  # nothing else in the temporary folder: Gradio's files are in the server's folder
    assert server.stop() == 130  # Ctrl-C: "interrupted", as every command
    assert server.folders() == []


@pytest.mark.slow
def test_page_views_of_a_clip(predictor, tmp_path):
    from almt_pipeline.serve_page import FaceCrops, clip_report, modality_scores

    report = clip_report(predictor, FaceCrops(predictor), CLIP, "new_clip.mp4", TRANSCRIPT, tmp_path)
    assert report.notes == [] and report.scored.fault is None
    assert report.scored.prediction.to_dict()["score"] == pytest.approx(
        predictor.predict(CLIP, transcript=TRANSCRIPT).score, abs=1e-6)  # the views do not change the score
    assert [s for s, _ in report.faces] == sorted(s for s, _ in report.faces) and len(report.faces) == 3
    assert all(png.startswith(b"\x89PNG") for _, png in report.faces)
    assert report.attention_png is not None and report.attention_png.startswith(b"\x89PNG")
    assert set(report.without) == {"text", "audio", "vision"}
    assert all(isinstance(v, float) and v != report.scored.prediction.score for v in report.without.values())
    assert modality_scores(predictor, report.scored.features) == report.without  # deterministic
    assert list(tmp_path.iterdir()) == []  # its scratch folder is gone


# ----------------------------------------------------------------------------- without a server


def test_report_html_escapes_what_comes_from_the_clip():
    from almt_pipeline.prediction import Prediction
    from almt_pipeline.serve_page import ClipReport, Scored, render_report

    p = Prediction(path="<img src=x onerror=alert(1)>.mp4", score=1.5, polarity="positive", label_class="+2 positive",
                   label_scale="mosi", transcript="<script>alert(1)</script>", transcript_source="given",
                   face_fraction=0.0, duration=3.0, text_tokens=3, text_len=50, timings={"total": 0.5})
    page = render_report(ClipReport(Scored(p), without={"text": 1.0, "audio": 1.5, "vision": None}), 3.0)
    assert "<script>" not in page and "<img src=x" not in page and "&lt;script&gt;" in page
    assert "+1.500" in page and "<td>+0.500</td>" in page  # without text: 1.0, so text contributed +0.5
    assert "not in the model" in page and "No face was found" in page
    failed = render_report(ClipReport(Scored(Prediction(path="a.mp4", error="a.mp4: too short <1 s>"))), 3.0)
    assert '<p class="almt-error">error: a.mp4: too short &lt;1 s&gt;</p>' in failed


def test_defaults_and_argument_errors(tmp_path):
    from almt_pipeline import cli_serve, serve

    assert (cli_serve.DEFAULT_HOST, cli_serve.DEFAULT_PORT, cli_serve.DEFAULT_MAX_UPLOAD_MB) == (
        serve.DEFAULT_HOST, serve.DEFAULT_PORT, serve.DEFAULT_MAX_UPLOAD_MB)
    assert serve.DEFAULT_HOST == "127.0.0.1"
    for args, words in ((["--port", "70000"], "--port"), (["--max-upload-mb", "0"], "--max-upload-mb"),
                        (["--host", "192.0.2.1"], "--host")):  # TEST-NET-1: no address of this machine
        r = invoke("serve", "--checkpoint", tmp_path, *args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        (line,) = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
        assert words in line


def test_busy_port_is_one_line_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = invoke("serve", "--checkpoint", tmp_path / "nothing", "--port", port)
    assert r.exit_code == 1
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert f"cannot listen on 127.0.0.1 port {port}" in line


def test_other_host_warns_of_no_authentication(tmp_path):
    try:
        r = invoke("serve", "--host", "0.0.0.0", "--port", "0", "--checkpoint", tmp_path / "nothing")
    finally:  # the command logs to the runner's stream, closed once it returns
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert any("no authentication" in ln for ln in lines)  # before anything is loaded (the checkpoint is missing)
    assert lines[-1].startswith("error: ") and "nothing" in lines[-1]


def test_upload_names():
    from almt_pipeline.serve import safe_name, stored_name

    assert safe_name("../../etc/clip.mp4") == "clip.mp4"
    assert safe_name("C:\\Users\\me\\my clip.MOV") == "my clip.MOV"
    assert safe_name("") == safe_name("..") == "clip"
    assert safe_name("a\x00b\nc.mp4") == "abc.mp4"
    assert stored_name("my clip.MOV") == "clip.mov"
    assert stored_name("notes.txt") == stored_name("subs.srt") == "clip"  # never its own sidecar
    assert stored_name("x.weird ext") == "clip"


def test_page_requests_are_checked(tmp_path):
    from almt_pipeline.serve_page import FIELD_LIMIT, MAX_FILES, check_request

    page = tmp_path / "page"
    (page / "h").mkdir(parents=True)
    clip = page / "h" / "a.mp4"
    clip.write_bytes(b"x" * 1000)
    assert check_request([str(clip)], "words", page, 10_000) is None
    assert check_request(["/etc/passwd"], "", page, 10_000) == "passwd: not a file uploaded to this page (refused)"
    assert "not a file uploaded" in check_request([str(page / "h" / ".." / ".." / "x.mp4")], "", page, 10_000)
    assert f"at most {MAX_FILES} clips" in check_request([str(clip)] * (MAX_FILES + 1), "", page, 10**9)
    assert "upload limit" in check_request([str(clip)] * 3, "", page, 2500)
    assert check_request([str(clip)], "a" * (FIELD_LIMIT + 1), page, 10_000) == "the transcript is larger than 1 MiB"


@pytest.mark.slow
def test_long_transcripts_skip_the_extra_views(predictor, tmp_path):
    from almt_pipeline.serve_page import VIEW_WINDOWS, FaceCrops, clip_report

    report = clip_report(predictor, FaceCrops(predictor), CLIP, "new_clip.mp4", " ".join([TRANSCRIPT] * 200), tmp_path)
    assert len(report.scored.prediction.windows) > VIEW_WINDOWS
    assert report.without == {} and report.attention_png is None
    assert any("not computed" in n for n in report.notes)


@pytest.mark.slow
def test_sigterm_during_a_long_job_exits_in_bounded_time(checkpoint, tmp_path):
    from almt_pipeline.probe import ffmpeg_exe
    from almt_pipeline.serve import FORCE_S, SHUTDOWN_S

    clip = tmp_path / "long.mp4"  # 300 s of video: scoring it takes far longer than the shutdown's bound
    subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=5:duration=300", "-f", "lavfi", "-i", "sine=frequency=300:duration=300",
                    "-c:v", "mpeg4", "-b:v", "50k", "-c:a", "aac", "-b:a", "16k", "-shortest", str(clip)], check=True)
    s = start_server(checkpoint, tmp_path / "root")
    job = threading.Thread(target=_post_quietly, args=(s, clip), daemon=True)
    job.start()
    time.sleep(4)
    assert s.proc.poll() is None and len(s.folders()) == 1
    t = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=SHUTDOWN_S + FORCE_S + 20) == 130
    assert time.perf_counter() - t < SHUTDOWN_S + FORCE_S + 10
    assert s.folders() == []
    assert "stopped without finishing the clip being scored" in s.log.read_text()


def _post_quietly(server: Server, clip: Path) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server stops under it
        post(server, clip)  # speech recognition over 300 s: long
