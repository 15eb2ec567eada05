"""Serve the shim with Hypercorn's trio worker, inside whatever trio loop runs it.

Hypercorn streams request bodies with back-pressure (a 1 GiB PUT stays
near 40 MiB RSS) and runs in the same ``trio.run`` as ``pyfuse3.main()``,
so the mount and the API share state and see each other's changes at once.
"""

import logging
from collections.abc import Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from velocityfs.api import DEFAULT_MAX_BODY_BYTES
from velocityfs.api.access_log import AccessLog
from velocityfs.api.app import Mirror, create_app, create_metrics_app
from velocityfs.errors import VelocityError
from velocityfs.service.access import DEFAULT_UPLOAD_IDLE_S, Access
from velocityfs.service.metrics import Metrics
from velocityfs.service.velocity import Velocity
from velocityfs.threads import Offload

log = logging.getLogger(__name__)


def hypercorn_config(bind: str) -> Config:
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.h11_max_incomplete_size = 64 * 1024
    return config


async def serve_api(
    velocity: Velocity,
    offload: Offload,
    holder_id: Callable[[], str],
    bind: str,
    *,
    mirror: Mirror | None = None,
    upload_idle_s: float = DEFAULT_UPLOAD_IDLE_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: Metrics | None = None,
    serve_metrics: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports started (with the bound addresses) once the
    socket listens. With ``serve_metrics``, ``GET /metrics`` too."""
    app = create_app(
        Access(velocity),
        offload,
        holder_id,
        mirror,
        upload_idle_s=upload_idle_s,
        max_body_bytes=max_body_bytes,
        metrics=metrics,
        serve_metrics=serve_metrics,
    )
    await _serve(app, bind, "the API", task_status)


async def serve_metrics(
    metrics: Metrics,
    bind: str,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``GET /metrics`` alone on ``bind`` (``metrics_listen``), until cancelled."""
    await _serve(create_metrics_app(metrics), bind, "the metrics", task_status)


async def _serve(
    app: AccessLog, bind: str, what: str, task_status: trio.TaskStatus[list[str]]
) -> None:
    # Stopped by cancellation from the caller's nursery; an explicit trigger also
    # keeps Hypercorn from installing signal handlers of its own.
    never = trio.Event()
    try:
        await serve(
            app, hypercorn_config(bind), shutdown_trigger=never.wait, task_status=task_status
        )
    except* OSError as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CannotListen(f"cannot serve {what} on {bind}: {reason}") from None


class CannotListen(VelocityError):
    """The API's (or the metrics') address is taken or not ours (one line for the
    operator, no traceback)."""


def unwrap_listen_error(group: BaseExceptionGroup[BaseException]) -> CannotListen | None:
    """Trio reports a failed bind inside exception groups; find it for a plain message."""
    found: BaseException | None = group.subgroup(CannotListen)
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found if isinstance(found, CannotListen) else None
