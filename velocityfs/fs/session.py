"""A mount's kernel session: pyfuse3's init, main loop and unmount, and the
operating-system settings that go with them (mount options, read-ahead, GC)."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import pyfuse3
import trio

from velocityfs.fs.filesystem import Filesystem
from velocityfs.fs.mirror import KernelCache, Mirror
from velocityfs.mounts import fsname
from velocityfs.service.metrics import Metrics
from velocityfs.service.velocity import Velocity
from velocityfs.threads import Offload

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024
# The cyclic collector's first generation runs every GC_YOUNG allocations instead of
# every 700: a create allocates a few hundred objects (node, view, request, trio's
# task state), and each collection walked them all again several times over.
GC_YOUNG = 20_000


# Request handlers and the init option that pyfuse3 3.5 lacks and
# patches/pyfuse3-velocityfs.patch adds (tests/test_fs_holes.py checks they agree):
# without them the mount still runs, with less, and says so.
PATCHED_HANDLERS = ("fallocate", "lseek", "copy_file_range")
PATCHED_OPTIONS = ("handle_killpriv_v2",)


def missing_handlers() -> list[str]:
    """The patched handlers and options the installed pyfuse3 does not have."""
    return [
        name for name in PATCHED_HANDLERS + PATCHED_OPTIONS if not hasattr(pyfuse3.Operations, name)
    ]


def mount_options(*, allow_other: bool) -> set[str]:
    """The FUSE mount options; ``default_permissions`` always.

    The daemon checks no mode, owner or group itself: with ``allow_other`` and
    without the kernel's check, every local user could read, write and delete
    every VM disk on the mount. The source names this process (``velocityfs.mounts``), so
    ``velocityfs status`` can tell one catalog's mounts from another's.
    """
    options = {f"fsname={fsname(os.getpid())}", "subtype=velocityfs", "default_permissions"}
    if allow_other:
        options.add("allow_other")
    return options


def tune_gc() -> None:
    """Keep the collector off the catalog mirror a mount loads (nothing in it is
    garbage until the catalog says so), and collect the young less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def raise_read_ahead(mountpoint: str) -> None:
    """Ask the kernel for 1 MiB reads (it sends 128 KiB by default); ~1.6x faster here."""
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(str(READ_AHEAD_KB))
    except OSError as exc:
        log.info("could not raise read-ahead (%s); reads stay at 128 KiB", exc)


class MountSession:
    """One mount from ``pyfuse3.init`` to unmount (made by ``velocityfs.daemon``)."""

    def __init__(
        self,
        velocity: Velocity,
        holder_id: str,
        offload: Offload,
        mountpoint: str,
        *,
        allow_other: bool,
        attr_timeout: float,
        metrics: Metrics,
    ) -> None:
        self.mountpoint = mountpoint
        self.fs = Filesystem(
            velocity,
            holder_id,
            offload,
            attr_timeout=attr_timeout,
            kernel=KernelCache(),
            metrics=metrics,
        )
        tune_gc()
        missing = missing_handlers()
        if missing:
            log.warning(
                "this pyfuse3 lacks %s: fallocate(2) gets EOPNOTSUPP, holes read as "
                "data, copies go block by block and every write costs a second request "
                "(scripts/lib/bootstrap.sh installs a build that has them)",
                ", ".join(missing),
            )
        pyfuse3.init(
            self.fs.ops,
            mountpoint,
            mount_options(allow_other=allow_other),
        )

    @property
    def holder_id(self) -> str:
        return self.fs.grants.holder_id

    @property
    def mirror(self) -> Mirror:
        """Where the in-process API reports its changes, so the mount shows them at once."""
        return self.fs.mirror

    def start(self, nursery: trio.Nursery) -> None:
        """Start what runs beside the kernel requests: the follower and the batches."""
        nursery.start_soon(self.fs.follower.run)
        nursery.start_soon(self.fs.grants.run_batches)

    async def serve(self) -> None:
        """Answer kernel requests until unmounted; then settle every open file."""
        await pyfuse3.main()
        await self.fs.ops.settle_all()

    def stop(self) -> None:
        """Leave ``serve`` (a signal asked the process to end)."""
        pyfuse3.terminate()

    def requests(self) -> dict[str, int]:
        """Kernel requests served so far, by kind (counted by ``fs.boundary``)."""
        return dict(self.fs.ops.requests)

    def grants_held(self) -> int:
        """Media this mount holds a grant on (open for writing, or not yet settled)."""
        return self.fs.grants.held()

    async def ready(self) -> str:
        """Once the kernel answers: the read-ahead, then the status line."""
        await trio.to_thread.run_sync(raise_read_ahead, self.mountpoint)
        return f"mounted {self.mountpoint}"

    def close(self) -> None:
        pyfuse3.close(unmount=True)
