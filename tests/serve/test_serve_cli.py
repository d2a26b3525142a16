"""`omni serve` as a command: its ready line, and Ctrl-C stopping it within 2 s mid-reply with a client connected."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
from websockets.sync.client import connect

from servers import omni_serve


def test_ready_line_and_ctrl_c_stops_within_two_seconds_mid_reply(tiny_model) -> None:
    with omni_serve(tiny_model) as server:
        assert server.page_url == f"http://127.0.0.1:{server.port}/"
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert [line for line in server.stderr_lines if "ready" in line] == [
            f"omni serve: ready - the page: {server.page_url}  API base URL: {server.base_url}\n"
        ]
        with connect(server.base_url.replace("http://", "ws://") + "/realtime", open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
            _interrupt_mid_reply(server)


def _interrupt_mid_reply(server) -> None:
    started = threading.Event()

    def long_reply() -> None:
        request = {"messages": [{"role": "user", "content": "Talk."}], "max_tokens": 256, "stream": True,
                   "modalities": ["text", "audio"], "audio": {"format": "pcm16"}}
        try:
            with httpx.stream("POST", f"{server.base_url}/chat/completions", json=request, timeout=60) as response:
                for i, _ in enumerate(response.iter_lines()):
                    if i >= 4:  # the role line, then reply deltas: the model is at work
                        started.set()
        except httpx.HTTPError:
            pass

    threading.Thread(target=long_reply, daemon=True).start()
    assert started.wait(30)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    server.proc.wait(timeout=10)
    assert time.monotonic() - start < 2.0
    assert server.proc.returncode == 0
    time.sleep(0.2)
    assert server.stderr_lines[-1] == "omni serve: stopped.\n", server.stderr_lines
