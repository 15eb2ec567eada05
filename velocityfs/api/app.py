"""The HTTP shim: the documented /p and /p/media endpoints plus /u/auth.

Handlers parse the request, call ``service.access`` through the shared
offload (never SQL on the loop), and translate results and refusals into
the JSON and status codes of ``docs/pool-management-api.md``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import unquote

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from velocityfs import errors
from velocityfs.api import DEFAULT_MAX_BODY_BYTES
from velocityfs.api.access_log import AccessLog, route_of
from velocityfs.api.body import (
    INLINE_JSON_BYTES,
    BadRequest,
    BodyTooLarge,
    authkey_of,
    mib_field,
    parse_object,
    read_body,
    text_field,
)
from velocityfs.api.openapi import OPENAPI
from velocityfs.service.access import DEFAULT_UPLOAD_IDLE_S, Access, Upload
from velocityfs.service.metrics import Metrics
from velocityfs.service.pools import MIB
from velocityfs.service.views import MediaView, PoolView
from velocityfs.threads import CatalogUnavailable, Offload

log = logging.getLogger("velocityfs.api")

STATUS: list[tuple[type[errors.VelocityError], int]] = [
    (errors.AuthenticationFailed, 403),
    (errors.PermissionDenied, 403),
    (errors.NotFound, 404),
    (errors.QuotaAboveAncestor, 406),
    (errors.Conflict, 409),
    (errors.NotEmpty, 409),
    (errors.QuotaExceeded, 413),
    (errors.InvalidName, 400),
    (errors.InvalidValue, 400),
    (errors.VolumeOffline, 503),
    (errors.LeaseLost, 503),
]


class TooLarge(errors.VelocityError):
    """The body passed the quota while streaming (413)."""


class UploadIdle(errors.VelocityError):
    """No bytes of an upload's body arrived for ``upload_idle_s`` (408)."""


# An idle upload ends at most this much after upload_idle_s (or a tenth of it, if less).
IDLE_SLACK_S = 1.0


# Threads checking passwords at a time.
PASSWORD_THREADS = 1


class Mirror(Protocol):
    """What an in-process mount offers so API changes show in it at once."""

    async def pool_added(self, view: PoolView) -> None: ...
    async def pool_removed(self, pool_id: str) -> None: ...
    async def media_added(self, view: MediaView) -> None: ...
    async def media_removed(self, media_id: str) -> None: ...
    async def settle_pending(self) -> None: ...


def status_of(exc: errors.VelocityError) -> int:
    if isinstance(exc, BadRequest):
        return 400
    if isinstance(exc, TooLarge | BodyTooLarge):
        return 413
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def as_mib(nbytes: int) -> int | float:
    """Sizes go out as MiB: whole numbers when exact, fractions otherwise."""
    return nbytes // MIB if nbytes % MIB == 0 else round(nbytes / MIB, 6)


