"""Servers for the serve tests: a real `omni serve` subprocess, or the app under uvicorn in this process.

Both are stopped in `finally`: the subprocess runs in its own process group and is killed whole;
the in-process server is told to exit and its thread joined.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for process_group

from process_group import kill_group  # noqa: E402

READY = re.compile(r"omni serve: ready - the page: (\S+)\s+API base URL: (\S+)")


@dataclass
class RunningServer:
    """A started server: its API base URL (…/v1), its page URL, its port, and (subprocess) its output so far."""

    base_url: str
    page_url: str
    port: int
    proc: subprocess.Popen | None = None
    stderr_lines: list[str] | None = None


def serve_command(tiny_model: Any, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "omni_cli.cli", "serve",
        "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder),
        "--vocoder", str(tiny_model.vocoder_dir), "--precision", "fp32", "--device", "cpu",
        "--port", "0", "--threads", "1", *extra,
    ]


@contextmanager
def omni_serve(tiny_model: Any, *extra: str, env: dict[str, str] | None = None, timeout: float = 90.0) -> Iterator[RunningServer]:
    """`omni serve` on the tiny model in its own process group, until its ready line; killed afterwards."""
    proc = subprocess.Popen(
        serve_command(tiny_model, *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    lines: list[str] = []
    ready: list[re.Match[str]] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if not ready and (match := READY.search(line)):
                ready.append(match)

    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not ready:
            if proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(f"omni serve exited with {proc.returncode}: {''.join(lines)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"omni serve not ready after {timeout} s: {''.join(lines)}")
            time.sleep(0.05)
        page, base = ready[0].group(1), ready[0].group(2)
        port = int(base.rsplit(":", 1)[1].split("/")[0])
        yield RunningServer(base, page, port, proc, lines)
    finally:
        kill_group(proc)
        proc.wait(timeout=10)


@contextmanager
def app_server(app: Any) -> Iterator[RunningServer]:
    """The app under a real uvicorn on a free loopback port, in a thread of this process."""
    import uvicorn

    from omni_cli.serve.server import bind

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield RunningServer(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/", port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def realtime_server(pipeline: Any, **options: Any) -> Iterator[tuple[RunningServer, Any, list[Any]]]:
    """`omni serve`'s app (the real conversation behind every Realtime session) over `pipeline`, under uvicorn in
    this process: (the server, its ModelSlot, the sessions' conversations in the order they connected)."""
    from omni_cli.config import ServeOptions
    from omni_cli.serve.app import create_app
    from omni_cli.serve.model_slot import ModelSlot
    from omni_cli.serve.realtime_conversation import RealtimeConversation

    slot = ModelSlot(pipeline, max_waiting=options.get("max_waiting", ServeOptions.max_waiting))
    ports: list[RealtimeConversation] = []

    def factory(session: Any) -> RealtimeConversation:
        ports.append(RealtimeConversation(session, slot))
        return ports[-1]

    try:
        with app_server(create_app(slot, ServeOptions(port=0, **options), factory)) as server:
            yield server, slot, ports
    finally:
        slot.close()
        for port in ports:
            port.close()


def load_as_served(model: Any) -> Any:
    """The tiny model loaded as `omni serve` loads it (fp32, CPU, the serve defaults), for expected replies."""
    from omni_cli.cli.shared import streaming_config
    from omni_cli.config import CHAT_FIRST_CHUNK_UNITS, SamplingConfig, StreamingConfig
    from omni_cli.pipeline import SpeechToSpeech
    from omni_cli.weights.model_files import read_model_files

    defaults, sampling = StreamingConfig(), SamplingConfig()
    streaming = streaming_config(sampling.max_new_tokens, sampling.temperature, defaults.chunk_units, CHAT_FIRST_CHUNK_UNITS,
                                 defaults.decode_steps, defaults.context_budget)
    files = read_model_files(model.model_dir, model.speech_encoder, model.vocoder_dir)
    return SpeechToSpeech.load(files, "fp32", "cpu", streaming)
