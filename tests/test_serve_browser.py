"""The web page in a real browser: Playwright drives Debian's `chromium`, headless, against a
live `echox serve` (the embedded model) on localhost.

Chromium's fake media flags make the packaged question the microphone. The test records a turn,
waits for the streamed text and for Web Audio playback to start (before the answer is over),
types a second turn, checks the history, saves screenshots, and checks that a refusal is shown.

Playwright must not download a browser of its own: the system Chromium is used
(`$ECHOX_CHROMIUM`, else `chromium` on PATH). Without it, or without the playwright package,
this test FAILS: it is never skipped (`.ci/run` installs chromium with apt). Screenshots go to
`$ECHOX_BROWSER_ARTIFACTS` (default: the test's tmp folder).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from echox.infer.demo import packaged_question

pytestmark = pytest.mark.slow  # loads the embedded model

ENV_CHROMIUM = "ECHOX_CHROMIUM"
ENV_ARTIFACTS = "ECHOX_BROWSER_ARTIFACTS"
TIMEOUT_MS = 180_000  # one turn of the embedded model on a slow, shared CPU


def system_chromium() -> str:
    path = os.environ.get(ENV_CHROMIUM) or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if not path or not Path(path).exists():
        pytest.fail("the browser test needs Debian's chromium: apt-get install chromium "
                    f"(or set ${ENV_CHROMIUM} to a Chromium binary); it is not skipped",
                    pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "echox.cli", "serve", "--port", str(port), "--threads", "1",
           "--max-new-tokens", "32", "--temperature", "0", "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"echox serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"echox serve did not start in 300 s:\n{log.read_text()}")
                time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_page_records_streams_and_plays_in_chromium(server: str, tmp_path: Path) -> None:
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("the browser test needs the playwright package (pip install -e '.[test]')",
                    pytrace=False)
    chromium = system_chromium()
    shots = Path(os.environ.get(ENV_ARTIFACTS) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    question = packaged_question()  # "What is the capital of Japan?", 1.8 s
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={question}%noloop",
            "--autoplay-policy=no-user-gesture-required"]
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            context = browser.new_context(viewport={"width": 1000, "height": 860})
            page = context.new_page()
            page.add_init_script("""(() => {  // every microphone stream the page opens
                window.__streams = [];
                const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
                navigator.mediaDevices.getUserMedia = async (c) => {
                    const s = await gum(c); window.__streams.push(s); return s; };
            })()""")
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type == "error" else None)
            page.goto(server + "/")
            expect(page.locator("#status")).to_have_attribute("data-state", "ready",
                                                              timeout=30_000)
            expect(page.locator("#model")).to_contain_text("tiny")

            # turn 1: the microphone (Chromium plays the question file into it)
            page.click("#record")
            expect(page.locator("#record")).to_have_attribute("data-recording", "true")
            page.wait_for_timeout(2800)
            page.click("#record")
            rms = page.evaluate("""() => {
                const c = window.echox.lastInput.chunks; let s = 0, n = 0;
                for (const a of c) for (const x of a) { s += x * x; n++; }
                return n ? Math.sqrt(s / n) / 32768 : 0; }""")
            assert rms > 0.005, f"the fake microphone gave silence (rms {rms})"
            first = page.locator("li.turn.assistant").nth(0)
            expect(first.locator(".text")).not_to_be_empty(timeout=TIMEOUT_MS)  # streamed text
            expect(first).to_have_attribute("data-playback", "started", timeout=TIMEOUT_MS)
            expect(first).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
            first_audio = int(first.get_attribute("data-first-audio-ms") or 0)
            final = int(first.get_attribute("data-final-ms") or 0)
            assert 0 < first_audio < final, (first_audio, final)  # played before the end
            expect(first.locator(".stats")).to_contain_text("first audio")
            # the finished answer is read out to screen readers; the question box has a name
            expect(page.locator("#announce")).to_have_attribute("aria-live", "polite")
            expect(page.locator("#announce")).to_have_text("answer: " + first.locator(".text").inner_text())
            expect(page.get_by_role("textbox", name="question")).to_have_count(1)
            expect(first.locator("audio")).to_have_count(1)
            expect(page.locator("li.turn.user").nth(0)).to_contain_text("Recorded question")
            expect(page.locator("li.turn.user").nth(0).locator("audio")).to_have_count(1)

            # turn 2: typed; the history keeps both turns with their audio
            page.fill("#text", "What is the capital of France?")
            page.click("#send")
            second = page.locator("li.turn.assistant").nth(1)
            expect(second).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
            expect(second.locator(".text")).not_to_be_empty()
            expect(page.locator("li.turn")).to_have_count(4)
            expect(page.locator("li.turn.assistant audio")).to_have_count(2)
            page.screenshot(path=str(shots / "serve_browser.png"), full_page=True)

            # the server says no: a file that is not audio
            page.set_input_files("#upload", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                    "buffer": b"this is not audio at all"}])
            notice = page.locator("#notice")
            expect(notice).to_be_visible(timeout=30_000)
            expect(notice).to_contain_text("not a readable audio file")
            expect(page.locator("li.turn.assistant").nth(2)).to_have_attribute("data-state",
                                                                               "failed")
            expect(page.locator("#status")).to_have_attribute("data-state", "ready")
            page.screenshot(path=str(shots / "serve_browser_refused.png"), full_page=True)

            # a double click sends one question (it sent two: one answered, one stuck), and a
            # double click on Record opens one microphone (the second one stayed open)
            page.click("#notice-close")
            page.fill("#text", "Hello?")
            page.dblclick("#send")
            expect(page.locator("li.turn.assistant").nth(3)).to_have_attribute(
                "data-state", "done", timeout=TIMEOUT_MS)
            expect(page.locator("li.turn.user")).to_have_count(4)
            page.dblclick("#record")
            expect(page.locator("#record")).to_have_attribute("data-recording", "true")
            page.wait_for_timeout(1500)
            page.click("#record")
            expect(page.locator("li.turn.assistant").nth(4)).to_have_attribute(
                "data-state", "done", timeout=TIMEOUT_MS)
            live = page.evaluate("window.__streams.filter(s => s.getTracks().some("
                                 "t => t.readyState === 'live')).length")
            assert live == 0, f"{live} microphone stream(s) left open"
        finally:
            browser.close()
    assert not problems, problems
    print(f"screenshots: {shots / 'serve_browser.png'}, {shots / 'serve_browser_refused.png'}")
