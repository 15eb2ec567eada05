"""Serve the shim with Hypercorn's trio worker, inside whatever trio loop runs it.

Hypercorn streams request bodies with back-pressure (a 1 GiB PUT stays
near 40 MiB RSS) and runs in the same ``trio.run`` as ``pyfuse3.main()``,
so the mount and the API share state and see each other's changes at once.
"""

import logging
import signal
import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from velocityfs.api.app import Mirror, create_app
from velocityfs.errors import VelocityError
from velocityfs.notify import sd_notify
from velocityfs.service.access import Access
from velocityfs.service.velocity import Velocity
from velocityfs.threads import Offload, checkpoints, threads_for

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
    holder_id: str,
    bind: str,
    *,
    mirror: Mirror | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports started once the socket listens."""
    app = create_app(Access(velocity), offload, holder_id, mirror)
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
        raise CannotListen(f"cannot serve the API on {bind}: {reason}") from None


class CannotListen(VelocityError):
    """The API's address is taken or not ours (one line for the operator, no traceback)."""


def unwrap_listen_error(group: BaseExceptionGroup) -> CannotListen | None:
    """Trio reports a failed bind inside exception groups; find it for a plain message."""
    found = group.subgroup(CannotListen)
    while found is not None:
        first = found.exceptions[0]
        if isinstance(first, CannotListen):
            return first
        found = first  # type: ignore[assignment]
    return None


async def keep_lease(velocity: Velocity, offload: Offload, holder_id: str) -> None:
    """Renew the lease on upload grants, so no other process reclaims them as dead."""
    interval = velocity.ledger.lease_ns / 1e9 / 3
    while True:
        await trio.sleep(interval)
        try:
            if not await offload(velocity.ledger.heartbeat, holder_id):
                log.error("the API's upload grants were reclaimed while it was cut off")
        except Exception as exc:
            log.warning("lease renewal failed: %s", exc)


def run_standalone(velocity: Velocity, bind: str, catalog_timeout_s: float = 10.0) -> None:
    """``velocityfs serve``: the shim alone, holding grants only while uploads run."""
    velocity.require_initialised()
    velocity.reclaim_dead_holders()
    holder = velocity.ledger.register_holder()
    offload = Offload(threads_for(velocity.db.is_sqlite), catalog_timeout_s)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_api, velocity, offload, holder, bind)
            nursery.start_soon(keep_lease, velocity, offload, holder)
            nursery.start_soon(checkpoints, velocity.db)
            print(f"velocityfs: serving http://{bind}", file=sys.stderr, flush=True)
            sd_notify(f"READY=1\nSTATUS=serving http://{bind}")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        listen_error = unwrap_listen_error(group)
        if listen_error is None:
            raise
        raise listen_error from None
    finally:
        velocity.ledger.retire_holder(holder)
        velocity.close()
