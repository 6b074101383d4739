"""The HTTP side of `serve`: uvicorn with its h11 protocol (no WebSockets), plus what uvicorn has no setting for.
A client must send each request's line and headers within `read_timeout` seconds of connecting (or of its
previous response), so slow clients cannot hold connections open; and one client address may hold at most
`per_client` connections (its requests beyond them get 503). (The body's deadline is the app's, the same number
of seconds.)"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


def make_server(app, host: str, port: int, per_client: int, read_timeout: float) -> uvicorn.Server:
    """A uvicorn server for `app` whose connections follow the rules above."""
    counts: Counter = Counter()

    class Protocol(_Guarded):
        limit, open_by_client, header_seconds = per_client, counts, read_timeout
    config = uvicorn.Config(app, host=host, port=port, http=Protocol, ws="none", log_level="warning",
                            timeout_keep_alive=5, h11_max_incomplete_event_size=16 << 10)
    return uvicorn.Server(config)


async def _too_many_connections(scope, receive, send):
    """The app of a connection over its client's limit: 503, and the connection closes."""
    body = json.dumps({"error": {"message": "too many connections from this address; retry shortly",
                                 "type": "server_error", "param": None, "code": None}}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _Guarded(H11Protocol):
    limit: int
    open_by_client: Counter
    header_seconds: float

    def connection_made(self, transport: asyncio.Transport):
        super().connection_made(transport)
        self._deadline, self._cycle_seen = None, None
        self._address = self.client[0] if self.client else ""
        self.open_by_client[self._address] += 1
        if self.open_by_client[self._address] > self.limit:
            self.app = _too_many_connections  # answered once its request has arrived
        self._arm()

    def connection_lost(self, exc):
        self._disarm()
        self.open_by_client[self._address] -= 1
        if self.open_by_client[self._address] <= 0:
            del self.open_by_client[self._address]
        super().connection_lost(exc)

    def handle_events(self):
        super().handle_events()
        if self.cycle is not self._cycle_seen:  # a new request's headers have arrived
            self._cycle_seen = self.cycle
            self._disarm()

    def on_response_complete(self):
        self._arm()  # first: a pipelined request handled inside the call below disarms it again
        super().on_response_complete()

    def _arm(self):
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.header_seconds, self._too_slow)

    def _disarm(self):
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self):
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
