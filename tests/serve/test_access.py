"""Who may use `omni serve`: an open bind needs a key; with a key every request carries it; other web sites are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

openai = pytest.importorskip("openai")

from servers import omni_serve  # noqa: E402

KEY = "test-key-123"


def test_an_open_bind_without_a_key_is_refused_before_anything_loads(tiny_model) -> None:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "omni_cli.cli", "serve", "--model", str(tiny_model.model_dir), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("omni: error: --host 0.0.0.0 lets other machines in: also pass --api-key")
    assert time.monotonic() - start < 10  # no model was loaded


def test_a_taken_port_is_one_line(tiny_server, tiny_model) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "omni_cli.cli", "serve", "--model", str(tiny_model.model_dir), "--port", str(tiny_server.port)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"omni: error: cannot listen on 127.0.0.1:{tiny_server.port}: Address already in use; pick another with --port (0: any free port)."
    ]


def _ws_url(server) -> str:
    return server.base_url.replace("http://", "ws://") + "/realtime?model=llama-omni"


def test_a_foreign_origin_is_refused_over_websocket_and_http(tiny_server) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(_ws_url(tiny_server), origin="http://evil.example", open_timeout=10)
    assert refused.value.response.status_code == 403
    response = httpx.post(
        f"{tiny_server.base_url}/chat/completions", headers={"Origin": "http://evil.example"},
        json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30,
    )
    assert response.status_code == 403 and "other web sites" in response.json()["error"]["message"]
    # The server's own page may connect.
    with connect(_ws_url(tiny_server), origin=f"http://127.0.0.1:{tiny_server.port}", open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"


def test_a_foreign_host_name_is_refused_without_a_key(tiny_server) -> None:
    # A web site whose name resolves to 127.0.0.1 (DNS rebinding) is same-origin with itself, not with omni.
    response = httpx.get(f"{tiny_server.base_url}/models", headers={"Host": f"evil.example:{tiny_server.port}"}, timeout=30)
    assert response.status_code == 403


def test_with_a_key_every_request_needs_it(tiny_model) -> None:
    with omni_serve(tiny_model, env={"OMNI_API_KEY": KEY}) as server:
        assert "?key=YOUR_KEY" in server.page_url
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{server.base_url}/models", timeout=30).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{server.port}/", timeout=30).status_code == 401
        with pytest.raises(InvalidStatus):
            connect(_ws_url(server), open_timeout=10)

        models = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0).models.list()
        assert models.data[0].id == "llama-omni"
        page = httpx.get(f"http://127.0.0.1:{server.port}/?key={KEY}", timeout=30)
        assert page.status_code == 200 and f'src="/page/page.js?key={KEY}"' in page.text
        assert httpx.get(f"http://127.0.0.1:{server.port}/page/page.js?key={KEY}", timeout=30).status_code == 200
        # Browsers pass the key as a WebSocket subprotocol; the server answers with "realtime", never the key.
        with connect(_ws_url(server), subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"], open_timeout=10) as ws:
            assert ws.subprotocol == "realtime"
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        with connect(_ws_url(server), additional_headers={"Authorization": f"Bearer {KEY}"}, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
