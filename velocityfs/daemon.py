"""One velocityfs process from start to exit: ``velocityfs mount`` and ``serve``.

Both kinds of process live the same life, and it is written once, here:

1. refuse a catalog that is not initialised (``velocityfs init``);
2. reclaim the grants of dead processes, then register as a grant holder
   (a mount as a writer whose creates are batched and journaled);
3. run every catalog call through one ``Offload`` (one catalog thread on
   SQLite), and checkpoint SQLite's log in the background;
4. serve: the kernel mount (``fs.session``) and/or the API (``api.server``),
   and the metrics (``service.metrics``: at ``/metrics`` on the API, or on an
   address of their own, ``metrics_listen``), whose pool and volume gauges
   come from ``service.usage``, kept current here every ``REFRESH_S``;
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
from velocityfs.api.server import CannotListen, serve_api, serve_metrics, unwrap_listen_error
from velocityfs.fs.session import MountSession
from velocityfs.notify import sd_notify
from velocityfs.service.access import DEFAULT_UPLOAD_IDLE_S
from velocityfs.service.metrics import HolderCollector, Metrics, UsageCollector
from velocityfs.service.usage import REFRESH_S, Usage
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

    def grants_held(self) -> int:
        """Grants held for the mount's media (none for the API alone: its uploads'
        grants are the metrics' uploads in flight)."""
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

    def grants_held(self) -> int:
        return 0

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
    metrics_on_api: bool = True,
    metrics_listen: str | None = None,
) -> None:
    """Mount and serve until unmounted or signalled; grants are settled on the way out."""
    holder_id = _register(velocity, writer=True)
    offload = Offload(threads_for(velocity.db.is_sqlite), catalog_timeout_s)
    metrics = _metrics_of(velocity)
    session: MountSession | None = None
    try:
        session = MountSession(
            velocity,
            holder_id,
            offload,
            mountpoint,
            allow_other=allow_other,
            attr_timeout=attr_timeout,
            metrics=metrics,
        )
        try:
            _serve(
                velocity,
                offload,
                session,
                metrics,
                api_bind,
                upload_idle_s,
                max_body_bytes,
                metrics_on_api=metrics_on_api,
                metrics_listen=metrics_listen,
            )
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
    metrics_on_api: bool = True,
    metrics_listen: str | None = None,
) -> None:
    """``velocityfs serve``: the API alone against the catalog until signalled."""
    holder_id = _register(velocity, writer=False)
    offload = Offload(threads_for(velocity.db.is_sqlite), catalog_timeout_s)
    try:
        role = _ApiAlone(velocity, offload, holder_id, bind)
        _serve(
            velocity,
            offload,
            role,
            _metrics_of(velocity),
            bind,
            upload_idle_s,
            max_body_bytes,
            metrics_on_api=metrics_on_api,
            metrics_listen=metrics_listen,
        )
    finally:
        _retire(velocity, holder_id, "stopped")


def _register(velocity: Velocity, *, writer: bool) -> str:
    """Steps 1 and 2: check the catalog, reclaim the dead's grants, register. A volume
    whose disk is not there is said at start: its media stay unreadable until it is."""
    velocity.require_initialised()
    for name, reason in velocity.volumes.offline().items():
        log.warning("volume %s is offline, its media cannot be opened: %s", name, reason)
    reclaimed = velocity.reclaim_dead_holders()
    if reclaimed:
        log.warning("reclaimed %d grant(s) left by a crashed process", reclaimed)
    return velocity.register_writer() if writer else velocity.ledger.register_holder()


def _metrics_of(velocity: Velocity) -> Metrics:
    """The process's metrics, told of every catalog transaction from now on."""
    metrics = Metrics()
    velocity.db.observe = metrics.catalog_commit
    return metrics


def _serve(
    velocity: Velocity,
    offload: Offload,
    role: Role,
    metrics: Metrics,
    api_bind: str | None,
    upload_idle_s: float = DEFAULT_UPLOAD_IDLE_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    metrics_on_api: bool = True,
    metrics_listen: str | None = None,
) -> None:
    """Steps 3 to 5, in one trio loop; a failed bind of the API (or the metrics) is
    one plain error."""
    scraped = (metrics_on_api and api_bind is not None) or metrics_listen is not None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, role.stop)
            nursery.start_soon(_report_on_request, velocity, role)
            nursery.start_soon(checkpoints, velocity.db)
            role.start(nursery)
            if scraped:
                usage = Usage(velocity.changes, velocity.volumes)
                usage.apply(await offload(usage.read))
                metrics.add(UsageCollector(usage, velocity.volumes))
                metrics.add(
                    HolderCollector(
                        metrics, velocity.ledger, lambda: role.holder_id, role.grants_held
                    )
                )
                nursery.start_soon(_keep_usage, usage, offload)
            if metrics_listen is not None:
                await nursery.start(functools.partial(serve_metrics, metrics, metrics_listen))
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
                        metrics=metrics,
                        serve_metrics=metrics_on_api,
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


async def _keep_usage(usage: Usage, offload: Offload) -> None:
    """Keep the pool and volume gauges current: the catalog's changes every REFRESH_S,
    read on a catalog thread and applied here, on the loop that serves the scrapes."""
    while True:
        await trio.sleep(REFRESH_S)
        try:
            usage.apply(await offload(usage.read))
        except Exception as exc:  # the catalog may be away; the gauges wait for it
            log.warning("reading the usage for the metrics failed: %s", exc)


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
