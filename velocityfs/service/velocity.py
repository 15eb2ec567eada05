"""The service facade: one object per process that adapters call into."""

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import Connection

from velocityfs.catalog.database import Database
from velocityfs.catalog.schema import revisions, upgrade
from velocityfs.errors import VelocityError
from velocityfs.service.accounts import DEFAULT_AUTHKEY_LIFETIME_S, AccountService
from velocityfs.service.chains import Chains
from velocityfs.service.changes import ChangeFeed
from velocityfs.service.ledger import Ledger
from velocityfs.service.media import MediaService, XAttrs
from velocityfs.service.policy import DEFAULT_POLICY, Decision, Subject, VolumePolicy
from velocityfs.service.pools import PoolService
from velocityfs.service.views import Creator, PoolView
from velocityfs.service.volumes import Marking, VolumeService, volume_names
from velocityfs.store.backing import BackingStore
from velocityfs.store.journal import journals
from velocityfs.store.spares import spare_dirs

log = logging.getLogger(__name__)


class NotInitialised(VelocityError):
    """The catalog has no schema yet: ``velocityfs init`` was not run."""


@dataclass(frozen=True)
class Rejoined:
    """A writer registered again: its new holder id, and the sizes on disk of its media."""

    holder_id: str
    sizes: dict[str, int]


@dataclass(frozen=True)
class TreeRow:
    """One line of the pool tree: a pool, its depth and path."""

    depth: int
    path: str
    pool: PoolView


