"""A TCP proxy between a branch and HQ that breaks the network on command.

Branch configs point their source DSN at the proxy (``proxy.dsn(hq.dsn)``);
the test then cuts, stalls or refuses at the moment it wants:

* ``cut()``: close every open connection now (both directions, RST), as a
  dropped VPN or a rebooted router does;
* ``stall(seconds)``: stop forwarding bytes (connections stay open, data
  waits in the kernel) for a while, then resume, as a congested link does;
* ``cut_after(nbytes)`` / ``stall_after(nbytes, seconds)``: arm a cut or a
  stall that fires once ``nbytes`` more bytes came from the server: the
  middle of a COPY or of a window, deterministically, whatever the timing;
* ``refuse(seconds)``: accept new connections and close them at once for a
  while (existing ones keep working), as a server that turns clients away.

Counters (``connections``, ``bytes_from_server``, ``cuts``) let a test
check that the fault really hit traffic.  One thread accepts, two threads
pump each connection; everything is a daemon thread and ``close()`` (or the
context manager) stops it all.

Example::

    with FaultProxy(hq_cluster.port) as proxy:
        branch_yaml["source"]["dsn"] = proxy.dsn(hq.dsn)
        proxy.cut_after(200_000)          # cut inside the initial COPY
"""
from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

CHUNK = 65536


class _Pair:
    """One proxied connection: client socket, server socket, two pumps."""

    def __init__(self, proxy: "FaultProxy", client: socket.socket, server: socket.socket):
        self.proxy, self.client, self.server = proxy, client, server
        self.closed = threading.Event()

    def start(self) -> None:
        for src, dst, from_server in ((self.client, self.server, False), (self.server, self.client, True)):
            threading.Thread(target=self._pump, args=(src, dst, from_server), daemon=True,
                             name="faultproxy-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while not self.closed.is_set():
                ready, _, _ = select.select([src], [], [], 0.5)
                if not ready:
                    continue
                data = src.recv(CHUNK)
                if not data:
                    break
                if from_server:
                    data = self.proxy._from_server(self, data)
                    if data is None:
                        return
                self.proxy._flowing.wait()
                if self.closed.is_set():
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self.close()

    def close(self, reset: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in (self.client, self.server):
            try:
                if reset:   # RST instead of FIN: the peer sees "connection reset"
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)    # wakes a pump blocked in send
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self.proxy._forget(self)


class FaultProxy:
    """Listen on 127.0.0.1 (a free port) and forward to ``target_host:target_port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0):
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._refuse_until = 0.0
        self._armed: tuple[str, int, float] | None = None   # (action, bytes left, stall seconds)
        self._stopped = threading.Event()
        self.connections = 0
        self.refused = 0
        self.cuts = 0
        self.bytes_from_server = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="faultproxy-accept")
        self._thread.start()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def dsn(self, dsn: str) -> str:
        """``dsn`` (a postgresql:// URI) with host and port replaced by the proxy's."""
        parts = urlsplit(dsn)
        auth = parts.netloc.rpartition("@")
        netloc = f"{auth[0]}@127.0.0.1:{self.port}" if auth[1] else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # ------------------------------------------------------------- faults
    def cut(self) -> int:
        """Reset every open connection now; returns how many were cut."""
        with self._lock:
            pairs = list(self._pairs)
        for p in pairs:
            p.close(reset=True)
        self.cuts += 1
        log.info("proxy: cut %d connections", len(pairs))
        return len(pairs)

    def stall(self, seconds: float, wait: bool = False) -> None:
        """Stop forwarding for `seconds` (in the background unless wait=True)."""
        self._flowing.clear()
        log.info("proxy: stalled for %.1f s", seconds)
        timer = threading.Timer(seconds, self._flowing.set)
        timer.daemon = True
        timer.start()
        if wait:
            timer.join()

    def resume(self) -> None:
        self._flowing.set()

    def refuse(self, seconds: float) -> None:
        """Turn new connections away for `seconds`; open ones keep working."""
        self._refuse_until = time.monotonic() + seconds
        log.info("proxy: refusing new connections for %.1f s", seconds)

    def cut_after(self, nbytes: int) -> None:
        """Cut every connection once `nbytes` more bytes came from the server."""
        with self._lock:
            self._armed = ("cut", nbytes, 0.0)

    def stall_after(self, nbytes: int, seconds: float) -> None:
        """Stall for `seconds` once `nbytes` more bytes came from the server."""
        with self._lock:
            self._armed = ("stall", nbytes, seconds)

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._stopped.set()
        self._flowing.set()
        self.cut()
        self._thread.join(timeout=5)
        try:
            self._listener.close()
        except OSError:
            pass

    # ------------------------------------------------------------- internals
    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()     # the server is down: the client sees the connection closed
                continue
            client.settimeout(None)
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(self, client, server)
            with self._lock:
                self._pairs.add(pair)
                self.connections += 1
            pair.start()

    def _from_server(self, pair: _Pair, data: bytes) -> bytes | None:
        """Count server bytes and fire an armed fault; None means the pair was cut."""
        fire = None
        with self._lock:
            self.bytes_from_server += len(data)
            if self._armed is not None:
                action, left, seconds = self._armed
                left -= len(data)
                if left <= 0:
                    fire, self._armed = (action, seconds), None
                else:
                    self._armed = (action, left, seconds)
        if fire is None:
            return data
        if fire[0] == "cut":
            self.cut()
            return None
        self.stall(fire[1])
        return data

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)
