"""A TCP proxy on loopback in front of a server, with network faults to order: handshakes
cut after the server's first bytes, every open connection dropped at once."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

CHUNK_BYTES = 65536
CONNECT_TIMEOUT_S = 10  # to the real server behind the proxy


class Proxy:
    """Relays listen (127.0.0.1, any port) to target; faults are set by the test between or
    during steps."""

    def __init__(self, target_host: str, target_port: int,
                 listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.target = (target_host, target_port)
        self.drop_handshakes = 0  # the next N connections end after the server's first bytes
        self.refuse = False  # accept, then close at once
        self.silent = False  # accept, then never relay a byte (a peer that never speaks)
        # Every connection, open or new, relays nothing more and is never closed: a host that
        # vanished without a word (its packets dropped, no reset).
        self.stalled = False
        self.rate_bytes_per_s: float | None = None  # a slow link (each direction of each connection)
        self.connections = 0
        self.relayed_bytes = 0  # in both directions, over every connection
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(listen)
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.connections += 1
                cut_early = self.drop_handshakes > 0
                self.drop_handshakes -= cut_early
            threading.Thread(target=self._serve, args=(client, cut_early), daemon=True).start()

    def _serve(self, client: socket.socket, cut_early: bool) -> None:
        if self.refuse:
            client.close()
            return
        with self._lock:
            self._open.append(client)
        if self.silent or self.stalled:
            return  # held open, never answered, until cut() or close()
        try:
            upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT_S)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)  # the bound was the connect's: a relay may be quiet for long
        with self._lock:
            self._open.append(upstream)
        if cut_early:
            with contextlib.suppress(OSError):
                client.sendall(upstream.recv(CHUNK_BYTES))  # the banner, then nothing
            for sock in (client, upstream):
                self._close(sock)
            return
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(CHUNK_BYTES if self.rate_bytes_per_s is None
                                      else max(1024, int(self.rate_bytes_per_s / 20))):
                if self.stalled:
                    continue  # swallowed: the other end hears nothing, and nothing closes
                sink.sendall(data)
                with self._lock:
                    self.relayed_bytes += len(data)
                if self.rate_bytes_per_s is not None:
                    time.sleep(len(data) / self.rate_bytes_per_s)
        except OSError:
            pass
        for sock in (source, sink):
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        with self._lock, contextlib.suppress(ValueError):
            self._open.remove(sock)

    def cut(self) -> int:
        """Drop every open connection now (a link that went down); how many there were."""
        with self._lock:
            victims = list(self._open)
        for sock in victims:
            self._close(sock)
        return len(victims)

    def close(self) -> None:
        self._server.close()
        self.cut()
