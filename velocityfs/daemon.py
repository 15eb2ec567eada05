"""One velocityfs process from start to exit: ``velocityfs mount`` and ``serve``.

Both kinds of process live the same life, and it is written once, here:

1. refuse a catalog that is not initialised (``velocityfs init``);
2. reclaim the grants of dead processes, then register as a grant holder
   (a mount as a writer whose creates are batched and journaled);
3. run every catalog call through one ``Offload`` (one catalog thread on
   SQLite), and checkpoint SQLite's log in the background;
4. serve: the kernel mount (``fs.session``) and/or the API (``api.server``);
5. end on SIGINT or SIGTERM (``systemctl stop``), telling systemd both ways;
   on SIGUSR1, and at the end, print what it has cost (``_report``);
6. on the way out, whatever happened: commit the last batch, retire the
   holder (its lease expires instead if the catalog is away), remove its
   upload directories, close.

This module sits above the adapters: ``fs`` and ``api`` never import each
other, the CLI calls ``run_mount`` and ``run_serve``.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
from collections.abc import Callable
from typing import Protocol

import trio

from velocityfs.api import DEFAULT_MAX_BODY_BYTES
from velocityfs.api.app import Mirror
from velocityfs.api.server import CannotListen, serve_api, unwrap_listen_error
from velocityfs.fs.session import MountSession
from velocityfs.notify import sd_notify
from velocityfs.service.access import DEFAULT_UPLOAD_IDLE_S
from velocityfs.service.velocity import Velocity
from velocityfs.threads import Offload, checkpoints, threads_for

log = logging.getLogger(__name__)


class Role(Protocol):
    """What one kind of process adds to the common life (see the module docstring)."""

    @property
    def holder_id(self) -> str:
        """The grant holder this process is now (a mount may register again)."""
        ...

    @property
    def mirror(self) -> Mirror | None:
        """What the in-process API tells of its changes (a mount's nodes), if anything."""
        ...

    def start(self, nursery: trio.Nursery) -> None:
        """Start what runs beside serving."""

    async def serve(self) -> None:
        """Serve until ``stop``."""

    def stop(self) -> None:
        """Make ``serve`` return (a signal asked the process to end)."""

    async def ready(self) -> str:
        """The status line, once serving."""
        ...

    def requests(self) -> dict[str, int]:
        """Kernel requests served so far, by kind (none for the API alone)."""
        ...


class _ApiAlone:
    """``velocityfs serve``: the API alone, holding grants only while uploads run."""

    def __init__(self, velocity: Velocity, offload: Offload, holder_id: str, bind: str) -> None:
        self._v = velocity
        self._offload = offload
        self._holder_id = holder_id
        self._bind = bind
        self._stopped = trio.Event()

    @property
    def holder_id(self) -> str:
        return self._holder_id

    @property
    def mirror(self) -> Mirror | None:
        return None

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._keep_lease)

    async def serve(self) -> None:
        await self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()

    async def ready(self) -> str:
        return f"serving http://{self._bind}"

    def requests(self) -> dict[str, int]:
        return {}

    async def _keep_lease(self) -> None:
        """Renew the lease on upload grants, so no other process reclaims them as dead;
        once it has expired (the process stalled or was cut off), register again: the
        uploads under way then fail (their grants are reclaimed), later ones work."""
        while True:
            await trio.sleep(self._v.ledger.lease_ns / 1e9 / 3)
            try:
                if not await self._offload(self._v.ledger.heartbeat, self._holder_id):
                    log.error("the API's lease expired: its upload grants are reclaimed")
                    self._holder_id = await self._offload(self._v.ledger.register_holder)
            except Exception as exc:
                log.warning("lease renewal failed: %s", exc)


