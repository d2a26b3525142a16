"""The page at `/` in a real headless Chromium (Debian's `chromium`, driven by Playwright), its microphone a spoken question.

The server is the real app under uvicorn in this process. End to end, behind it stands the
conversation on the tiny model: a spoken question is answered on the page (text and played
audio), a silent microphone is not. For the page's own behaviour, a recording port stands in for
the conversation, so the test sees exactly what reached the server and can make the page play a
known reply. What is checked: the page loads, the fake
microphone's audio arrives as `input_audio_buffer.append` (its loudness follows the question's),
the reply's text is written as it comes, its audio is played without gaps (captured in the page
by a tap on the playback), the turn's latency is shown, and speech over the reply stops it at
once and sends `conversation.item.truncate` with what was played.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from omni_cli.audio.io import load_audio, resample
from omni_cli.config import ServeOptions
from omni_cli.serve.app import create_app
from omni_cli.serve.model_slot import ModelSlot
from servers import app_server, realtime_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
TONE_HZ = 440.0


def _chromium() -> str:
    if shutil.which(CHROMIUM) is None:
        pytest.skip("chromium not installed (apt-get install chromium, as .ci/browser.sh does)")
    pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[test]')")
    # Debian's /usr/bin/chromium is a shell wrapper; Playwright talks to the browser binary itself.
    binary = Path("/usr/lib/chromium/chromium")
    return str(binary) if binary.exists() else CHROMIUM


class RecordingPort:
    """Stands where the conversation will: reads the client's frames as the conversation would, records the calls."""

    instances: list[RecordingPort] = []

    def __init__(self, session) -> None:
        self.session = session
        self.frames: list[np.ndarray] = []
        self.frame_times: list[float] = []
        self.calls: list[tuple] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        RecordingPort.instances.append(self)

    def _read(self) -> None:
        while not self._stop.is_set():
            frame = self.session.audio.read(timeout=0.05)
            if frame is not None:
                self.frames.append(frame)
                self.frame_times.append(self.session.audio.frame_end_t)

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, *args))

    def close(self) -> None:
        self._stop.set()

    def received_s(self) -> float:
        return len(self.frames) * 0.03


def _launch(playwright, executable: str, microphone: Path):
    """Headless Chromium whose microphone plays `microphone` once (then silence), media allowed without asking."""
    return playwright.chromium.launch(
        executable_path=executable,
        headless=True,
        args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}%noloop",
            "--autoplay-policy=no-user-gesture-required",
        ],
    )


def _padded_question(question_wavs: list[Path], out: Path) -> tuple[Path, np.ndarray]:
    """The question as Chromium's fake microphone reads it: 16-bit PCM WAV at 48 kHz, a second of silence after."""
    audio = load_audio(question_wavs[0])
    padded = np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(16000, np.float32)])
    sf.write(out, resample(padded, 16000, 48000), 48000, subtype="PCM_16")
    return out, padded


def _envelope(audio: np.ndarray, rate: int = 16000, hop_ms: int = 30) -> np.ndarray:
    hop = rate * hop_ms // 1000
    n = audio.size // hop
    return np.sqrt(np.mean(audio[: n * hop].reshape(n, hop) ** 2, axis=1))


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_the_page_sends_the_microphone_and_plays_the_reply_gaplessly(tiny_pipeline, question_wavs, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    from omni_cli.serve.realtime_conversation import conversation_ports

    executable = _chromium()
    wav, sent = _padded_question(question_wavs, tmp_path / "question.wav")
    RecordingPort.instances.clear()
    app = create_app(ModelSlot(tiny_pipeline), ServeOptions(port=0), RecordingPort)
    with app_server(app) as server, sync_playwright() as playwright:
        browser = _launch(playwright, executable, wav)
        try:
            page = browser.new_page()
            page.goto(f"{server.page_url}?capture=1")
            page.click("#talk")
            _wait(lambda: RecordingPort.instances and RecordingPort.instances[-1].received_s() > sent.size / 16000, 60, "the question's audio")
            port = RecordingPort.instances[-1]
            assert page.evaluate("window.omniPage.appended") >= 0.9 * sent.size / 16000 / 0.04
            heard = np.concatenate(port.frames)
            # The question arrives as spoken: its loudness envelope matches the file's, wherever it starts.
            a, b = _envelope(sent), _envelope(heard)
            a, b = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
            corr = np.correlate(b, a, mode="valid" if b.size >= a.size else "full") / a.size
            assert corr.max() > 0.7, f"the audio received does not follow the question (best correlation {corr.max():.2f})"
            assert port.frame_times == sorted(port.frame_times)

            # A reply to it, as the conversation will send one: speech stopped, text and audio deltas, done.
            replies = port.session.replies
            replies.speech_stopped(port.frame_times[-1])
            replies.committed()
            replies.reply_started()
            tone = (0.5 * np.sin(2 * np.pi * TONE_HZ * np.arange(16000) / 16000)).astype(np.float32)
            for text, chunk in zip(["Hello ", "from ", "omni."], np.array_split(tone, 3)):
                replies.reply_text(text)
                replies.reply_audio(chunk, 16000)
            replies.reply_done("completed", input_tokens=10, output_tokens=3)
            page.wait_for_function("document.querySelector('#turns li.assistant .text')?.textContent === 'Hello from omni.'", timeout=20000)
            page.wait_for_selector("#turns li.assistant .latency", timeout=20000)
            assert "latency" in page.inner_text("#turns li.assistant .latency")
            time.sleep(1.5)  # the tone plays out
            rate = page.evaluate("window.omniPage.ctx.sampleRate")
            played = np.array(page.evaluate("Array.from(window.omniPage.captured.flatMap(b => Array.from(b)))"), dtype=np.float32)
            loud = np.flatnonzero(np.abs(played) > 0.05)
            assert loud.size, "the page played nothing"
            span = played[loud[0] : loud[-1] + 1]
            assert abs(span.size / rate - 1.0) < 0.05, f"played {span.size / rate:.3f} s of a 1 s reply"
            quiet = np.abs(span) < 1e-3
            runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(int), [0]]))))[::2] if quiet.any() else [0]
            assert max(runs) < rate * 0.002, "a gap in the playback"
            spectrum = np.abs(np.fft.rfft(span))
            assert abs(np.argmax(spectrum) * rate / span.size - TONE_HZ) < 5

            # Speech over a longer reply: the page stops it at once and reports what it played.
            replies.reply_started()
            item = replies.reply_item
            replies.reply_audio(np.tile(tone, 4), 16000)
            time.sleep(1.0)
            before = page.evaluate("window.omniPage.captured.length")
            replies.speech_started(time.monotonic())
            _wait(lambda: any(call[0] == "truncate" for call in port.calls), 10, "conversation.item.truncate")
            truncate = next(call for call in port.calls if call[0] == "truncate")
            assert truncate[1] == item and 300 < truncate[2] < 2500, truncate
            time.sleep(0.5)
            after = page.evaluate("window.omniPage.captured.slice(-40).flatMap(b => Array.from(b))")
            assert page.evaluate("window.omniPage.captured.length") > before
            assert max(abs(x) for x in after) < 1e-3, "the reply kept playing after the user spoke"
            assert page.evaluate("document.querySelector('#error').hidden")
        finally:
            browser.close()
            for port in RecordingPort.instances:
                port.close()


