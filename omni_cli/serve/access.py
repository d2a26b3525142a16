"""Who may use the server: the API key, the Host a request names, and the Origin of the page that sent it.

- With `--api-key`, every request carries it: `Authorization: Bearer KEY` (the SDKs), the
  WebSocket subprotocol `openai-insecure-api-key.KEY` (how OpenAI's browser clients pass a key,
  as browsers cannot set headers on a WebSocket), or `?key=KEY` (the page's own URL and assets).
- A request's `Origin`, when present, must be the server's own (`http(s)://` + its Host): a web
  site open in the user's browser cannot drive the local model, over HTTP or WebSocket.
- Without a key (loopback only), the Host must be a loopback name too, so a web site whose name
  points at 127.0.0.1 (DNS rebinding) is not the "same origin" either.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from urllib.parse import urlsplit

from omni_cli.config import ServeOptions

KEY_SUBPROTOCOL = "openai-insecure-api-key."
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def presented_key(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The key a request carries: Bearer header, key subprotocol, or `?key=`."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    for protocol in headers.get("sec-websocket-protocol", "").split(","):
        protocol = protocol.strip()
        if protocol.startswith(KEY_SUBPROTOCOL):
            return protocol[len(KEY_SUBPROTOCOL):]
    return query.get("key")


def _host_name(host: str) -> str:
    """`name:port` → name (brackets kept for IPv6)."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def refusal(options: ServeOptions, headers: Mapping[str, str], query: Mapping[str, str]) -> tuple[int, str] | None:
    """Why this request may not be served (HTTP status, one line), or None when it may."""
    host = headers.get("host", "")
    if options.api_key is None and _host_name(host).lower() not in LOOPBACK_NAMES and not _host_name(host).startswith("127."):
        return 403, f"Host {host!r} is not this machine's loopback address; omni serve without --api-key answers only 127.0.0.1 and localhost."
    origin = headers.get("origin")
    if origin is not None and origin != "null":
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
            return 403, f"Origin {origin!r} is not this server's own page; requests from other web sites are refused."
    elif origin == "null":
        return 403, "requests from an opaque origin (a sandboxed page or a file) are refused."
    if options.api_key is not None:
        key = presented_key(headers, query)
        if key is None:
            return 401, "this server needs its API key: send Authorization: Bearer KEY (the page: open /?key=KEY)."
        if not _same(key, options.api_key):
            return 401, "wrong API key."
    return None


def chosen_subprotocol(headers: Mapping[str, str]) -> str | None:
    """The subprotocol to answer a browser's WebSocket with (a browser drops a connection offered some and
    answered none): `realtime` when offered, else the first one that is not the key."""
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    if "realtime" in offered:
        return "realtime"
    return next((p for p in offered if not p.startswith(KEY_SUBPROTOCOL)), None)


def wants_beta(headers: Mapping[str, str]) -> bool:
    """True when the client asked for the beta protocol (`OpenAI-Beta: realtime=v1`, or the browser's subprotocol)."""
    if "realtime=v1" in headers.get("openai-beta", ""):
        return True
    return any(p.strip() == "openai-beta.realtime-v1" for p in headers.get("sec-websocket-protocol", "").split(","))
