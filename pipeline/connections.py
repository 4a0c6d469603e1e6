"""The server's connections: open ones kept below the open-file limit, a deadline for a request's headers, and a
log that says at most once a second that connections were refused.

A connection over `max_connections` closes the one that has waited longest for a request (a slow or idle client),
or is refused itself when every connection is busy with a request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import resource
import sys
import time
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.errors import ModrmError

if TYPE_CHECKING:
    from pipeline.serve import ServeConfig

log = logging.getLogger("modrm.serve")

LISTEN_BACKLOG = 64  # connections the kernel queues for us; one loop turn may accept that many files at once
OWN_FILES = 128  # files the process keeps besides its connections: libraries, the model, the log
MAX_CONNECTIONS = 1000  # the default where the open-file limit allows it


def open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


def connection_ceiling() -> int:
    """The most connections that cannot exhaust the open-file limit: what the process keeps open itself and two
    loop turns of accepts are left out (at the limit, every accept would fail and log)."""
    return open_file_limit() - OWN_FILES - 2 * LISTEN_BACKLOG


def default_max_connections() -> int:
    return max(1, min(MAX_CONNECTIONS, connection_ceiling()))


def check_max_connections(limit: int) -> None:
    if limit > connection_ceiling():
        raise ModrmError(
            f"--max-connections {limit}: the open-file limit of {open_file_limit()} leaves room for "
            f"{connection_ceiling()} (raise it with `ulimit -n`)"
        )


class OncePerSecond(logging.Filter):
    """Lets one record a second through of those starting with one of `prefixes`, without its traceback, and
    counts the others into the next one: a flood of refused connections cannot flood the log."""

    def __init__(self, prefixes: tuple[str, ...], interval_s: float = 1.0):
        super().__init__()
        self.prefixes, self.interval_s = prefixes, interval_s
        self.last, self.dropped = -math.inf, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(self.prefixes):
            return True
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.dropped += 1
            return False
        record.msg = record.msg.splitlines()[0]
        if self.dropped:
            record.msg += f" ({self.dropped} more such lines dropped)"
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        self.last, self.dropped = now, 0
        return True


REFUSALS = OncePerSecond(
    (
        "connections at the limit",  # ConnectionGuard
        "socket.accept() out of system resource",  # asyncio, should the open-file limit be reached anyway
        "Invalid HTTP request received.",  # uvicorn, once per malformed request
    )
)


def limit_refusal_logs() -> None:
    for name in ("modrm.serve", "asyncio", "uvicorn.error"):
        if REFUSALS not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(REFUSALS)


class ConnectionGuard:
    """Keeps open connections within `limit` and gives each `header_timeout_s` to send a request's headers (from
    opening, or from its last answer). A connection over the limit closes the one that has waited longest for a
    request (a slow or idle client), or is refused itself when every connection is busy with a request."""

    def __init__(self, limit: int, header_timeout_s: float):
        self.limit, self.header_timeout_s = limit, header_timeout_s
        self.open: set[GuardedH11Protocol] = set()
        self.idle: dict[GuardedH11Protocol, None] = {}  # waiting for a request, longest first

    def admit(self, protocol: GuardedH11Protocol) -> bool:
        if len(self.open) >= self.limit:
            if not self.idle:
                log.warning("connections at the limit of %d, each busy with a request: refused one", self.limit)
                return False
            log.warning("connections at the limit of %d: closed the one waiting longest for a request", self.limit)
            oldest = next(iter(self.idle))
            self.forget(oldest)
            oldest.transport.close()
        self.open.add(protocol)
        return True

    def forget(self, protocol: GuardedH11Protocol) -> None:
        self.open.discard(protocol)
        self.busy(protocol)

    def waits(self, protocol: GuardedH11Protocol) -> None:
        """Idle from now (not from its last byte: a client trickling headers gains nothing)."""
        if protocol not in self.idle:
            self.idle[protocol] = None
            protocol.header_timer = protocol.loop.call_later(self.header_timeout_s, protocol.transport.close)

    def busy(self, protocol: GuardedH11Protocol) -> None:
        if protocol in self.idle:
            del self.idle[protocol]
            protocol.header_timer.cancel()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a ConnectionGuard: busy while the app answers a request, idle otherwise."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.guard.admit(self):
            self.guard.waits(self)
        else:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def _track(self) -> None:
        if self not in self.guard.open:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.guard.busy(self)
        else:
            self.guard.waits(self)


def uvicorn_config(app: FastAPI, config: ServeConfig, host: str, port: int) -> uvicorn.Config:
    """uvicorn's settings for `app`: the guarded protocol, a short listen backlog, the graceful shutdown period."""
    guard = ConnectionGuard(config.max_connections, config.header_timeout_s)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        http=functools.partial(GuardedH11Protocol, guard=guard),
        backlog=LISTEN_BACKLOG,
        timeout_graceful_shutdown=config.shutdown_timeout_s,  # beyond it, what still runs is answered 503
    )