def _played(page) -> tuple[np.ndarray, int]:
    """What the page has played so far (its capture tap), and the rate."""
    played = np.array(page.evaluate("Array.from(window.omniPage.captured.flatMap(b => Array.from(b)))"), dtype=np.float32)
    return played, page.evaluate("window.omniPage.ctx.sampleRate")


@contextmanager
def _talking_page(pipeline, microphone: Path) -> Iterator[tuple[object, list]]:
    """The page (capturing what it plays) talking, through Chromium's fake `microphone`, to the conversation on
    `pipeline`: (the page, the sessions' conversations)."""
    from playwright.sync_api import sync_playwright

    from omni_cli.serve.realtime_conversation import conversation_ports

    executable = _chromium()
    with realtime_server(pipeline) as (server, _, ports), sync_playwright() as playwright:
        browser = _launch(playwright, executable, microphone)
        try:
            page = browser.new_page()
            page.goto(f"{server.page_url}?capture=1")
            page.click("#talk")
            yield page, ports
        finally:
            browser.close()


def test_a_question_spoken_into_the_page_is_answered_there(stopping_pipeline, question_wavs, tmp_path) -> None:
    wav, _ = _padded_question(question_wavs[1:], tmp_path / "question.wav")
    with _talking_page(stopping_pipeline, wav) as (page, ports):
        page.wait_for_selector("#turns li.assistant .latency", timeout=60000)
        _wait(lambda: page.evaluate("window.omniPage.events['response.done'] || 0") >= 1, 30, "response.done")
        text = page.inner_text("#turns li.assistant .text")
        (kept,) = ports[-1].conversation.history.turns
        assert text and text == kept.reply  # the reply the conversation remembers, written on the page
        latency = int(page.inner_text("#turns li.assistant .latency").split()[1])
        assert 0 < latency < 5000
        scheduled_s = page.evaluate("window.omniPage.play.scheduledMs") / 1000
        _wait(lambda: page.evaluate("window.omniPage.ctx.currentTime > window.omniPage.play.next + 0.3"), 15, "the reply to play out")
        played, rate = _played(page)
        loud = np.flatnonzero(np.abs(played) > 1e-3)
        assert loud.size, "the page played nothing"
        assert abs((loud[-1] - loud[0]) / rate - scheduled_s) < 0.1 + 0.2 * scheduled_s
        assert page.evaluate("document.querySelector('#error').hidden")


def test_a_silent_microphone_gets_no_reply(stopping_pipeline, tmp_path) -> None:
    wav = tmp_path / "silence.wav"
    sf.write(wav, np.zeros(3 * 48000, np.float32), 48000, subtype="PCM_16")
    with _talking_page(stopping_pipeline, wav) as (page, ports):
        _wait(lambda: ports and ports[-1].session.audio.received_ms > 3500, 30, "the microphone's audio")
        time.sleep(1.0)  # a turn would have ended by now (500 ms of silence after speech)
        events = page.evaluate("window.omniPage.events")
        assert "input_audio_buffer.speech_started" not in events and "response.created" not in events, events
        assert page.evaluate("document.querySelectorAll('#turns li').length") == 0
        assert ports[-1].conversation.turns == 0


def test_the_page_loads_without_console_errors(tiny_pipeline) -> None:
    """Nothing the page asks for is missing: no 404 (Chromium asks for /favicon.ico unless the page names its icon)."""
    from playwright.sync_api import sync_playwright

    from omni_cli.serve.realtime_conversation import conversation_ports

    executable = _chromium()
    slot = ModelSlot(tiny_pipeline)
    with app_server(create_app(slot, ServeOptions(port=0), conversation_ports(slot))) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            asked: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("request", lambda request: asked.append(request.url))
            page.goto(server.page_url, wait_until="networkidle")
            time.sleep(0.5)  # the favicon is asked for after the load
            assert errors == [], errors
            assert not any(url.endswith("/favicon.ico") for url in asked), asked
        finally:
            browser.close()
