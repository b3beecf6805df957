"""Connections the server holds, bounded: read deadlines, a connection cap, and the fd limit.

uvicorn's keep-alive timer stops at a connection's first byte, so a client that trickles a
request's headers (or opens a socket and sends nothing) holds it for ever; a thousand such sockets
use up the process's file descriptors and every later client, /health included, is locked out.
`guarded_protocol` is uvicorn's h11 protocol with two additions:

    header deadline   a connection that has not sent a whole request head within `header_timeout`
                      seconds of opening (or of its last response) is closed
    connection cap    past `max_connections`, a new connection closes the connection idle the
                      longest (one waiting for a request head); with none idle, the new one is closed

The body has its own deadline in the app (serve/app.py read_body). `raise_fd_limit` lifts the soft
limit on open files to the hard one at start, and `connection_cap` keeps the cap below it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

FD_RESERVE = 128  # descriptors kept for the model's files, threads, logs and the listening socket


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one where allowed; -> the limit now in force."""
    try:
        import resource
    except ImportError:  # not on Linux or macOS
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


def connection_cap(wanted: int, fd_limit: int) -> int:
    """The connection cap: what the operator asked, but always below the descriptors there are."""
    cap = min(wanted, fd_limit - FD_RESERVE)
    if cap < wanted:
        log.warning(
            "at most %d connections (the open-files limit is %d; raise `ulimit -n` for more)", cap, fd_limit
        )
    return max(cap, 8)


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with a request-head deadline and a connection cap."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._head_timer: asyncio.TimerHandle | None = None
            self._arm_head_deadline()
            if len(self.connections) > max_connections:
                self._make_room()

        # ---------------------------------------------------------- the request-head deadline
        @property
        def waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm_head_deadline(self) -> None:
            self._disarm_head_deadline()
            self._idle_since = self.loop.time()
            self._head_timer = self.loop.call_later(header_timeout, self._head_deadline_passed)

        def _disarm_head_deadline(self) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_deadline_passed(self) -> None:
            self._head_timer = None
            if self.waiting_for_head and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if not self.waiting_for_head:  # a whole request head arrived: the app has it now
                self._disarm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_deadline()
            super().connection_lost(exc)

        # ---------------------------------------------------------- the cap
        def _make_room(self) -> None:
            idle = [c for c in self.connections if c is not self and getattr(c, "waiting_for_head", False)]
            if not idle:
                log.warning("%d connections, all busy: refusing a new one", len(self.connections) - 1)
                self.transport.close()
                return
            oldest: Any = min(idle, key=lambda c: c._idle_since)
            oldest.transport.close()

    return GuardedH11Protocol
