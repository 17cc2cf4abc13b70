"""A TCP proxy that can cut live connections: real network faults for tests.

Clients connect to the proxy instead of the broker. :meth:`TcpProxy.cut`
resets every live connection (RST, as when a NAT or firewall drops state);
:meth:`TcpProxy.refuse` makes new connections fail until :meth:`TcpProxy.accept`
is called, so a client's reconnect loop is exercised for as long as a test wants.

Two threads per connection copy bytes with blocking sockets: simple, and fast
enough for tests that publish tens of thousands of messages through it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from types import TracebackType

__all__ = ["TcpProxy"]

logger = logging.getLogger("reliable_messaging.testing.proxy")

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


class TcpProxy:
    """Forward ``listen`` -> ``upstream``; cut, refuse and accept connections on demand.

    ``listen_port=0`` picks a free port; read it from :attr:`port` after :meth:`start`.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, connect_timeout: float = 5.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listen = (listen_host, listen_port)
        self._connect_timeout = connect_timeout
        self._server: socket.socket | None = None
        self._accepting = threading.Event()
        self._accepting.set()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._withheld: set[tuple[socket.socket, socket.socket]] = set()
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self.connections_total = 0
        self.cuts = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> TcpProxy:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(self._listen)
        server.listen(128)
        server.settimeout(0.2)
        self._server = server
        thread = threading.Thread(target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    @property
    def host(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return str(self._server.getsockname()[0])

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the proxy first"
        return int(self._server.getsockname()[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def live_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._closed.set()
        self.cut()
        if self._server is not None:
            self._server.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self.start() if self._server is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- faults ----------------------------------------------------------------------------------
    def cut(self) -> int:
        """Reset every live connection (both sides get RST). Returns how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self._withheld.clear()
        for pair in pairs:
            for sock in pair:
                _reset(sock)
        if pairs:
            self.cuts += 1
            logger.info("proxy %s: cut %d connection(s)", self._listen, len(pairs))
        return len(pairs)

    def withhold_replies(self) -> int:
        """Drop every byte the upstream sends on the live connections from now on, while the client's
        bytes still reach it: a one-way partition, so the broker acts on requests whose answers (confirms,
        acks) never arrive. Lasts until :meth:`cut`. Returns how many connections it applies to."""
        with self._lock:
            self._withheld.update(self._pairs)
            return len(self._pairs)

    def refuse(self) -> None:
        """Close new connections at once (the client sees its connection reset) until :meth:`accept`."""
        self._accepting.clear()

    def accept(self) -> None:
        """Forward new connections again."""
        self._accepting.set()

    # -- internals -------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._accepting.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=self._connect_timeout)
            except OSError as exc:
                logger.info("proxy %s: upstream %s unreachable: %s", self._listen, self.upstream, exc)
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections_total += 1
            for src, dst in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pipe, args=(src, dst, client, upstream), daemon=True,
                                          name=f"tcp-proxy-pipe-{self.port}")
                thread.start()

    def _pipe(self, src: socket.socket, dst: socket.socket, client: socket.socket,
              upstream: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if src is upstream and (client, upstream) in self._withheld:
                    continue  # withhold_replies(): the answer is lost on the way
                dst.sendall(data)
        except OSError:
            pass  # the other direction or cut() closed the sockets: this pipe is done
        # One side closed: close both, so the peer sees the connection end too.
        with self._lock:
            if (client, upstream) in self._pairs:
                self._pairs.remove((client, upstream))
            self._withheld.discard((client, upstream))
        for sock in (client, upstream):
            with contextlib.suppress(OSError):  # already closed or reset
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _reset(sock: socket.socket) -> None:
    """Abort a connection with RST. SHUT_RD first: close() alone does not wake a thread blocked in recv()."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass  # already closed or reset
    sock.close()
