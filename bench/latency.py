"""A TCP forwarder that holds every request for a fixed time: an object store's latency, locally.

moto's server answers on 127.0.0.1 in about a millisecond, so one-request-at-a-time reads of it
are bound by the CPU of client and server, not by waiting; a real S3 endpoint takes tens of
milliseconds to its first byte (a round trip and the service's own time), and waiting is what
concurrent reads overlap. This forwarder puts that wait back: each chunk a client sends (an HTTP
request; small requests go in one chunk) is held `delay_s` before it is passed on. One thread
pair per connection, so concurrent connections wait concurrently, as they would on a network.

Written here rather than taken from a library: the standard toxiproxy-style tools are separate
servers (Go binaries), and the benchmark must run from the repository alone.
"""

from __future__ import annotations

import socket
import threading
import time


class DelayingForwarder:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:`target_port`, each request held `delay_s`."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.delay_s = delay_s
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._target, timeout=30)
            upstream.settimeout(None)
            threading.Thread(
                target=_pump, args=(client, upstream, self.delay_s), daemon=True
            ).start()
            threading.Thread(target=_pump, args=(upstream, client, 0.0), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket, delay_s: float) -> None:
    try:
        while data := source.recv(65536):
            if delay_s:
                time.sleep(delay_s)
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()
