"""The HTTP shim: the documented /p and /p/media endpoints plus /u/auth.

Handlers parse the request, call ``service.access`` through the shared
offload (never SQL on the loop), and translate results and refusals into
the JSON and status codes of ``docs/pool-management-api.md``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Protocol
from urllib.parse import unquote

import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from velocityfs import errors
from velocityfs.api.openapi import OPENAPI
from velocityfs.service.access import Access, Upload
from velocityfs.service.pools import MIB, mib_to_bytes
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
]


UPLOAD_CHUNK = 64 * MIB


class BadRequest(errors.VelocityError):
    """A missing or malformed field (400)."""


class TooLarge(errors.VelocityError):
    """The body passed the quota while streaming (413)."""


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
    if isinstance(exc, TooLarge):
        return 413
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def masked(path: str) -> str:
    """A request path fit for a log: upload paths carry the authkey."""
    return "/p/media/<authkey>/..." if path.startswith("/p/media/") else path


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def as_mib(nbytes: int) -> int | float:
    """Sizes go out as MiB: whole numbers when exact, fractions otherwise."""
    return nbytes // MIB if nbytes % MIB == 0 else round(nbytes / MIB, 6)


async def fields(request: Request) -> dict[str, Any]:
    """The JSON body (GET and DELETE too, as documented), over the query string."""
    data: dict[str, Any] = dict(request.query_params)
    body = await request.body()
    if body.strip():
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise BadRequest("the body is not valid JSON") from exc
        if not isinstance(parsed, dict):
            raise BadRequest("the body must be a JSON object")
        data.update(parsed)
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer ") and not data.get("authkey"):
        data["authkey"] = header[7:].strip()
    return data


def text_field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{name}' is required and must be a non-empty string")
    return value


def authkey_of(data: dict[str, Any]) -> str:
    value = data.get("authkey")
    if not isinstance(value, str) or not value:
        raise errors.AuthenticationFailed("an authkey is required")
    return value


def mib_field(data: dict[str, Any], name: str) -> int:
    """A MiB amount given as a JSON number or a numeric string."""
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadRequest(f"'{name}' is required and must be a number of MiB")
    try:
        return mib_to_bytes(value)
    except errors.InvalidValue as exc:
        raise BadRequest(str(exc)) from exc


class Shim:
    """Request handlers bound to one service, offload and (optional) mount mirror."""

    def __init__(
        self, access: Access, offload: Offload, holder_id: str, mirror: Mirror | None
    ) -> None:
        self.access = access
        self.offload = offload
        self.holder_id = holder_id
        self.mirror = mirror

    async def call(self, fn: Any, *args: Any) -> Any:
        if self.mirror is not None:
            # The mount's batched closes and unlinks first: API clients see what cp and rm did.
            await self.mirror.settle_pending()
        return await self.offload(fn, *args)

    # /u/auth ----------------------------------------------------------------
    async def auth(self, request: Request) -> JSONResponse:
        data = await fields(request)
        if request.method == "POST":
            issued = await self.call(
                self.access.login, text_field(data, "name"), text_field(data, "password")
            )
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
        data = await fields(request)
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
        data = await fields(request)
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
            self.access.begin_upload, authkey, pid, name, self.holder_id, declared
        )
        try:
            fd = await self.call(upload.open)
            written = 0
            try:
                async for chunk in request.stream():
                    if not chunk:
                        continue
                    end = written + len(chunk)
                    if end > upload.reserved:
                        if declared is not None:
                            raise TooLarge("the body is longer than its Content-Length")
                        await self._grow(upload, end)
                    os.write(fd, chunk)
                    written = end
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
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.call(upload.abort)
            raise
        if self.mirror is not None:
            await self.mirror.media_added(view)
        return JSONResponse({"pid": pid, "filename": view.name, "mid": view.id})

    async def _grow(self, upload: Upload, end: int) -> None:
        """Reserve ahead in chunks, one transaction each: 64 MiB far from a limit, a
        quarter of what is left near it, never less than the chunk that arrived."""
        try:
            await self.call(upload.reserve, end - upload.reserved, UPLOAD_CHUNK)
        except errors.QuotaExceeded as exc:
            raise TooLarge("the upload passes a pool's quota") from exc

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(OPENAPI)


def create_app(
    access: Access, offload: Offload, holder_id: str, mirror: Mirror | None = None
) -> AccessLog:
    shim = Shim(access, offload, holder_id, mirror)
    routes = [
        Route("/u/auth", shim.auth, methods=["POST", "PATCH", "DELETE"]),
        Route("/p", shim.pools, methods=["GET", "PUT", "DELETE"]),
        Route("/p/media", shim.media, methods=["GET", "PUT", "DELETE"]),
        Route("/p/media/{authkey}/{pid}/{filename:path}", shim.upload, methods=["PUT"]),
        Route("/openapi.json", shim.openapi, methods=["GET"]),
    ]

    async def refusal(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.VelocityError)
        return error(status_of(exc), str(exc))

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return error(503, "the catalog is unreachable; try again")

    async def failure(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %r", request.method, masked(request.url.path), exc)
        return error(500, "internal error")

    app = Starlette(
        routes=routes,
        exception_handlers={
            errors.VelocityError: refusal,
            CatalogUnavailable: unavailable,
            Exception: failure,
        },
    )
    return AccessLog(app)


class AccessLog:
    """One log line per request with status and time (authkeys in paths are masked).

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

    def __init__(self, app: Any) -> None:
        self.app = app

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
            log.info(
                "%s %s %d %.1fms",
                scope["method"],
                masked(scope["path"]),
                state["status"],
                (time.monotonic() - started) * 1000,
            )
