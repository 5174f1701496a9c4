"""HTTP connections that cannot be held open by a client that sends nothing, or sends slowly.

uvicorn closes a keep-alive connection idle after a response (`timeout_keep_alive`), but times nothing
else: a connection that never sends a request, or sends its headers a byte a second, stays open for
ever, and enough of them take every file descriptor. Here each request's headers must arrive within
`timeout_request_header` seconds of the connection opening (or of the request's first byte on a
kept-alive connection); otherwise the connection gets a 408 and is closed.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

_TIMEOUT_BODY = b"the request headers took too long\n"
_REQUEST_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, with a time limit on receiving each request's headers."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    @classmethod
    def factory(cls, header_timeout: float) -> Callable[..., HeaderTimeoutProtocol]:
        """What uvicorn.Config(http=...) takes: it calls it with its own arguments per connection."""
        return functools.partial(cls, header_timeout=header_timeout)

    def connection_made(self, transport: asyncio.Transport) -> None:   # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        was_waiting = self._is_waiting_for_headers
        super().data_received(data)
        if not was_waiting:
            return
        if self._is_waiting_for_headers:
            self._start_header_timer()   # a request has begun: its headers are due within the limit
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    @property
    def _is_waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _start_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._header_timeout, self._headers_too_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_late(self) -> None:
        self._header_timer = None
        if not self._is_waiting_for_headers or self.transport.is_closing():
            return
        if self.timeout_keep_alive_task is not None:
            return   # idle between requests: uvicorn's keep-alive timeout closes it
        client = "%s:%d" % self.client if self.client else "a client"
        logger.info("closed the connection of %s: no complete request headers within %g s (--timeout-request-header)",
                    client, self._header_timeout)
        self.transport.write(_REQUEST_TIMEOUT_RESPONSE)
        self.transport.close()
