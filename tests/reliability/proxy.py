"""A TCP forwarder in front of a test server, so the endpoint can go away and come back while
the server behind it (and every object it holds) stays as it was, and so it can answer S3 errors
on the wire.

moto keeps its buckets in memory: stopping moto itself would lose them, so it is the endpoint
the client talks to that is stopped and restarted. While stopped, nothing listens on the port and
every live connection is cut: a client sees exactly what a restarting S3 endpoint shows it,
connection refused.

The forwarder reads the HTTP requests that pass through it (request line, headers, body framing;
bytes are forwarded as they are), so a test can also
- make it answer S3 errors (503 SlowDown, 500 InternalError, 403 AccessDenied...) to the next N
  requests instead of forwarding them (`fail_next`): real HTTP answers that botocore and s3fs
  retry, or not, as they would against S3;
- stop the endpoint at a known request (`stop_when`): before the request reaches the server, or
  once the server has applied it and is answering (the client never sees the answer);
- cut one connection at a known request and stay up (`cut_when`): the server has applied the
  request, the client never hears so, and its retry reaches the server again.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

REASONS = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 503: "Slow Down"}
MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "AccessDenied": "Access Denied",
    "ServiceUnavailable": "Service is unable to handle request.",
}


@dataclass(frozen=True)
class Request:
    """One HTTP request seen by the endpoint (header names lower-cased)."""

    method: str
    target: str  # the path and query, as sent
    headers: dict[str, str] = field(repr=False)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


Matcher = Callable[[Request], bool]


@dataclass
class _Failure:
    left: int
    status: int
    code: str
    when: Matcher | None


@dataclass
class _Strike:
    when: Matcher
    after_applied: bool
    stop_endpoint: bool
    done: threading.Event


class _Link:
    """One client connection and its connection to the server."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.doomed: _Strike | None = None  # struck at the server's answer


