"""The test page at ``/`` driven by headless Chromium through the whole stack.

Chromium's fake microphone plays a WAV that Piper makes on the spot; the page records it with
MediaRecorder while the talk button is held, sends it as one ``audio`` message and plays the
agent's reply. A second test types a message instead, a third checks that a server ``error`` is
shown and the session goes on. Needs Playwright (the Python package only; no browser download) and
Debian's ``/usr/bin/chromium``, both installed by ``make install-test``. Each test leaves a
screenshot in its tmp_path (also copied to ``$BROWSER_SCREENSHOT_DIR`` when that is set).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.speech import normalize_text, speak, word_error_rate
from voice_audio import wav_bytes

CHROMIUM = "/usr/bin/chromium"
SENTENCE = "I would like to book a table for two people."
MAX_WER = 0.3
PAD_S = 0.5  # silence before and after the sentence in the fake microphone's file
TURN_TIMEOUT_MS = 120_000
VOICE_TURN_EVENTS = (
    "processing_started",
    "stt_start",
    "stt_complete",
    "llm_start",
    "llm_chunk",
    "llm_complete",
    "tts_start",
    "audio_response",
    "tts_complete",
    "processing_complete",
)

# Records every value body[data-state] takes, independently of the page's own bookkeeping.
STATE_RECORDER = """() => {
  window.__states = [document.body.dataset.state];
  new MutationObserver(() => {
    const s = document.body.dataset.state;
    if (window.__states[window.__states.length - 1] !== s) window.__states.push(s);
  }).observe(document.body, {attributes: true, attributeFilter: ["data-state"]});
}"""


@pytest.fixture(scope="module")
def spoken_wav(tmp_path_factory) -> tuple[Path, float]:
    """The sentence as a 16-bit WAV with silence on each end, and its length in seconds."""
    samples, rate = speak(SENTENCE)
    pad = np.zeros(int(rate * PAD_S), dtype=np.int16)
    padded = np.concatenate([pad, samples, pad])
    path = tmp_path_factory.mktemp("fake-mic") / "sentence.wav"
    path.write_bytes(wav_bytes(padded, rate))
    return path, len(padded) / rate


@pytest.fixture(scope="module")
def browser(spoken_wav):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: run `make install-test` (pip package `playwright`)")
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} is missing: run `make install-test` (Debian package `chromium`)")
    wav, _ = spoken_wav
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-gpu",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, gateway_url, tmp_path, request):
    """A fresh page on the gateway's ``/``; screenshot kept in tmp_path, JS errors collected."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, permissions=["microphone"])
    page = context.new_page()
    page.problems = []  # uncaught JavaScript exceptions and failed HTTP requests

    def on_response(response) -> None:
        if response.status >= 400:
            page.problems.append(f"HTTP {response.status} for {response.url}")

    page.on("pageerror", lambda exc: page.problems.append(f"uncaught {exc}"))
    page.on("response", on_response)
    page.goto(gateway_url + "/")
    page.evaluate(STATE_RECORDER)
    yield page
    shot = tmp_path / f"{request.node.name}.png"
    try:
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        keep = os.environ.get("BROWSER_SCREENSHOT_DIR")
        if keep:
            shutil.copy(shot, Path(keep) / shot.name)
    finally:
        context.close()


def _event_log(page) -> str:
    rows = page.locator("#log tr").all_inner_texts()
    return "\n".join(reversed(rows))


def _wait(page, expression: str, what: str, arg=None, timeout_ms: int = TURN_TIMEOUT_MS) -> None:
    # Polled from here: Playwright's wait_for_function evaluates strings in the page, which the page's
    # Content-Security-Policy (no 'unsafe-eval') rightly forbids; page.evaluate goes through the
    # DevTools protocol, which the policy does not govern.
    deadline = time.monotonic() + timeout_ms / 1000
    while not page.evaluate(expression, arg):
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout_ms / 1000:.0f}s waiting for {what}; state "
                f"{page.evaluate('document.body.dataset.state')!r}, last error "
                f"{page.evaluate('document.body.dataset.lastError')!r}\nevent log:\n{_event_log(page)}"
            )
        page.wait_for_timeout(100)


def _played(page) -> int:
    return int(page.get_attribute("#player", "data-played-count"))


def _assert_no_error(page) -> None:
    last_error = page.evaluate("document.body.dataset.lastError")
    assert not last_error, f"the page shows an error: {last_error}\nevent log:\n{_event_log(page)}"
    assert page.locator("#error").is_hidden()
    assert not page.problems, f"JavaScript or HTTP errors: {page.problems}"


def _start_session(page) -> None:
    """Connect, init, and let the greeting play."""
    page.click("#connect")
    _wait(page, "document.body.dataset.state === 'Connected'", "the WebSocket to open", timeout_ms=15_000)
    page.click("#init")
    _wait(page, "document.body.dataset.session === 'active'", "init_success", timeout_ms=30_000)
    _wait(
        page,
        "Number(document.querySelector('#player').dataset.playedCount) >= 1 && document.body.dataset.state === 'Idle'",
        "the greeting to play",
    )
    greeting = page.locator('#transcript .entry[data-role="agent"]').first.inner_text()
    assert greeting.strip(), "the greeting's text is not in the transcript"
    _assert_no_error(page)


