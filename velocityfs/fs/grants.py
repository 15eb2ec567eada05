"""The write state of this mount's media, and the one place that changes it.

A media node's write state (``MediaNode``: size, settled, charged, held,
dirty, writers, and its lock) says what this mount may write without asking
the catalog: up to ``charged`` bytes, while its lease holds. ``Grants`` alone
changes it, with the catalog calls that go with each change:

- reserving and growing a grant before a write, copy, truncate or fallocate
  that needs room (``room_for_write``, ``copy``, ``resize``, ``allocate``);
- settling the real size into the catalog (fsync, truncate, a move);
- the batches of closes and unlinks, committed ``BATCH_S`` after the first
  (``Releases``, below), and ordering other catalog calls after them;
- the lease: growth stops when it may have lapsed (checked before and after
  the growth), and once it has expired the process registers again and every
  node starts afresh from its file on disk.

Lock order: the batch lock (``Releases``), then node locks. Code that holds a
node lock calls the catalog directly (``self._offload``), never through
``call``, ``commit`` or ``commit_unlinks``, which may wait for the batch lock
while a batch being committed waits for that node's lock.

Errors are raised as they are (``QuotaExceeded``, ``LeaseLost``, ``OSError``,
``CatalogUnavailable``); the fault boundary (``fs.boundary``) turns them into
errno values. See docs/architecture.md, "The write state".
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import trio

from velocityfs.errors import LeaseLost, QuotaExceeded
from velocityfs.fs.local_changes import LocalChanges
from velocityfs.fs.nodes import Inodes, MediaNode
from velocityfs.service.ledger import Settlement
from velocityfs.service.velocity import Velocity
from velocityfs.service.views import Creator, MediaView
from velocityfs.store.space import volume_holds
from velocityfs.threads import Offload

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1 << 20
# A new or reopened file's first grant: a small file is then written, or a reopened
# one grown a little, without another transaction.
FIRST_GRANT = MIB
# A lease is trusted for this share of its length after the last renewal: the rest
# is the margin for clocks and for a renewal under way.
LEASE_TRUST = 0.8


class Grants:
    """The write state of every media node of one mount (see the module docstring)."""

    def __init__(
        self,
        velocity: Velocity,
        offload: Offload,
        holder_id: str,
        inodes: Inodes,
        changes: LocalChanges,
    ) -> None:
        self._v = velocity
        self._offload = offload
        self._holder_id = holder_id
        self._inodes = inodes
        self._changes = changes
        self._lease_valid_until = velocity.ledger.lease_of(holder_id).trusted_until(LEASE_TRUST)
        self._releases = Releases(velocity, offload, changes, lambda: self._holder_id)

    @property
    def holder_id(self) -> str:
        """This mount's id as a grant holder (it changes when the mount registers again)."""
        return self._holder_id

    def held(self) -> int:
        """Media whose grant row this mount holds (for the metrics: a walk over the
        nodes, at each scrape, no SQL)."""
        return sum(1 for node in self._inodes.by_media.values() if node.held)

    # catalog calls of kernel requests ---------------------------------------------
    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A catalog call for a kernel request, made after this mount's pending unlinks:
        a name they free may be the one it uses, a pool they empty the one it removes."""
        await self.commit_unlinks()
        return await self._offload(fn, *args, **kwargs)

    async def call_with_room(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call``, once more after committing pending closes if the room did not
        suffice: their grants may be what holds it (a rename into a full pool)."""
        try:
            return await self.call(fn, *args, **kwargs)
        except QuotaExceeded:
            if not self._releases.pending:
                raise
        await self.commit()
        return await self.call(fn, *args, **kwargs)

    async def batched(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call`` for a catalog change that may join the batch (``fn`` takes
        ``batched``): on SQLite a unit of it, journaled (``service.batch``), run on the
        loop while the batch is open and committed with the next batch of closes; on
        PostgreSQL a transaction of its own, as ``call``."""
        await self.commit_unlinks()
        done = await self._offload.in_batch(
            self._v.media.open_batch, fn, *args, batched=True, **kwargs
        )
        self._releases.wake()
        return done

    async def batched_with_room(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``batched``, once more after committing pending closes if the room did not
        suffice (as ``call_with_room``)."""
        try:
            return await self.batched(fn, *args, **kwargs)
        except QuotaExceeded:
            if not self._releases.pending:
                raise
        await self.commit()
        return await self.batched(fn, *args, **kwargs)

    async def set_attrs(self, node: MediaNode, changes: dict[str, int]) -> dict[str, int]:
        """chmod, chown, utimes of a media, in the batch (``batched``); returns the
        columns as the service stored them.

        A pending close settles the node's mtime with its batch: the new one is
        the node's before the first await, so that settlement writes it whenever
        it runs, and a batch already carrying the close (which read the old one)
        is waited for first.
        """
        await self._releases.carried(node)
        before = node.mtime_ns
        node.mtime_ns = changes.get("mtime_ns", node.mtime_ns)
        try:
            with self.changing(node.media_id):
                return await self.batched(self._v.media.set_attrs, node.media_id, **changes)
        except BaseException:
            node.mtime_ns = before
            raise

    @contextlib.contextmanager
    def changing(self, *object_ids: str | None) -> Iterator[None]:
        """``LocalChanges.changing``, but a media whose close still waits for its batch
        stays in flight after the block: until that commits, the follower must not
        take the catalog's older size for it (a rename or chmod right after a close)."""
        try:
            with self._changes.changing(*object_ids):
                yield
        finally:
            self._releases.keep_in_flight(*object_ids)

    async def create(
        self,
        pool_id: str,
        name: str,
        *,
        mode: int,
        uid: int,
        gid: int,
        creator: Creator,
    ) -> tuple[MediaView, int]:
        """Create media open for writing by this mount, with a first grant; returns the
        media and the bytes granted, which ``created`` then gives its node.

        On SQLite the create is a unit of the service's batch, run right on the loop
        while the batch is open (``Offload.in_batch``); its commit comes with the
        next batch of closes, ``BATCH_S`` later at most.
        """
        await self.commit_unlinks()
        media = self._v.media
        created = await self._offload.in_batch(
            media.open_batch,
            media.create_open,
            pool_id,
            name,
            mode=mode,
            uid=uid,
            gid=gid,
            creator=creator,
            holder_id=self._holder_id,
            grant_chunk=FIRST_GRANT,
        )
        self._releases.wake()
        return created

    def created(self, node: MediaNode, granted: int) -> None:
        """A node made for media that ``create`` made: it holds the first grant."""
        node.charged += granted
        node.held = True

    # writers ----------------------------------------------------------------------
    async def open_writer(self, node: MediaNode) -> None:
        """A handle opens ``node`` for writing: take back its pending close, or wait for
        the batch carrying it, then hold the lease (a grant row) that volume moves
        respect. A file that grew by writes while last open for writing (a log, an
        append loop, fsx) gets a first grant with it, as a create does, so growing
        it again costs no transaction of its own; others (a disk image opened
        read-write) hold no room while open. Hold first, then open the backing
        file: a move cannot switch it between the two."""
        await self._releases.reopen(node)
        async with node.lock:
            if not node.held:
                first = FIRST_GRANT if node.grew else 0
                node.charged += await self._offload(
                    self._v.ledger.hold, node.media_id, self._holder_id, first
                )
                node.held = True
                node.grew = False
            node.writers += 1

    def released(self, node: MediaNode, *, writable: bool) -> None:
        """A handle of ``node`` closed: the last writer's close settles with the batch,
        and the last close of an unlinked media removes it with the batch."""
        node.writers -= writable
        if node.unlinked and not node.deleted and node.open_count == 0:
            node.deleted = True
            self._releases.unlink(node)
        elif node.writers == 0 and node.unsettled and not node.deleted:
            self._releases.close(node)

    def unlinked(self, node: MediaNode) -> None:
        """``node``'s name is gone from the mount: its media goes with the batch, or,
        while a handle has it open, stays hidden until the last close (``released``)."""
        self._releases.unlink(node)

    def fits(self, node: MediaNode, end: int) -> bool:
        """Whether a write up to ``end`` fits in this mount's grant as it is, needing no
        catalog call (most writes: the fast path, without an await)."""
        if end > node.settled:
            self._require_lease()
        return end <= node.charged

    async def room_for_write(self, node: MediaNode, off: int, length: int) -> int:
        """How many of ``length`` bytes at ``off`` may be written now: all, or what the
        quota still allows (a short write). Nothing fits: QuotaExceeded.

        The caller writes with no await between this (or ``fits``) and ``wrote``: the
        grant cannot shrink in between.
        """
        end = off + length
        if self.fits(node, end):
            return length
        refusal = await self._reserve(node, end, partial=True)
        if off >= node.charged:
            raise refusal or QuotaExceeded(f"no room left for media {node.media_id}")
        return min(length, node.charged - off)

    def wrote(self, node: MediaNode, end: int) -> None:
        """Bytes up to ``end`` were written into the room ``room_for_write`` gave; a write
        that grew the file while the lease lapsed is undone (``_undo_if_lapsed``)."""
        if end > node.size:
            self._undo_if_lapsed(node, node.size)
            node.size = end
            node.grew = True
        node.mtime_ns = node.ctime_ns = time.time_ns()
        node.dirty = True

    async def resize(self, node: MediaNode, size: int) -> None:
        """Truncate or extend a media; growth past a quota raises QuotaExceeded and
        changes nothing."""
        await self.settle_first(node)
        _require_volume_holds(node, size)
        if size > node.charged:
            await self._reserve(node, size, partial=False)
        with self._changes.changing(node.media_id):
            try:
                async with node.lock:
                    grows = size > node.size
                    if grows:
                        self._require_lease()
                    os.truncate(node.open_path, size)
                    if grows:
                        self._undo_if_lapsed(node, node.size)
                    if size < node.size:
                        # The cut bytes were data, not reservation: they go back to the
                        # pool now, even while a writer keeps the file open (its grant
                        # stays).
                        node.charged -= node.size - size
                    node.size = size
                    node.mtime_ns = node.ctime_ns = time.time_ns()
                    node.dirty = True
            except OSError:
                # The disk refused: the file is as it was; what was reserved goes back.
                await self.settle(node, release_grant=node.writers == 0)
                raise
            await self.settle(node, release_grant=node.writers == 0)

    async def allocate(
        self, node: MediaNode, grows_to: int | None, allocate: Callable[[], None]
    ) -> None:
        """Run ``allocate`` (an fallocate(2) on the backing file) on a thread; growth to
        ``grows_to`` is charged first, like a write, and past a quota raises
        QuotaExceeded and changes nothing."""
        if grows_to is not None:
            self._require_lease()
            _require_volume_holds(node, grows_to)
            if grows_to > node.charged:
                await self._reserve(node, grows_to, partial=False)
        async with node.lock:
            if grows_to is not None and grows_to > node.charged:
                raise QuotaExceeded(f"room for media {node.media_id} was handed back meanwhile")
            await trio.to_thread.run_sync(allocate)
            if grows_to is not None and grows_to > node.size:
                self._undo_if_lapsed(node, node.size)
                node.size = grows_to
            node.mtime_ns = node.ctime_ns = time.time_ns()
            node.dirty = True

    async def copy(self, node: MediaNode, off: int, length: int, copy: Callable[[int], int]) -> int:
        """Run ``copy(n)`` (a copy_file_range(2) of ``n`` bytes into ``node``'s backing
        file at ``off``) on a thread; returns the bytes copied.

        The room is that of a write of the same range (``room_for_write``): all of
        it, what the quota still allows (a short copy), or QuotaExceeded with nothing
        copied. The copy holds the node's lock, so no truncate or settlement hands
        that room back under it; room handed back before the lock was taken is asked
        for again.
        """
        while True:
            room = await self.room_for_write(node, off, length)
            async with node.lock:
                if off + room <= node.charged:
                    copied = await trio.to_thread.run_sync(copy, room)
                    if copied:  # nothing copied (the source's end): the size stays
                        self.wrote(node, off + copied)
                    return copied

    async def _reserve(self, node: MediaNode, end: int, *, partial: bool) -> QuotaExceeded | None:
        """``_grow``, and once more after committing pending closes if it fell short:
        their grants may be what holds the room."""
        try:
            refusal = await self._grow(node, end, partial=partial)
            if end <= node.charged or not self._releases.pending:
                return refusal
        except QuotaExceeded:
            if not self._releases.pending:
                raise
        await self.commit()
        return await self._grow(node, end, partial=partial)

    async def _grow(self, node: MediaNode, end: int, *, partial: bool) -> QuotaExceeded | None:
        """Reserve room so that ``node.charged >= end``; if ``partial``, as much as fits,
        and the quota's refusal (which names the full pool) is returned, not raised."""
        async with node.lock:
            if end <= node.charged:
                return None
            if node.deleted:
                raise QuotaExceeded(f"media {node.media_id} was removed")
            try:
                reservation = await self._offload(
                    self._v.ledger.reserve,
                    node.media_id,
                    self._holder_id,
                    end - node.charged,
                    partial=partial,
                )
            except QuotaExceeded as refusal:
                if partial:
                    return refusal
                raise
            node.charged += reservation.added
            node.held = True
            return None

    # settling ---------------------------------------------------------------------
    async def settle(self, node: MediaNode, *, release_grant: bool) -> None:
        """Record the node's size (and mtime) in the catalog; optionally return the grant.

        The grant row itself stays while a writer has the media open (the lease
        volume moves respect). Shrinking ``charged`` happens before the await, so
        a write racing the settlement has to reserve again instead of writing
        into room that is being handed back.
        """
        async with node.lock:
            if node.deleted:
                return
            size = node.size
            keep = 0 if release_grant else node.charged - size
            hold = node.writers > 0
            unchanged = not node.dirty and size == node.settled and keep == node.granted
            if unchanged and hold == node.held:
                return
            node.charged = size + keep
            node.dirty = False
            with self._changes.changing(node.media_id):
                await self._offload(
                    self._v.ledger.settle,
                    node.media_id,
                    self._holder_id,
                    size,
                    keep,
                    hold=hold,
                    mtime_ns=node.mtime_ns,
                )
                node.settled = size
                node.held = hold or keep > 0

    async def settle_first(self, node: MediaNode) -> None:
        """Commit ``node``'s pending close (or wait for the batch carrying it) before it
        is resized or given new times: the change then starts from what the catalog
        records, and no batch commits older state over it."""
        await self._releases.settle_first(node)

    async def settle_before_move(self, node: MediaNode) -> None:
        """A move charges the catalog's size plus grants, so bring the size up to date."""
        if node.dirty or node.size != node.settled:
            await self.settle(node, release_grant=node.open_count == 0)

    async def settle_all(self, nodes: Iterable[MediaNode]) -> None:
        """On unmount: commit the batches, settle every open media and hand back every
        grant and lease; media unlinked while open go now, as at their last close."""
        nodes = list(nodes)
        for node in nodes:
            if node.unlinked and not node.deleted:
                node.deleted = True
                self._releases.unlink(node)
        await self.commit()
        for node in nodes:
            node.writers = 0
            if not node.deleted:
                await self.settle(node, release_grant=True)

    # the catalog's view of media this mount does not have open -----------------
    def adopt(self, node: MediaNode, view: MediaView) -> None:
        """Take the catalog's size for a media nobody here has open (another host
        changed it); an open one keeps its local state."""
        if node.open_count == 0:
            node.size = node.settled = node.charged = view.size

    # batches ----------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """Closes or unlinks wait for their batch, or a batch is being committed."""
        return self._releases.pending

    async def commit(self) -> None:
        """Commit every pending close, unlink and create now."""
        await self._releases.commit()

    async def commit_unlinks(self) -> None:
        """Commit pending unlinks now (and wait for a batch of them under way)."""
        await self._releases.commit_unlinks()

    async def run_batches(self) -> None:
        """Commit each batch ``BATCH_S`` after its first change, for as long as the mount runs."""
        await self._releases.run()

    # the lease --------------------------------------------------------------------
    def _require_lease(self) -> None:
        """Growth into grants needs a lease renewed in time: cut off from the catalog
        longer, this mount's grants may be another host's room by now."""
        if time.monotonic() > self._lease_valid_until:
            raise LeaseLost("this mount's lease may have lapsed: its grants may be reclaimed")

    def _undo_if_lapsed(self, node: MediaNode, size: int) -> None:
        """Cut a file that just grew back to ``size`` and fail (LeaseLost, EIO) if the
        lease lapsed before the growth was done.

        The check before a write (``_require_lease``) cannot see the process
        stall between it and the write, or in the write; a reclaim may then have
        measured the file and handed the rest of the grant to another host. Checked
        after the growth too, a growth that is kept, and acknowledged, ended while
        ``LEASE_TRUST`` of the lease was left, so before any reclaim could fence
        this holder and measure the file (``Ledger.fence``). Called with no await
        since the growth.
        """
        if time.monotonic() > self._lease_valid_until:
            os.truncate(node.open_path, size)
            raise LeaseLost("this mount's lease lapsed during the write: it was undone")

    async def renew_lease(self) -> None:
        """Renew this mount's lease, or register again once it has expired.

        An expired lease cannot be renewed (the process stalled or was cut off
        longer than it): another process may be reclaiming this mount's grants
        by now. Then the old holder is fenced and reclaimed (here, if no other
        process has done it yet), a new one registered, and every node this
        mount has write state for starts afresh from its file's size on disk,
        which the catalog now records too; never from what the mount remembers.
        The batch lock and those nodes' locks are held meanwhile, so no settle
        or grant of the old holder's state slips in between.
        """
        lease = await self._offload(self._v.ledger.heartbeat, self._holder_id)
        if lease is not None:
            self._lease_valid_until = lease.trusted_until(LEASE_TRUST)
            return
        log.error("this mount's lease expired; its grants are reclaimed and it registers again")
        async with self._releases.lock, AsyncExitStack() as locks:
            nodes = [n for n in self._inodes.by_media.values() if n.unsettled or n.writers]
            for node in nodes:
                await locks.enter_async_context(node.lock)
            rejoined = await self._offload(
                self._v.register_writer_again, self._holder_id, [n.media_id for n in nodes]
            )
            self._holder_id = rejoined.holder_id
            for gone in self._inodes.by_ino.values():
                if isinstance(gone, MediaNode) and gone.unlinked:
                    gone.deleted = True  # the old holder's reclaim removed its row
            lease = self._v.ledger.lease_of(rejoined.holder_id)
            self._lease_valid_until = lease.trusted_until(LEASE_TRUST)
            for node in nodes:
                size = rejoined.sizes.get(node.media_id)
                if size is not None:
                    node.size = node.settled = node.charged = size
                    node.held = False
                    node.dirty = node.writers > 0


# Closes and unlinks -----------------------------------------------------------------
#
# Closing a file (recording its size, returning the rest of its grant, dropping its
# lease) and unlinking one only ever lower usage, so no quota depends on them landing
# at once. The mount answers them from memory and commits them together, BATCH_S after
# the first: one transaction for many small files instead of one each (measured: 17 us
# a file in a batch, 0.35-0.5 ms alone). What waits for them, so nothing can tell:
#
# - every other catalog call of a kernel request commits pending unlinks first
#   (Grants.call), so a name is free in the catalog before it is used again, and a
#   pool empty before it is removed;
# - a reservation that does not fit commits pending closes and tries again, since
#   their grants may hold the room, so a pool still fills to the byte;
# - user.velocity.* reads, statfs, fsync on a pool, the in-process API and unmount
#   commit everything, and so does resizing a closed file before its batch. Reopening
#   one for writing instead takes its close out of the batch: the lease and grant it
#   would return are still the mount's.
#
# Until the batch commits, other processes see the old size (and the grant still
# charged) or the unlinked media, for at most BATCH_S. After a crash in between,
# reclaim records the size from the backing file, and an unlinked media is still there
# with its bytes (as an unsynced unlink on any disk).
#
# Creates are different, and so are renames, chmod/chown/utimes and mkdir (``batched``):
# they are units of the service's batch transaction (service.batch), whose statements
# ran under the lock, journaled, before the request was answered. This only sees that
# the batch commits BATCH_S after its first unit at the latest; any other catalog call
# commits it sooner.

BATCH_S = 0.05
# Media per transaction at most: a backlog (a long catalog outage during an rm -rf)
# must stay within what one statement may bind (psycopg: 65,535 parameters; SQLite
# as built upstream: 32,766).
BATCH_MAX = 2000


class Releases:
    """Closed and unlinked media waiting for their batch; part of ``Grants``."""

    def __init__(
        self,
        velocity: Velocity,
        offload: Offload,
        changes: LocalChanges,
        holder_id: Callable[[], str],
    ) -> None:
        self._v = velocity
        self._offload = offload
        self._changes = changes
        self._holder_id = holder_id
        self._closed: dict[str, MediaNode] = {}
        self._unlinked: dict[str, MediaNode] = {}
        self._committing: set[str] = set()  # closes in the batch being committed
        self._wanted = trio.Event()
        self._lock = trio.Lock()
        self._unlinking = False  # a batch of unlinks is being committed

    @property
    def pending(self) -> bool:
        return bool(self._closed or self._unlinked) or self._lock.locked()

    @property
    def lock(self) -> trio.Lock:
        """The batch lock: held while a batch commits (and while the mount registers
        again); taken before any node lock."""
        return self._lock

    def close(self, node: MediaNode) -> None:
        """The last writer closed ``node``: settle it and drop its lease with the batch.

        Until then the follower must not take the catalog's older size for it.
        """
        self._changes.in_flight(node.media_id)
        self._closed[node.media_id] = node
        self._wanted.set()

    def unlink(self, node: MediaNode) -> None:
        self._changes.in_flight(node.media_id)
        self._unlinked[node.media_id] = node
        self._wanted.set()

    def wake(self) -> None:
        """A create may be waiting in the service's batch: commit it with the next batch."""
        self._wanted.set()

    async def run(self) -> None:
        """Commit each batch ``BATCH_S`` after its first change; failures wait for the next."""
        while True:
            await self._wanted.wait()
            await trio.sleep(BATCH_S)
            self._wanted = trio.Event()
            try:
                await self.commit()
            except Exception as exc:
                log.warning("could not commit closes and unlinks (%s); retrying", exc)
                self._wanted.set()
                await trio.sleep(1.0)

    async def commit(self) -> None:
        """Unlinks first, then closes, then creates (if neither of the others took them
        along)."""
        async with self._lock:
            await self._commit_unlinks()
            await self._commit_closes()
            if self._v.media.batch_pending:
                await self._offload(self._v.media.commit_batch)

    async def settle_first(self, node: MediaNode) -> None:
        if node.media_id in self._closed or node.media_id in self._committing:
            await self.commit()

    def keep_in_flight(self, *object_ids: str | None) -> None:
        """Mark in flight again those of ``object_ids`` whose close is still to commit."""
        for object_id in object_ids:
            if object_id in self._closed or object_id in self._committing:
                self._changes.in_flight(object_id)

    async def carried(self, node: MediaNode) -> None:
        """Wait for the batch under way if it carries ``node``'s close."""
        if node.media_id in self._committing:
            async with self._lock:
                pass

    async def reopen(self, node: MediaNode) -> None:
        """Drop ``node``'s close if it is still waiting (its next close settles it),
        else wait for the batch carrying it."""
        if self._closed.pop(node.media_id, None) is not None:
            self._changes.done(node.media_id)  # ours again, not in flight
            return
        await self.settle_first(node)

    async def commit_unlinks(self) -> None:
        """Wait for a batch of unlinks on its way too (not for one of closes: those
        free no name)."""
        if self._unlinked or self._unlinking:
            async with self._lock:
                await self._commit_unlinks()

    async def _commit_unlinks(self) -> None:
        """Media still open here are unlinked but kept (``MediaService.unlink_open``)
        until their last close, which unlinks them again, for good."""
        while self._unlinked:
            ids = list(itertools.islice(self._unlinked, BATCH_MAX))
            nodes = {media_id: self._unlinked.pop(media_id) for media_id in ids}
            kept = [media_id for media_id, node in nodes.items() if not node.deleted]
            gone = [media_id for media_id, node in nodes.items() if node.deleted]
            self._unlinking = True
            try:
                if kept:
                    await self._offload(self._v.media.unlink_open, kept, self._holder_id())
                if gone:
                    await self._offload(self._v.media.remove_many, gone)
            except BaseException:
                self._unlinked.update(nodes)
                raise
            finally:
                self._unlinking = False
            self._changes.done(*ids)

    async def _commit_closes(self) -> None:
        while self._closed:
            ids = list(itertools.islice(self._closed, BATCH_MAX))
            nodes = [self._closed.pop(media_id) for media_id in ids]
            self._committing = set(ids)
            try:
                await self._settle(nodes)
            finally:
                self._committing = set()

    async def _settle(self, nodes: list[MediaNode]) -> None:
        async with AsyncExitStack() as locks:
            for node in nodes:
                await locks.enter_async_context(node.lock)
            closed = [n for n in nodes if n.writers == 0 and not n.deleted and n.unsettled]
            gone = [n.media_id for n in nodes if n not in closed and n.media_id not in self._closed]
            self._changes.done(*gone)  # reopened or gone: not ours now
            if not closed:
                return
            for node in closed:
                # Before the await: a writer reopening it must reserve again.
                node.charged = node.size
            ids = [n.media_id for n in closed]
            try:
                with self._changes.changing(*ids):
                    # In the create batch, when one is open: on the loop, no commit.
                    await self._offload.in_batch(
                        self._v.media.open_batch,
                        self._v.ledger.settle_many,
                        self._holder_id(),
                        [Settlement(n.media_id, n.size, mtime_ns=n.mtime_ns) for n in closed],
                    )
            except BaseException:
                for node in closed:
                    self._closed[node.media_id] = node
                self._changes.in_flight(*ids)
                raise
            for node in closed:
                node.settled = node.size
                node.held = False
                node.dirty = False


def _require_volume_holds(node: MediaNode, size: int) -> None:
    """EFBIG, as the kernel's filesystems answer, for a size past the largest file the
    media's volume holds; past a quota is ENOSPC, checked after this."""
    if size > node.size and not volume_holds(node.open_path, size):
        raise OSError(errno.EFBIG, f"the volume of media {node.media_id} holds no file that large")