class StoppableEndpoint:
    """Forwards 127.0.0.1:<port> to `target` ("host:port") until stop(); start() reopens it.

    The port is this endpoint's from construction to close(): a placeholder socket stays bound
    to it (with SO_REUSEPORT, so that the listener of each start() can bind beside it), and never
    listens. On Linux a TCP connection to a port that is bound but where nothing listens is
    refused (RST), so a stopped endpoint refuses connections exactly as a closed port does, and
    no other process (the other xdist worker, a server picking a free port) can take the port
    between a stop() and the next start(): the kernel hands out neither a bound port for a bind
    to port 0 nor for an outgoing connection, and a bind without SO_REUSEPORT to it fails.
    (Keeping the listener open and resetting each connection instead would change what clients
    see: the TCP handshake would succeed, and botocore would report a closed connection, not
    "Could not connect to the endpoint URL".)
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._placeholder = socket.socket()
        self._placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._placeholder.bind(("127.0.0.1", 0))
        self.port = self._placeholder.getsockname()[1]
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._links: set[_Link] = set()
        self._failures: list[_Failure] = []
        self._strikes: list[_Strike] = []
        self.accepted = 0
        self.requests: list[Request] = []  # every request seen, in order
        self.answered: list[tuple[Request, int]] = []  # requests answered with an error

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen again (nothing to do when already listening)."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Stop listening (connections are refused) and cut every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            links, self._links = self._links, set()
        if listener is not None:
            _close(listener)
        for link in links:
            _close(link.client)
            _close(link.upstream)

    def close(self) -> None:
        """stop(), and give the port up."""
        self.stop()
        _close(self._placeholder)

    @property
    def listening(self) -> bool:
        with self._lock:
            return self._listener is not None

    # -- faults on the wire ------------------------------------------------------------------
    def fail_next(
        self, n: int, status: int = 503, code: str = "SlowDown", when: Matcher | None = None
    ) -> None:
        """Answer the next `n` requests (those `when` accepts, if given) with an S3 error
        instead of forwarding them: the server never sees them."""
        with self._lock:
            self._failures.append(_Failure(n, status, code, when))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def stop_when(self, when: Matcher, after_applied: bool = False) -> threading.Event:
        """Stop the endpoint at the first request `when` accepts; the Event is set once stopped.

        after_applied=False: before the request is forwarded (the server never sees it).
        after_applied=True: the request is forwarded whole, and the endpoint stops when the
        server's answer begins (the server has applied it; the client never gets the answer).
        """
        return self._strike(_Strike(when, after_applied, True, threading.Event()))

    def cut_when(self, when: Matcher) -> threading.Event:
        """At the first request `when` accepts: forward it whole, and when the server's answer
        begins, cut that one connection (the endpoint stays up). The Event is set once cut."""
        return self._strike(_Strike(when, True, False, threading.Event()))

    def _strike(self, strike: _Strike) -> threading.Event:
        with self._lock:
            self._strikes.append(strike)
        return strike.done

    def errors_answered(self, status: int | None = None) -> int:
        """How many requests were answered with an error (with this status, if given)."""
        with self._lock:
            return sum(1 for _, answered in self.answered if status in (None, answered))

    def _decide(self, request: Request) -> _Failure | _Strike | None:
        with self._lock:
            self.requests.append(request)
            for strike in self._strikes:
                if strike.when(request):
                    self._strikes.remove(strike)
                    return strike
            for failure in self._failures:
                if failure.left > 0 and (failure.when is None or failure.when(request)):
                    failure.left -= 1
                    self.answered.append((request, failure.status))
                    return failure
        return None

    # -- forwarding ----------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(self._target, timeout=10)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            link = _Link(client, upstream)
            with self._lock:
                if self._listener is not listener:
                    _close(client)
                    _close(upstream)
                    return
                self._links.add(link)
                self.accepted += 1
            threading.Thread(target=self._requests, args=(link,), daemon=True).start()
            threading.Thread(target=self._answers, args=(link,), daemon=True).start()

    def _requests(self, link: _Link) -> None:
        """Client to server, request by request."""
        reader = _Reader(link.client)
        try:
            while (head := reader.head()) is not None:
                request = _parse(head)
                decision = self._decide(request)
                if isinstance(decision, _Failure):
                    if request.headers.get("expect", "").lower() != "100-continue":
                        reader.body(request, None)  # read and drop it: the answer comes after
                    link.client.sendall(_error_response(request, decision.status, decision.code))
                    break  # Connection: close
                if isinstance(decision, _Strike) and not decision.after_applied:
                    if decision.stop_endpoint:
                        self.stop()
                    decision.done.set()
                    break  # this connection is cut (finally)
                if isinstance(decision, _Strike):
                    link.doomed = decision
                link.upstream.sendall(head)
                reader.body(request, link.upstream)
        except OSError:
            pass
        finally:
            self._drop(link)

    def _answers(self, link: _Link) -> None:
        """Server to client, as it comes."""
        try:
            while data := link.upstream.recv(65536):
                if link.doomed is not None:
                    interim, data = _split_interim(data)
                    if interim:  # "100 Continue": the client sends the body only after it
                        link.client.sendall(interim)
                    if data:  # the server answers a request it has applied: cut here
                        if link.doomed.stop_endpoint:
                            self.stop()
                        self._drop(link)
                        link.doomed.done.set()
                        break
                    continue
                link.client.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(link)

    def _drop(self, link: _Link) -> None:
        _close(link.client)
        _close(link.upstream)
        with self._lock:
            self._links.discard(link)


class _Reader:
    """Buffered reads of HTTP/1.1 requests from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _fill(self) -> bool:
        data = self._sock.recv(65536)
        self._buffer += data
        return bool(data)

    def head(self) -> bytes | None:
        """The request line and headers, blank line included (None: the client closed)."""
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill():
                if self._buffer:
                    raise OSError("the client closed mid-request")
                return None
        end = self._buffer.index(b"\r\n\r\n") + 4
        head, self._buffer = self._buffer[:end], self._buffer[end:]
        return head

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            if not self._fill():
                raise OSError("the client closed mid-body")
        end = self._buffer.index(b"\r\n") + 2
        line, self._buffer = self._buffer[:end], self._buffer[end:]
        return line

    def _exactly(self, n: int, sink: socket.socket | None) -> None:
        while n > 0:
            if not self._buffer and not self._fill():
                raise OSError("the client closed mid-body")
            piece, self._buffer = self._buffer[:n], self._buffer[n:]
            n -= len(piece)
            if sink is not None:
                sink.sendall(piece)

    def body(self, request: Request, sink: socket.socket | None) -> None:
        """Pass the request's body to `sink` (None: drop it) as it arrives."""
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            while True:
                line = self._line()
                if sink is not None:
                    sink.sendall(line)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while (trailer := self._line()) != b"\r\n":
                        if sink is not None:
                            sink.sendall(trailer)
                    if sink is not None:
                        sink.sendall(b"\r\n")
                    return
                self._exactly(size + 2, sink)
        self._exactly(int(request.headers.get("content-length", "0") or 0), sink)


def _split_interim(data: bytes) -> tuple[bytes, bytes]:
    """Interim (1xx) answers at the start of `data`, and the rest."""
    interim = b""
    while data.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in data:
        end = data.index(b"\r\n\r\n") + 4
        interim, data = interim + data[:end], data[end:]
    return interim, data


def _parse(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Request(method, target, headers)


def _error_response(request: Request, status: int, code: str) -> bytes:
    """An S3 error answer, as S3 writes it."""
    request_id = uuid.uuid4().hex[:16].upper()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{MESSAGES.get(code, code)}</Message>"
        f"<Resource>{request.path}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if request.method == "HEAD" else head + body


def _close(end: socket.socket) -> None:
    try:
        end.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    end.close()