def _wait_for_reply(page, played_before: int, turn_end: str) -> str:
    """Wait until the reply has been played to the end and the page is Idle; return the reply text."""
    _wait(
        page,
        """([before, turnEnd]) => {
          const agents = document.querySelectorAll('#transcript .entry[data-role="agent"]');
          const last = agents[agents.length - 1];
          return document.body.dataset.state === 'Idle'
            && Number(document.querySelector('#player').dataset.playedCount) > before
            && document.querySelector(`#log tr[data-type="${turnEnd}"]`) !== null
            && last && last.dataset.final === 'true';
        }""",
        f"the reply to be spoken (after {turn_end})",
        arg=[played_before, turn_end],
    )
    agents = page.locator('#transcript .entry[data-role="agent"]')
    return agents.nth(agents.count() - 1).locator(".text").inner_text()


def _assert_thinking_then_idle(page) -> None:
    states = page.evaluate("window.__states")
    assert "Thinking" in states, f"never showed Thinking: {states}"
    after_thinking = states[states.index("Thinking") :]
    assert "Speaking" in after_thinking, f"never showed Speaking after Thinking: {states}"
    assert states[-1] == "Idle", f"did not end Idle: {states}"


def test_voice_turn_through_the_page(page, spoken_wav):
    _, wav_s = spoken_wav
    _start_session(page)
    played = _played(page)
    page.evaluate("window.__states = [document.body.dataset.state]")

    talk = page.locator("#talk")
    talk.hover()
    page.mouse.down()
    # Time the hold from when MediaRecorder runs (the fake microphone starts its file with the stream).
    _wait(page, "document.querySelector('#log tr[data-type=listening]') !== null", "recording", timeout_ms=10_000)
    assert page.evaluate("document.body.dataset.state") == "Listening"
    time.sleep(wav_s + 0.3)
    page.mouse.up()

    _wait(
        page,
        'document.querySelector(\'#transcript .entry[data-role="user"][data-final="true"]\') !== null',
        "the transcription (stt_complete)",
    )
    heard = page.locator('#transcript .entry[data-role="user"]').first.locator(".text").inner_text()
    reply = _wait_for_reply(page, played, "processing_complete")

    # The fake microphone loops its file: words from a second pass are tolerated if the sentence is there.
    wer = word_error_rate(SENTENCE, heard)
    reference, words = normalize_text(SENTENCE).split(), normalize_text(heard).split()
    recall = sum(word in words for word in reference) / len(reference)
    assert wer <= MAX_WER or (recall >= 0.85 and len(words) <= 2 * len(reference)), (
        f"heard {heard!r} for {SENTENCE!r}: WER {wer:.2f}, recall {recall:.2f}"
    )
    assert reply.strip(), "the agent's reply is empty"
    assert _played(page) > played
    received = page.locator("#log tr[data-dir='in']").evaluate_all("rows => rows.map(r => r.dataset.type)")
    missing = [kind for kind in VOICE_TURN_EVENTS if kind not in received]
    assert not missing, f"never arrived: {missing}; received {received}"
    _assert_thinking_then_idle(page)
    _assert_no_error(page)


def test_text_turn_through_the_page(page):
    _start_session(page)
    played = _played(page)
    page.evaluate("window.__states = [document.body.dataset.state]")

    page.fill("#text-input", "Can you say hello to my friend Sam?")
    page.click("#send")
    user_lines = page.locator('#transcript .entry[data-role="user"] .text').all_inner_texts()
    assert user_lines == ["Can you say hello to my friend Sam?"]
    reply = _wait_for_reply(page, played, "text_response")

    assert reply.strip(), "the agent's reply is empty"
    assert re.search(r"\w", reply)
    assert _played(page) > played, "the reply was not played"
    _assert_thinking_then_idle(page)
    _assert_no_error(page)

    page.click("#end")
    _wait(page, "document.body.dataset.session === 'none'", "session_ended", timeout_ms=30_000)
    assert page.evaluate("document.body.dataset.state") == "Connected"
    _assert_no_error(page)


def test_server_error_is_shown_and_the_session_goes_on(page):
    page.click("#connect")
    _wait(page, "document.body.dataset.state === 'Connected'", "the WebSocket to open", timeout_ms=15_000)
    page.evaluate("window.voiceApp.send('bogus', {})")
    _wait(page, "document.body.dataset.lastError !== ''", "the error event", timeout_ms=15_000)
    assert page.locator("#error").is_visible()
    assert "bogus" in page.inner_text("#error-text")
    assert page.locator("#log tr[data-dir='in'][data-type='error']").count() == 1
    page.click("#error-dismiss")
    assert page.locator("#error").is_hidden()
    page.click("#init")
    _wait(page, "document.body.dataset.session === 'active'", "init_success after the error", timeout_ms=30_000)
    assert page.evaluate("document.body.dataset.state") in ("Thinking", "Speaking", "Idle")
