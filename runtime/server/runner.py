"""Putting the app on a socket: bind early (a taken port fails before the model loads), or run uvicorn on a thread.

Example:
    app = create_app(Engine("smol.vkpack"), model_name="smol")   # vkpack.runtime.server.app
    with BackgroundServer(app) as srv:          # uvicorn on a free loopback port
        print(srv.url)                          # http://127.0.0.1:PORT
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket; OSError names the address if it is taken."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind {host}:{port}: {e.strerror}") from None
    return sock


class BackgroundServer:
    """uvicorn serving `app` on a thread (tests, benchmarks). Port 0 picks a free port.

    Example:
        >>> with BackgroundServer(create_app(eng, "m")) as srv:   # doctest: +SKIP
        ...     httpx.get(srv.url + "/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="vkpack-uvicorn", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
