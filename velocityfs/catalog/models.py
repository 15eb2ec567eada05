"""SQLAlchemy models of the catalog.

Sizes are bytes and times are nanoseconds since the epoch, both as 64-bit
integers, so that the filesystem can hand them to the kernel unchanged.
IDs are UUID strings, as in Velocity.
"""

import time
import uuid
from typing import TYPE_CHECKING, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DEFAULT_VOLUME = "DEFAULT"


def new_id() -> str:
    """A fresh UUID string for a pool, media, user, group, grant or authkey."""
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    """Declarative base of every catalog table."""

    if TYPE_CHECKING:
        # Every model here is declared with ``__tablename__``, so SQLAlchemy maps it
        # to a ``Table`` (its stubs say ``FromClause``, which may also be a join or
        # subquery): services use ``Model.__table__`` with ``insert``, ``update`` and
        # ``delete``, which need a table.
        __table__: ClassVar[Table]


class Volume(Base):
    """A backing volume: DEFAULT is the store's top, NAME lives at TOP/vol/NAME."""

    __tablename__ = "volumes"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    created_ns: Mapped[int] = mapped_column(BigInteger)


class Pool(Base):
    """A storage pool; ``used_bytes`` is the maintained usage of its subtree.

    ``quota_bytes`` is NULL for a subpool that inherits its parent's limit.
    ``used_bytes`` counts settled media sizes plus outstanding grants in the
    subtree, and is kept current by the ledger so that a quota check costs
    O(depth) instead of a scan.
    """

    __tablename__ = "pools"
    __table_args__ = (
        UniqueConstraint("parent_id", "name", name="uq_pool_parent_name"),
        Index(
            "uq_root_pool_name",
            "name",
            unique=True,
            sqlite_where=text("parent_id IS NULL"),
            postgresql_where=text("parent_id IS NULL"),
        ),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    parent_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("pools.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255))
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger)
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    mode: Mapped[int] = mapped_column(Integer, default=0o755)
    uid: Mapped[int] = mapped_column(Integer, default=0)
    gid: Mapped[int] = mapped_column(Integer, default=0)
    atime_ns: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    ctime_ns: Mapped[int] = mapped_column(BigInteger)
    changed_ns: Mapped[int] = mapped_column(
        BigInteger, default=time.time_ns, onupdate=time.time_ns, index=True
    )


class Media(Base):
    """A disk image or ISO in a pool; its bytes live in a backing file named by id.

    ``unlinked_by`` is set (to a holder id) on media unlinked while that holder
    still has it open, as the kernel's filesystems keep an unlinked open file:
    its name is then ``/`` and its id (a name no user can give, so the old one is
    free at once), no listing shows it, its size and grants stay charged to its
    pool, and it goes with the holder's last close, or with the holder's reclaim.
    """

    __tablename__ = "media"
    # The unique (pool_id, name) index also serves lookups by pool_id alone.
    __table_args__ = (UniqueConstraint("pool_id", "name", name="uq_media_pool_name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    pool_id: Mapped[str] = mapped_column(String(36), ForeignKey("pools.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    volume: Mapped[str] = mapped_column(
        String(255), ForeignKey("volumes.name"), default=DEFAULT_VOLUME
    )
    mode: Mapped[int] = mapped_column(Integer, default=0o644)
    uid: Mapped[int] = mapped_column(Integer, default=0)
    gid: Mapped[int] = mapped_column(Integer, default=0)
    atime_ns: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    ctime_ns: Mapped[int] = mapped_column(BigInteger)
    changed_ns: Mapped[int] = mapped_column(
        BigInteger, default=time.time_ns, onupdate=time.time_ns, index=True
    )
    unlinked_by: Mapped[str | None] = mapped_column(String(36))


class Removal(Base):
    """A tombstone: a pool or media deleted at ``removed_ns``, so other mounts drop it too.

    Rows carry ``changed_ns`` (set on every insert and update) and deletions
    leave a tombstone, so a mount catches up with other hosts by reading only
    what changed since its last look, never the whole catalog.
    """

    __tablename__ = "removals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8))
    object_id: Mapped[str] = mapped_column(String(36))
    removed_ns: Mapped[int] = mapped_column(BigInteger, default=time.time_ns, index=True)


class XAttr(Base):
    """A user extended attribute of a pool or media (``cp -a``/``rsync -X`` copy them)."""

    __tablename__ = "xattrs"
    owner_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)


class CatalogSettings(Base):
    """What every process on the catalog must agree on: one row (id 1).

    ``lease_ns``: a holder that does not renew its lease this long is dead, and
    its grants are reclaimed. One length for every process, so no two judge a
    holder differently (``velocityfs lease set``).
    """

    __tablename__ = "catalog_settings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    lease_ns: Mapped[int] = mapped_column(BigInteger)


class Holder(Base):
    """A process that may hold grants: a mount daemon or an API server.

    Its lease ends at ``expires_ns`` on the catalog's clock (``Database.now_ns``);
    ``fenced`` is set by whoever reclaims it, in the transaction that finds the
    lease expired: every later grant, settle or renewal of the holder fails.
    """

    __tablename__ = "holders"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_ns: Mapped[int] = mapped_column(BigInteger)
    heartbeat_ns: Mapped[int] = mapped_column(BigInteger)
    expires_ns: Mapped[int] = mapped_column(BigInteger, server_default="0")
    fenced: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Grant(Base):
    """Room reserved in a pool (and charged to every ancestor) but not yet written."""

    __tablename__ = "grants"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # Only media_id is indexed: grants live while a file is open, so the rare lookups
    # by pool (fsck) or holder (reclaim) scan a small table, and every index is one
    # more page written by each create and close (migration 0003).
    pool_id: Mapped[str] = mapped_column(String(36), ForeignKey("pools.id", ondelete="CASCADE"))
    media_id: Mapped[str | None] = mapped_column(String(36), index=True)
    holder_id: Mapped[str] = mapped_column(String(36))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_ns: Mapped[int] = mapped_column(BigInteger)


class User(Base):
    """An account that can authenticate to the API."""

    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)


class Group(Base):
    """A set of users that pools are shared with."""

    __tablename__ = "groups"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)


class Membership(Base):
    """A user belongs to a group."""

    __tablename__ = "memberships"
    user_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    group_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )


class Share(Base):
    """A pool shared with a group, with a set of permissions for its whole subtree."""

    __tablename__ = "shares"
    pool_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("pools.id", ondelete="CASCADE"), primary_key=True
    )
    group_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )
    permissions: Mapped[str] = mapped_column(Text)


class AuthKey(Base):
    """An API session key; only its SHA-256 is stored."""

    __tablename__ = "authkeys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_ns: Mapped[int] = mapped_column(BigInteger)