class Velocity:
    """The catalog, the backing store and every rule on them."""

    def __init__(
        self,
        catalog_url: str,
        store_top: str | os.PathLike[str],
        *,
        authkey_lifetime_s: int = DEFAULT_AUTHKEY_LIFETIME_S,
        volume_policy: str = DEFAULT_POLICY,
    ) -> None:
        self.db = Database(catalog_url)
        self.backing = BackingStore(store_top)
        self.chains = Chains()
        self.ledger = Ledger(self.db, self.chains)
        self.volumes = VolumeService(self.db, self.backing)
        self.policy = VolumePolicy(volume_policy)
        self.media = MediaService(
            self.db,
            self.backing,
            self.chains,
            placement=self.place,
            volume_offline=self.volumes.presence.offline_reason,
        )
        self.pools = PoolService(
            self.db,
            self.chains,
            on_media_removed=self.media.delete_orphan_files,
            batch=self.media.batch,
        )
        self.accounts = AccountService(self.db, self.chains, authkey_lifetime_s)
        self.xattrs = XAttrs(self.db)
        self.changes = ChangeFeed(self.db, self.media)

    def init(self, *, lease_s: float | None = None) -> list[Marking]:
        """Create or upgrade the catalog and the store layout; harmless to repeat.
        With ``lease_s``, set the catalog's lease length too.

        Also gives the store its marker and marks each volume that has none and
        whose disk holds all its media (a store made before volume markers):
        what it did about each such volume is returned.
        """
        self.backing.ensure_layout()
        upgrade(self.db.engine)
        self.accounts.ensure_root_group()
        if lease_s is not None:
            self.ledger.set_lease(lease_s)
        return self.volumes.mark_unmarked()

    def require_initialised(self) -> None:
        """Refuse to work on a catalog that is missing or older than this code."""
        current, head = revisions(self.db.engine)
        if current is None:
            raise NotInitialised(
                f"catalog {self.db.engine.url!r} is not initialised: run 'velocityfs init'"
            )
        if current != head:
            raise NotInitialised(
                f"catalog {self.db.engine.url!r} is at schema {current}, this velocityfs needs "
                f"{head}: run 'velocityfs init' to upgrade it"
            )
        if not (self.backing.top / "media").is_dir():
            raise NotInitialised(f"store {self.backing.top} has no media/: run 'velocityfs init'")
        if self.volumes.presence.store_id() is None:
            raise NotInitialised(
                f"store {self.backing.top} has no marker (made before volume markers, or its "
                "disk is not mounted): run 'velocityfs init'"
            )

    def tree(self) -> list[TreeRow]:
        """Every pool, depth-first by name, with its path."""
        pools = self.pools.all()
        children: dict[str | None, list[PoolView]] = {}
        for pool in pools:
            children.setdefault(pool.parent_id, []).append(pool)
        rows: list[TreeRow] = []

        def walk(parent: str | None, depth: int, prefix: str) -> None:
            for pool in sorted(children.get(parent, []), key=lambda p: p.name):
                path = f"{prefix}{pool.name}"
                rows.append(TreeRow(depth, path, pool))
                walk(pool.id, depth + 1, path + "/")

        walk(None, 0, "")
        return rows

    def place(self, conn: Connection, pool_path: str, name: str, creator: Creator | None) -> str:
        """The volume policy's choice for new media, asked inside the create's unit of
        work: the volumes are read on its connection (only for a non-DEFAULT rule)."""
        return self._decide(pool_path, name, creator, lambda: volume_names(conn)).volume

    def explain_placement(self, pool_path: str, name: str, creator: Creator | None) -> Decision:
        return self._decide(pool_path, name, creator, self.volumes.names)

    def _decide(
        self,
        pool_path: str,
        name: str,
        creator: Creator | None,
        volumes: Callable[[], Iterable[str]],
    ) -> Decision:
        creator = creator or Creator()
        return self.policy.decide(
            Subject(pool_path, name, creator.user, creator.groups),
            volumes,
            self.volumes.presence.offline_reason,
        )

    def pool_by_ref(self, ref: str) -> PoolView:
        """A pool by id, or by path of names (``tenants/acme``)."""
        try:
            return self.pools.get(ref)
        except VelocityError:
            return self.pools.resolve(ref)

    def register_writer(self) -> str:
        """Register this process as a grant holder whose creates are batched, journaled
        and take spare files (``MediaService.start_creates``); returns its holder id."""
        holder_id = self.ledger.register_holder()
        self.media.start_creates(holder_id)
        return holder_id

    def register_writer_again(self, old_holder_id: str, media_ids: Iterable[str]) -> Rejoined:
        """A writer whose lease expired (it stalled, or was cut off) starts afresh.

        Its old holder is fenced and reclaimed here, if no other process has
        done so yet, so every grant it held is settled to the size of the file
        on disk; then it registers anew. ``media_ids`` are the media it has
        state for: their sizes on disk are recorded (charged even past a quota:
        they are there, and their writes were acknowledged) and returned, for
        the mount to take instead of what it remembers.
        """
        if self.ledger.fence(old_holder_id):
            self._reclaim(old_holder_id)
        holder_id = self.register_writer()
        sizes = self._sizes_on_disk(media_ids)
        self.ledger.record_sizes(sizes)
        return Rejoined(holder_id, sizes)

    def reclaim_dead_holders(self) -> int:
        """Return the grants of dead processes, keeping the bytes they wrote.

        Each dead holder is fenced first, in the transaction that judges it dead
        (``Ledger.fence``): from then on it can take, grow or settle no grant
        and renew no lease, so its files no longer change by its hand. Then
        every media it held a grant on is settled to its backing file's size,
        measured after the fence (``Ledger.reclaim``); no file is cut. Creates
        it journaled but never committed come back first
        (``MediaService.recover_journal``), from the journal of any holder that
        is dead or gone from the catalog; its spare files go (``store.spares``).
        This process's own holders are never among the dead.
        """
        # The files first: a holder is registered before it makes its journal and
        # spares, so one whose files are seen here is in the table read next.
        journaled = journals(self.backing.top)
        spares = spare_dirs(self.backing.top)
        dead = self.ledger.dead_holders()
        live = set(self.ledger.holder_ids()).difference(dead)
        for holder_id in journaled:
            if holder_id not in live:
                recovered = self.media.recover_journal(holder_id)
                if recovered:
                    log.warning(
                        "recovered %d create(s) that process %s journaled but never committed",
                        recovered,
                        holder_id,
                    )
        for directory in spares:
            if directory.name not in live:
                self.backing.discard_spares(directory.name)
        reclaimed = 0
        for holder_id in dead:
            if self.ledger.fence(holder_id):
                reclaimed += self._reclaim(holder_id)
        return reclaimed

    def _reclaim(self, holder_id: str) -> int:
        """Remove the media a fenced holder had unlinked while open (its last close
        will never come), then settle its grants to the sizes of its files on disk.
        The removal first: the holder's row, which marks them, goes last."""
        self.media.remove_unlinked([holder_id])
        media_ids = [mid for _gid, mid in self.ledger.stale_grants([holder_id]) if mid]
        reclaimed = self.ledger.reclaim(holder_id, self._sizes_on_disk(media_ids))
        self.backing.discard_uploads(holder_id)
        return reclaimed

    def _sizes_on_disk(self, media_ids: Iterable[str]) -> dict[str, int]:
        """The apparent sizes of media's backing files (media or files gone: left out)."""
        volumes = self.media.volumes(media_ids)
        sizes = {mid: self.backing.size(volume, mid) for mid, volume in volumes.items()}
        return {mid: size for mid, size in sizes.items() if size is not None}

    def close(self) -> None:
        self.db.dispose()