class Shim:
    """Request handlers bound to one service, offload and (optional) mount mirror."""

    def __init__(
        self,
        access: Access,
        offload: Offload,
        holder_id: Callable[[], str],
        mirror: Mirror | None,
        upload_idle_s: float = DEFAULT_UPLOAD_IDLE_S,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        self.access = access
        self.metrics = metrics or Metrics()
        self.offload = offload
        # The process's holder as it is now: one whose lease expired registers again.
        self.holder_id = holder_id
        self.mirror = mirror
        self.upload_idle_s = upload_idle_s
        self.max_body_bytes = max_body_bytes
        # Password checks (argon2, ~0.1 s of CPU each, the GIL released) run on a thread
        # of their own, one at a time: a flood of logins queues here, never in the
        # catalog's limiter, which the mount shares.
        self.passwords = trio.CapacityLimiter(PASSWORD_THREADS)
        # Long JSON bodies are parsed on a thread, one at a time (INLINE_JSON_BYTES).
        self.parsing = trio.CapacityLimiter(1)

    async def fields(self, request: Request) -> dict[str, Any]:
        """The JSON body (GET and DELETE too, as documented), at most ``max_body_bytes``,
        and the authkey of an ``Authorization: Bearer`` header if the body has none."""
        body = await read_body(request, self.max_body_bytes)
        if len(body) <= INLINE_JSON_BYTES:
            data = parse_object(body)
        else:
            parse = functools.partial(parse_object, body, yielding=True)
            data = await trio.to_thread.run_sync(parse, limiter=self.parsing)
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer ") and not data.get("authkey"):
            data["authkey"] = header[7:].strip()
        return data

    async def call(self, fn: Any, *args: Any) -> Any:
        if self.mirror is not None:
            # The mount's batched closes and unlinks first: API clients see what cp and rm did.
            await self.mirror.settle_pending()
        return await self.offload(fn, *args)

    # /u/auth ----------------------------------------------------------------
    async def auth(self, request: Request) -> JSONResponse:
        data = await self.fields(request)
        if request.method == "POST":
            name, password = text_field(data, "name"), text_field(data, "password")
            user_id, stored = await self.call(self.access.password_hash, name)
            user_id = await trio.to_thread.run_sync(
                self.access.check_password, stored, password, user_id, limiter=self.passwords
            )
            issued = await self.call(self.access.issue, user_id, stored)
        elif request.method == "PATCH":
            issued = await self.call(self.access.renew, authkey_of(data))
        else:
            await self.call(self.access.drop, authkey_of(data))
            return JSONResponse({})
        return JSONResponse(
            {"authkey": issued.authkey, "expires": issued.expires_ns // 1_000_000_000}
        )

    # /p -----------------------------------------------------------------------
    async def pools(self, request: Request) -> JSONResponse:
        data = await self.fields(request)
        authkey = authkey_of(data)
        if request.method == "GET":
            gid = text_field(data, "gid")
            gid, shared = await self.call(self.access.group_pools, authkey, gid)
            return JSONResponse(
                {
                    "gid": gid,
                    "pools": [
                        {
                            "pid": s.pool.id,
                            "name": s.pool.name,
                            "parent": s.pool.parent_id,
                            "quota_mib": as_mib(s.quota_bytes),
                            "used_mib": as_mib(s.pool.used_bytes),
                            "avail_mib": as_mib(s.avail_bytes),
                            "permissions": s.permissions,
                        }
                        for s in shared
                    ],
                }
            )
        if request.method == "PUT":
            parent = text_field(data, "parentpool")
            name = text_field(data, "name")
            quota = mib_field(data, "quota_mib")
            view = await self.call(self.access.create_pool, authkey, parent, name, quota)
            if self.mirror is not None:
                await self.mirror.pool_added(view)
            return JSONResponse({"pid": view.id})
        pid = text_field(data, "pid")
        await self.call(self.access.remove_pool, authkey, pid)
        if self.mirror is not None:
            await self.mirror.pool_removed(pid)
        return JSONResponse({})

    # /p/media ----------------------------------------------------------------
    async def media(self, request: Request) -> JSONResponse:
        data = await self.fields(request)
        authkey = authkey_of(data)
        if request.method == "GET":
            pid = text_field(data, "pid")
            listed = await self.call(self.access.list_media, authkey, pid)
            return JSONResponse(
                {
                    "pid": pid,
                    "media": [
                        {
                            "mid": m.id,
                            "filename": m.name,
                            "size_mib": as_mib(m.size),
                            "size_bytes": m.size,
                            "volume": m.volume,
                            "backing_path": m.backing_path,
                        }
                        for m in listed
                    ],
                }
            )
        if request.method == "PUT":
            pid = text_field(data, "pid")
            name = text_field(data, "filename")
            size = mib_field(data, "size_mib")
            view = await self.call(self.access.create_media, authkey, pid, name, size)
            if self.mirror is not None:
                await self.mirror.media_added(view)
            return JSONResponse({"pid": pid, "filename": view.name, "mid": view.id})
        mid = text_field(data, "mid")
        await self.call(self.access.remove_media, authkey, mid)
        if self.mirror is not None:
            await self.mirror.media_removed(mid)
        return JSONResponse({})

    async def upload(self, request: Request) -> JSONResponse:
        """Stream a raw body into a temporary file under a growing grant, then adopt it."""
        # The server already percent-decoded the path once: an encoded '/' or '..'
        # arrives here decoded and is refused by the naming rule.
        authkey = request.path_params["authkey"]
        pid = request.path_params["pid"]
        name = request.path_params["filename"]
        raw_path = request.scope.get("raw_path")
        if raw_path is not None:
            # The server decodes %-escapes leniently (invalid UTF-8 becomes U+FFFD);
            # a name must not be silently replaced by another one.
            try:
                unquote(raw_path.decode("ascii"), errors="strict")
            except UnicodeError as exc:
                raise BadRequest("the upload path is not valid UTF-8") from exc
        length = request.headers.get("content-length")
        declared = int(length) if length and length.isdigit() else None
        upload: Upload = await self.call(
            self.access.begin_upload, authkey, pid, name, self.holder_id(), declared
        )
        self.metrics.upload_started()
        try:
            fd = await self.call(upload.open)
            try:
                written = await self._stream_into(request, upload, fd, declared)
            finally:
                os.close(fd)
            if declared is not None and written != declared:
                raise BadRequest(f"the body ended after {written} of {declared} bytes")
            view = await self.call(upload.commit, written)
        except ClientDisconnect:
            # A client that goes away mid-body is no server error: clean up quietly.
            with trio.CancelScope(shield=True):
                await self.call(upload.abort)
            log.info("upload of %r into pool %s: the client disconnected", name, pid)
            return error(400, "the client disconnected before the body was complete")
        except UploadIdle as exc:
            # Its grant and file go now; the answer tells a client that is still there.
            with trio.CancelScope(shield=True):
                await self.call(upload.abort)
            log.info("upload of %r into pool %s aborted: %s", name, pid, exc)
            timeout = error(408, str(exc))
            timeout.headers["Connection"] = "close"
            return timeout
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.call(upload.abort)
            raise
        finally:
            self.metrics.upload_ended()
        if self.mirror is not None:
            await self.mirror.media_added(view)
        return JSONResponse({"pid": pid, "filename": view.name, "mid": view.id})

    async def _stream_into(
        self, request: Request, upload: Upload, fd: int, declared: int | None
    ) -> int:
        """Write the body into ``fd`` under the upload's growing grant; its length.

        UploadIdle when none of the body arrives for ``upload_idle_s``: the time the
        server waits for the client, counted from when it has stored the last bytes.
        Its own work (a grant's transaction, a slow catalog) never counts, and only
        bytes of the body start the clock again (chunked framing alone does not).
        One cancel scope covers the whole body and its deadline moves on at most
        every IDLE_SLACK_S (a scope per 64 KiB chunk costs ~20 us, 0.35 s a GiB), so
        an idle upload ends between upload_idle_s and IDLE_SLACK_S later.
        """
        idle_s = self.upload_idle_s
        slack = min(IDLE_SLACK_S, idle_s / 10)
        written = 0
        more = True
        with trio.CancelScope(deadline=trio.current_time() + idle_s) as waiting:
            while more:
                message = await request.receive()
                if waiting.cancel_called:  # the deadline passed as this arrived
                    break
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                more = message.get("more_body", False)
                chunk = message.get("body", b"")
                if not chunk:
                    continue
                end = written + len(chunk)
                if end > upload.reserved:
                    if declared is not None:
                        raise TooLarge("the body is longer than its Content-Length")
                    waiting.deadline = math.inf  # the server's own work does not count
                    await self._grow(upload, end)
                os.write(fd, chunk)
                written = end
                now = trio.current_time()
                if not now + idle_s <= waiting.deadline < math.inf:
                    waiting.deadline = now + idle_s + slack
        if more:  # left before the end of the body: the deadline passed
            raise UploadIdle(f"no bytes of the body arrived for {idle_s:g} s")
        return written

    async def _grow(self, upload: Upload, end: int) -> None:
        """Reserve at most one step ahead of the bytes received, one transaction each
        (``Upload.grow``): an upload never holds much more room than it has used."""
        try:
            await self.call(upload.grow, end)
        except errors.QuotaExceeded as exc:
            raise TooLarge("the upload passes a pool's quota") from exc

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(OPENAPI)


def metrics_endpoint(metrics: Metrics) -> Endpoint:
    """``GET /metrics``: Prometheus's scrape, with no authkey (firewall it like the API).
    Outside the OpenAPI document: it is for Prometheus, not for API clients."""

    async def scrape(request: Request) -> Response:
        body, content_type = metrics.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return scrape


def create_app(
    access: Access,
    offload: Offload,
    holder_id: Callable[[], str],
    mirror: Mirror | None = None,
    *,
    upload_idle_s: float = DEFAULT_UPLOAD_IDLE_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: Metrics | None = None,
    serve_metrics: bool = False,
) -> AccessLog:
    """The API; with ``serve_metrics`` also ``GET /metrics`` (a 404 otherwise)."""
    metrics = metrics or Metrics()
    shim = Shim(access, offload, holder_id, mirror, upload_idle_s, max_body_bytes, metrics)
    routes = [
        Route("/u/auth", no_query(shim.auth), methods=["POST", "PATCH", "DELETE"]),
        Route("/p", no_query(shim.pools), methods=["GET", "PUT", "DELETE"]),
        Route("/p/media", no_query(shim.media), methods=["GET", "PUT", "DELETE"]),
        Route("/p/media/{authkey}/{pid}/{filename:path}", no_query(shim.upload), methods=["PUT"]),
        Route("/openapi.json", no_query(shim.openapi), methods=["GET"]),
    ]
    if serve_metrics:
        routes.append(Route("/metrics", metrics_endpoint(metrics), methods=["GET"]))

    async def refusal(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.VelocityError)
        return error(status_of(exc), str(exc))

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return error(503, "the catalog is unreachable; try again")

    async def failure(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %r", request.method, route_of(request.scope), exc)
        return error(500, "internal error")

    app = Starlette(
        routes=routes,
        exception_handlers={
            errors.VelocityError: refusal,
            CatalogUnavailable: unavailable,
            HTTPException: json_routing,
            Exception: failure,
        },
    )
    return AccessLog(app, metrics)


def create_metrics_app(metrics: Metrics) -> AccessLog:
    """``GET /metrics`` alone, for a process without the API (``metrics_listen``); other
    paths and methods get the API's JSON errors."""
    app = Starlette(
        routes=[Route("/metrics", metrics_endpoint(metrics), methods=["GET"])],
        exception_handlers={HTTPException: json_routing},
    )
    return AccessLog(app, metrics)


async def json_routing(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no route) and 405 (with its Allow header), as JSON errors."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    response = error(exc.status_code, exc.detail)
    response.headers.update(exc.headers or {})
    return response


Endpoint = Callable[[Request], Awaitable[Response]]


def no_query(endpoint: Endpoint) -> Endpoint:
    """No endpoint takes query string parameters: fields travel in the JSON body (the
    authkey also as ``Authorization: Bearer``) or in the upload's path, so a query
    string is refused (400) before anything else, its body unread."""

    async def checked(request: Request) -> Response:
        if request.scope.get("query_string"):
            raise BadRequest("query string parameters are not accepted: send the JSON body")
        return await endpoint(request)

    return checked
