"""Binding and running the server: 127.0.0.1 unless told otherwise, graceful on SIGTERM.

On SIGTERM or Ctrl-C uvicorn stops listening at once (new connections are refused), lets the
requests in progress finish (streams included), then the scheduler finishes what it runs and
stops.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from llamascope_sdk.base.errors import InputError

#: seconds running requests get to finish after SIGTERM
DRAIN_SECONDS = 600


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()

        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                         hint="choose another --port (0 picks a free one)") from None
    sock.listen(128)
    return sock


def run(app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; prints the address it listens on to stderr."""
    import uvicorn

    sock = bind(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=DRAIN_SECONDS)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    sys.stderr.write(f"llamascope serve: listening on http://{shown}:{sock.getsockname()[1]}\n")
    sys.stderr.flush()
    server.run(sockets=[sock])
