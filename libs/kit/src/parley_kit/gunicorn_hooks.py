"""Gunicorn server hooks shared by every service (`-c python:parley_kit.gunicorn_hooks`)."""

from __future__ import annotations

import gc
from typing import Any

from gunicorn.http import wsgi

accesslog = None  # the app writes ECS access lines itself
keepalive = 75  # longer than the gateway's idle pool timeout, so pooled connections are not cut under it
graceful_timeout = 30
# gunicorn 27 opens a control socket at one path per user: several services on one host would clash over it.
control_socket_disable = True
DRAIN_SECONDS = 5.0


def child_exit(_server: Any, worker: Any) -> None:
    """Mark a dead worker's metric files so its live gauges stop counting."""
    from parley_kit import metrics  # here, not at the top: the master then never loads Flask (~9 MB per service)

    metrics.mark_worker_dead(worker.pid)


# Full collections wait for 1,000 middle-generation ones (Python's default: 10). A full collection walks every live
# object and pauses the worker for it: with 2,000 streams held by a worker that had served a while, 60-130 ms each,
# every few seconds, and they were the added time-to-first-chunk p99 (bench/README.md, session 6). Cycles seldom
# live long enough to reach the oldest generation; the young collections, which find most of them, are unchanged.
GC_THRESHOLDS = (700, 10, 1000)


def worker_exit(_server: Any, _worker: Any) -> None:
    """Let detached bookkeeping (llm's usage rows: `parley_kit.background`) finish before the worker goes. A worker
    that drained its connections has usually let it finish already; this covers one that had none open and exits at
    once. Short, as the master's graceful timeout may be mostly spent by now."""
    from parley_kit import background

    background.drain(timeout=DRAIN_SECONDS)


class OneSendResponse(wsgi.Response):
    """gunicorn's response, but an answer's status line and headers leave in the same `send` as its first body bytes.

    gunicorn sends them apart: two system calls per answer, two segments on the wire, and a peer that reads the head
    before the body arrives wakes twice (the gateway reading llm's answer, a client reading the gateway's). Here the
    first `write` builds the head and sends it with its body bytes; a write that sends nothing (an empty one, a
    bodiless answer) sends the head alone before it returns, as gunicorn's does, so the head is never held past the
    write that made it and each stream chunk still leaves at once. Every other path (`close` without a write,
    `sendfile`) is gunicorn's own, and `headers_sent` only turns true as the head's send begins (gunicorn answers a
    500 when an app fails before that, and closes the connection after).
    """

    _writing = False  # inside `write`: `send_headers` builds the head and leaves it to the body's send
    _head = b""

    def send_headers(self) -> None:
        if not self._writing:
            super().send_headers()
        elif not self.headers_sent and not self._head:
            lines = self.default_headers()
            lines.extend([f"{name}: {value}\r\n" for name, value in self.headers])
            self._head = f"{''.join(lines)}\r\n".encode("latin-1")

    def write(self, arg: bytes) -> None:
        self._writing = True
        try:
            super().write(arg)
        except BaseException:
            self._head = b""  # never sent: an app that catches the error may still start another response
            raise
        finally:
            self._writing = False
        if self._head:  # no body bytes went out with it
            self._send_head()

    def _emit_body(self, data: bytes) -> None:
        if not self._head:
            super()._emit_body(data)
        elif self.chunked:
            self._send_head(b"%X\r\n" % len(data), data, b"\r\n")
        else:
            self._send_head(data)

    def _send_head(self, *body: bytes) -> None:
        head, self._head = self._head, b""
        # Set before the send, which may be long (a large body to a slow client): a worker stopped during it must
        # close the connection, not write a 500 after bytes of this answer.
        self.headers_sent = True
        self.sock.sendall(b"".join((head, *body)))


def post_worker_init(_worker: Any) -> None:
    """Answer with `OneSendResponse`; move everything the app allocated at start-up out of the garbage collector's
    sight (a full collection then walks only what requests create, not the whole loaded app: imports, models, SDK
    clients), and make full collections rare (`GC_THRESHOLDS`)."""
    wsgi.Response = OneSendResponse  # read by `wsgi.create` at each request: gunicorn offers no setting for it
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
