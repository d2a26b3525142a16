"""Running `omni serve`: bind the address (before the model loads, so a taken port is one line at once),
serve the app with uvicorn, print one line when ready, and stop within a second or two of Ctrl-C.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from omni_cli.config import ServeOptions
from omni_cli.errors import OmniError

if TYPE_CHECKING:
    from omni_cli.pipeline import SpeechToSpeech
    from omni_cli.serve.realtime_session import PortFactory


class AddressInUse(OmniError):
    """The address cannot be bound."""


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening; AddressInUse with one line when it cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressInUse(f"--host {host!r} is not an address of this machine ({exc.strerror}).") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = "pick another with --port (0: any free port)" if exc.errno in (98, 48) else "check --host and --port"
        raise AddressInUse(f"cannot listen on {host}:{port}: {exc.strerror}; {hint}.") from exc
    return sock


def serve(
    pipeline: SpeechToSpeech,
    options: ServeOptions,
    sock: socket.socket,
    port_factory: PortFactory | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Serve until Ctrl-C (or SIGTERM); returns the exit status. The socket comes from `bind`."""
    import uvicorn

    from omni_cli.serve.app import create_app, ready_line
    from omni_cli.serve.model_slot import ModelSlot
    from omni_cli.serve.realtime_conversation import conversation_ports

    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    slot = ModelSlot(pipeline, max_waiting=options.max_waiting)
    app = create_app(slot, options, port_factory or conversation_ports(slot, answer_after_ms=options.answer_after_ms))
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        # uvicorn closes a connection sending more than this; the app answers messages over
        # max_message_bytes with an error event first.
        ws_max_size=4 * options.max_message_bytes,
        timeout_graceful_shutdown=1,
    )
    port = sock.getsockname()[1]

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                say(ready_line(options.host, port, options.api_key))

        def handle_exit(self, sig: int, frame: Any) -> None:
            slot.close()  # the reply in progress stops at its next token; nothing new starts
            super().handle_exit(sig, frame)

    server = Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn hands the Ctrl-C it caught back once it has shut down
        pass
    say("omni serve: stopped.")
    return 0
