"""One log line per request, with no authkey in it, and early answers ended cleanly;
each request is also counted in the process's metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from velocityfs.service.metrics import Metrics

log = logging.getLogger("velocityfs.api")

# What the access log shows for a path that matches no route.
UNMATCHED = "(unmatched)"


def route_of(scope: Any) -> str:
    """A request's path fit for a log: its route's template (``/p/media/{authkey}/...``),
    never the path itself, which may carry an authkey however it is spelled."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class AccessLog:
    """One log line per request: method, route template (never the path, which may carry
    an authkey), status and time; the same go to ``metrics``.

    It also ends an early answer (a 403/409/413 given before the request body
    was read) properly: the answer's bytes go out at once, then the rest of the
    body is read and dropped, and only then is the response ended. Hypercorn
    closes a connection whose request body is unfinished as soon as the
    response ends; closing a socket with unread data makes the kernel reset
    the connection, which destroys the answer in the client's buffers (the
    client sees "server disconnected without sending a response"). And with
    its queue of unread body chunks full, Hypercorn cannot end the response
    anyway.
    """

    # A client that stops sending its body for this long gets its connection closed.
    DRAIN_IDLE_S = 10.0

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        state = {"status": 500, "body_done": False}

        async def tracked_receive() -> Any:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def drain() -> None:
            while not state["body_done"]:
                with trio.move_on_after(self.DRAIN_IDLE_S) as idle:
                    await tracked_receive()
                if idle.cancelled_caught:
                    return

        async def send_and_note(message: Any) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            final = message["type"] == "http.response.body" and not message.get("more_body", False)
            if not final or state["body_done"]:
                await send(message)
                return
            try:
                if message.get("body"):
                    await send({**message, "more_body": True})  # the client has its answer
                await drain()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError):
                # The client hung up once it had the answer (e.g. a 413 before its body).
                log.debug("client gone before the end of an early response")

        try:
            await self.app(scope, tracked_receive, send_and_note)
        finally:
            seconds = time.monotonic() - started
            route = route_of(scope)
            log.info("%s %s %d %.1fms", scope["method"], route, state["status"], seconds * 1000)
            self.metrics.api_request(scope["method"], route, int(state["status"]), seconds)