def run_mount(
    velocity: Velocity,
    mountpoint: str,
    *,
    allow_other: bool = False,
    attr_timeout: float = 1.0,
    api_bind: str | None = None,
    catalog_timeout_s: float = 10.0,
    upload_idle_s: float = DEFAULT_UPLOAD_IDLE_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Mount and serve until unmounted or signalled; grants are settled on the way out."""
    holder_id = _register(velocity, writer=True)
    offload = Offload(threads_for(velocity.db.is_sqlite), catalog_timeout_s)
    session: MountSession | None = None
    try:
        session = MountSession(
            velocity,
            holder_id,
            offload,
            mountpoint,
            allow_other=allow_other,
            attr_timeout=attr_timeout,
        )
        try:
            _serve(velocity, offload, session, api_bind, upload_idle_s, max_body_bytes)
        finally:
            session.close()
    finally:
        # The holder it is now: a mount cut off past its lease registers again.
        _retire(velocity, session.holder_id if session else holder_id, "unmounted")


def run_serve(
    velocity: Velocity,
    bind: str,
    catalog_timeout_s: float = 10.0,
    upload_idle_s: float = DEFAULT_UPLOAD_IDLE_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """``velocityfs serve``: the API alone against the catalog until signalled."""
    holder_id = _register(velocity, writer=False)
    offload = Offload(threads_for(velocity.db.is_sqlite), catalog_timeout_s)
    try:
        role = _ApiAlone(velocity, offload, holder_id, bind)
        _serve(velocity, offload, role, bind, upload_idle_s, max_body_bytes)
    finally:
        _retire(velocity, holder_id, "stopped")


def _register(velocity: Velocity, *, writer: bool) -> str:
    """Steps 1 and 2: check the catalog, reclaim the dead's grants, register."""
    velocity.require_initialised()
    reclaimed = velocity.reclaim_dead_holders()
    if reclaimed:
        log.warning("reclaimed %d grant(s) left by a crashed process", reclaimed)
    return velocity.register_writer() if writer else velocity.ledger.register_holder()


def _serve(
    velocity: Velocity,
    offload: Offload,
    role: Role,
    api_bind: str | None,
    upload_idle_s: float = DEFAULT_UPLOAD_IDLE_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Steps 3 to 5, in one trio loop; a failed bind of the API is one plain error."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, role.stop)
            nursery.start_soon(_report_on_request, velocity, role)
            nursery.start_soon(checkpoints, velocity.db)
            role.start(nursery)
            if api_bind is not None:
                await nursery.start(
                    functools.partial(
                        serve_api,
                        velocity,
                        offload,
                        lambda: role.holder_id,
                        api_bind,
                        mirror=role.mirror,
                        upload_idle_s=upload_idle_s,
                        max_body_bytes=max_body_bytes,
                    )
                )
            nursery.start_soon(_announce, role)
            await role.serve()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        listen_error: CannotListen | None = unwrap_listen_error(group)
        if listen_error is None:
            raise
        raise listen_error from None
    finally:
        _report(velocity, role)


async def _watch_signals(stop: Callable[[], None]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s received: stopping", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            stop()
            return


async def _report_on_request(velocity: Velocity, role: Role) -> None:
    """``kill -USR1``: the counts so far (benchmarks take them before and after a run)."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _signum in signals:
            _report(velocity, role)


def _report(velocity: Velocity, role: Role) -> None:
    """One line of what this process cost so far, whatever the log level:
    ``velocityfs: counts transactions=N requests=N lookup=N ...`` (kernel requests
    by kind, catalog transactions committed): figures no disk noise moves."""
    requests = role.requests()
    counts = [f"transactions={velocity.db.commits}", f"requests={sum(requests.values())}"]
    counts += [f"{kind}={n}" for kind, n in sorted(requests.items())]
    print("velocityfs: counts " + " ".join(counts), file=sys.stderr, flush=True)


async def _announce(role: Role) -> None:
    status = await role.ready()
    print(f"velocityfs: {status}", file=sys.stderr, flush=True)
    sd_notify(f"READY=1\nSTATUS={status}")


def _retire(velocity: Velocity, holder_id: str, ended: str) -> None:
    """Step 6: the last batch, the holder, the catalog; and this process's upload
    directories, which fsck would otherwise report as a gone process's leftovers."""
    try:
        velocity.media.end_creates()
        velocity.ledger.retire_holder(holder_id)
    except Exception as exc:  # the catalog is away: the lease expires instead
        log.warning("could not retire this process's lease (%s); it will expire", exc)
    velocity.backing.discard_uploads(holder_id)
    log.info("%s; %d catalog transactions committed", ended, velocity.db.commits)
    velocity.close()
