"""A TCP proxy for fault tests: forwards, drops every connection, loses the answers, or stalls traffic."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Literal

Mode = Literal["open", "drop", "lose_answers", "stall"]


class Proxy:
    """Listens on a free loopback port and forwards to `target_port`, misbehaving as `mode` says.

    `drop` resets every connection and refuses new ones; `lose_answers` lets requests through but throws the
    answers away and closes the connection (the server acted, the client never hears); `stall` holds every byte
    in both directions until the mode changes, then delivers it.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode: Mode = "open"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        """The proxy's base URL, used by the trainer in place of the server's."""
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: Mode) -> None:
        """Switch mode; `drop` and `lose_answers` also cut every open connection now."""
        self.mode = mode
        if mode in ("drop", "lose_answers"):
            self._cut_all()

    def close(self) -> None:
        """Stop accepting and cut every connection."""
        self._closed = True
        self._listener.close()
        self._cut_all()

    def _cut_all(self) -> None:
        with self._lock:
            doomed = list(self._sockets)
        for sock in doomed:
            self._cut(sock)

    def _cut(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
        with self._lock:
            self._sockets.discard(sock)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "drop":
                self._cut(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                self._cut(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while self.mode == "stall":
                    time.sleep(0.01)
                if self.mode == "drop" or (answers and self.mode == "lose_answers"):
                    break
                sink.sendall(data)
        except OSError:
            pass
        self._cut(source)
        self._cut(sink)
