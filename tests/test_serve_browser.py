"""The page of `almt serve` in a real browser: headless Chromium driven by Playwright against `almt serve` on
127.0.0.1. A clip dropped on the page shows the score the API and `almt predict --json` give; a text file named
clip.mp4 shows `almt predict`'s one-line error while the clip next to it is scored. Screenshots are saved in the
test's folder, and copied to $ALMT_SCREENSHOT_DIR when it is set.

Needs the system's Chromium (`apt-get install chromium`; Playwright's own download is not used)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_serve import CLIP, TRANSCRIPT, Server, cli_error, cli_json, post, start_server, tiny_checkpoint

CHROMIUM = Path(os.environ.get("ALMT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
TIMEOUT_MS = 180_000  # a busy 2-core machine: speech recognition, face crops and attention maps per clip
SHOWN = """() => {  // the results are in, and faded in (nothing between them and #results is translucent)
    let e = document.querySelector('#results section');
    for (; e && e.id !== 'results'; e = e.parentElement) if (getComputedStyle(e).opacity !== '1') return false;
    return e !== null;
}"""
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[dev]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium, or set ALMT_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir) -> Path:
    return tiny_checkpoint(tmp_path_factory, data_dir)


@pytest.fixture(scope="module")
def server(browser, checkpoint, tmp_path_factory) -> Iterator[Server]:
    s = start_server(checkpoint, tmp_path_factory.mktemp("serve-page"))
    yield s
    s.stop()


@pytest.fixture
def page(browser, server):
    """A fresh page on the server; requests anywhere but the server are refused and listed in ``page.outside``."""
    p = browser.new_page(viewport={"width": 1280, "height": 900})
    p.outside = []
    p.route(lambda url: not url.startswith(server.url), lambda route: (p.outside.append(route.request.url),
                                                                       route.abort()))
    p.set_default_timeout(TIMEOUT_MS)
    p.goto(server.url)
    p.wait_for_selector("#clips")
    yield p
    p.close()


def analyse(page, *clips: Path) -> None:
    """Drop ``clips`` on the file input, press Analyse and wait for the score box to fill."""
    page.locator("#clips input[type=file]").set_input_files([str(c) for c in clips])
    for clip in clips:
        page.locator("#clips").get_by_label(clip.name, exact=True).wait_for()  # uploaded: listed
    page.click("#analyse")
    page.wait_for_function("() => { const e = document.querySelector('#score textarea, #score input');"
                           " return e !== null && e.value !== ''; }")
    page.wait_for_function(SHOWN)


def value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("ALMT_SCREENSHOT_DIR"):
        out = Path(os.environ["ALMT_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)


def test_page_scores_a_clip_as_the_api_and_the_cli(page, server, checkpoint, tmp_path):
    analyse(page, CLIP)
    shown = value(page, "score")
    api = post(server, CLIP).json()  # no transcript on the page either: speech recognition
    cli = cli_json(CLIP, checkpoint)
    assert shown == f"{api['score']:+.3f}" == f"{cli['score']:+.3f}"
    assert value(page, "status").startswith("1 clip(s): 1 scored, 0 failed")
    results = page.locator("#results")
    assert results.locator(".almt-score").inner_text() == shown
    assert api["transcript"] in results.inner_text() and "(from asr)" in results.inner_text()
    assert results.locator(".almt-faces img").count() == 3  # face crops with landmarks
    assert results.locator(".almt-contrib tr").count() == 5  # header, all, without text / audio / vision
    assert results.locator("img.almt-attention").count() == 1  # the AHL maps
    assert not page.locator("#errors").is_visible()
    screenshot(page, tmp_path / "serve_page_clip.png")
    assert page.outside == []  # the page needs nothing from the internet


def test_page_shows_the_one_line_error_of_a_bad_file(page, checkpoint, tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_text("these are words, not a video\n")
    analyse(page, bad, CLIP)
    assert value(page, "score") == "failed"  # the first clip's
    want = f"error: {cli_error(bad, checkpoint)}"
    assert value(page, "errors") == want  # the line `almt predict` prints, the file named as uploaded
    sections = page.locator("#results section")
    assert sections.count() == 2
    assert sections.nth(0).locator(".almt-error").inner_text() == want
    assert "Traceback" not in page.locator("#results").inner_text()
    assert sections.nth(1).locator(".almt-score").inner_text().startswith(("+", "-"))  # the next clip goes on
    assert value(page, "status").startswith("2 clip(s): 1 scored, 1 failed")
    screenshot(page, tmp_path / "serve_page_error.png")


def test_page_takes_a_transcript_for_one_clip(page, server):
    page.locator("#transcript textarea").fill(TRANSCRIPT)
    analyse(page, CLIP)
    api = post(server, CLIP, transcript=TRANSCRIPT).json()
    assert value(page, "score") == f"{api['score']:+.3f}"
    assert f"“{TRANSCRIPT}” (from given)" in page.locator("#results").inner_text()
