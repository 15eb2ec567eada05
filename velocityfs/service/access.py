"""Operations on behalf of an authenticated user: the rules the API enforces.

Every method takes the caller's authkey, resolves it (AuthenticationFailed),
finds its target (NotFound) and checks the permission the pool/media API
names for it (PermissionDenied), then calls the plain services. The HTTP
shim only translates; it holds no permission rule of its own.

What a caller may not see does not exist for it: a pool on whose chain none
of its groups holds any permission, media in such a pool and a group it is
not a member of get exactly the NotFound (same message) of an id that does
not exist, so the API's 404 and 403 never tell whether another tenant's
object exists. PermissionDenied (403) is only for a pool the caller has some
permission on, but not the one asked for.
"""

from __future__ import annotations

import os
import uuid

from velocityfs.errors import Conflict, InvalidName, NotFound, PermissionDenied
from velocityfs.service.accounts import Caller, IssuedKey
from velocityfs.service.names import check_name
from velocityfs.service.velocity import Velocity
from velocityfs.service.views import Creator, ListedPool, MediaView, PoolView
from velocityfs.store.backing import FILE_MODE

VIEW = "velocity.pool.view"
CREATE = "velocity.pool.create"
REMOVE = "velocity.pool.remove"
MEDIA_VIEW = "velocity.pool.media.view"
MEDIA_CREATE = "velocity.pool.media.create"
MEDIA_REMOVE = "velocity.pool.media.remove"
# Pool and media ids are UUIDs in columns of 36 characters.
ID_LENGTH = 36

# Seconds an upload may wait for the next bytes of its body before it is aborted
# (the configuration's ``upload_idle_s``).
DEFAULT_UPLOAD_IDLE_S = 60.0
# A streamed upload's grant runs ahead of the bytes received by at most one step: as
# much again as has arrived, at least UPLOAD_FIRST_STEP, at most UPLOAD_STEP (and near
# a limit never more than a quarter of the room left). One catalog transaction a step.
UPLOAD_FIRST_STEP = 1 << 20
UPLOAD_STEP = 8 << 20


class Access:
    """The pool and media API's operations, each checked against the caller's shares."""

    def __init__(self, velocity: Velocity) -> None:
        self.v = velocity

    # authkeys --------------------------------------------------------------
    def login(self, name: str, password: str) -> IssuedKey:
        """``password_hash``, ``check_password`` and ``issue`` in one call."""
        return self.v.accounts.login(name, password)

    def password_hash(self, name: str) -> tuple[str | None, str]:
        """Login, step 1 (the catalog): the user's id and hash, or a dummy hash."""
        return self.v.accounts.password_hash(name)

    def check_password(self, stored: str, password: str, user_id: str | None) -> str:
        """Login, step 2 (CPU only, the same cost whether the user exists or not)."""
        return self.v.accounts.check_password(stored, password, user_id)

    def issue(self, user_id: str, checked: str) -> IssuedKey:
        """Login, step 3 (the catalog): the authkey."""
        return self.v.accounts.issue(user_id, checked)

    def renew(self, authkey: str) -> IssuedKey:
        return self.v.accounts.renew(authkey)

    def drop(self, authkey: str) -> None:
        self.v.accounts.drop(authkey)

    # checks ----------------------------------------------------------------
    def _require(self, authkey: str, pool_id: str, permission: str) -> Caller:
        """Two transactions: who the caller is, and what it may do on the pool."""
        caller = self.v.accounts.identify(authkey)
        self._check(caller, pool_id, permission, no_pool(pool_id))
        return caller

    def _check(self, caller: Caller, pool_id: str, permission: str, unseen: NotFound) -> None:
        """The rule: ``permission`` through any share on the pool's chain (root: all).

        A pool that does not exist and one on whose chain the caller holds no
        permission at all raise the same ``unseen``; one where it holds some
        permission, but not this one, raises PermissionDenied.
        """
        if not _possible_id(pool_id):
            raise unseen
        try:
            granted = self.v.accounts.caller_permissions(caller, pool_id)
        except NotFound:
            raise unseen from None
        if permission in granted:
            return
        if not granted:
            raise unseen
        raise PermissionDenied(f"{permission} is not granted on pool {pool_id}")

    # pools -----------------------------------------------------------------
    def group_pools(self, authkey: str, group_id: str) -> tuple[str, list[ListedPool]]:
        """The group's id and the pools it may view: those its shares with
        ``velocity.pool.view`` reach, subpools included.

        ``group_id`` may also be the group's name. The caller must belong to
        the group or to the root group; any other group does not exist for it.
        """
        caller = self.v.accounts.identify(authkey)
        try:
            check_name(group_id, "group")  # an id or a name: either passes the naming rule
            gid, pools = self.v.accounts.group_pools(group_id)
        except (NotFound, InvalidName):
            raise no_group(group_id) from None
        if gid not in caller.group_ids and not caller.is_root:
            raise no_group(group_id)
        return gid, [listed for listed in pools if VIEW in listed.permissions]

    def create_pool(
        self, authkey: str, parent_id: str, name: str, quota_bytes: int | None
    ) -> PoolView:
        self._require(authkey, parent_id, CREATE)
        return self.v.pools.create(parent_id, name, quota_bytes)

    def remove_pool(self, authkey: str, pool_id: str) -> None:
        """Remove a pool, its subpools and all their media (the API's DELETE /p)."""
        self._require(authkey, pool_id, REMOVE)
        self.v.pools.remove(pool_id, recursive=True)

    # media -----------------------------------------------------------------
    def list_media(self, authkey: str, pool_id: str) -> list[MediaView]:
        self._require(authkey, pool_id, MEDIA_VIEW)
        return self.v.media.in_pool(pool_id)

    def create_media(self, authkey: str, pool_id: str, name: str, size: int) -> MediaView:
        caller = self._require(authkey, pool_id, MEDIA_CREATE)
        return self.v.media.create(pool_id, name, size=size, creator=_creator(caller))

    def remove_media(self, authkey: str, media_id: str) -> MediaView:
        caller = self.v.accounts.identify(authkey)
        if not _possible_id(media_id):
            raise no_media(media_id)
        try:
            media = self.v.media.get(media_id)
        except NotFound:
            raise no_media(media_id) from None
        self._check(caller, media.pool_id, MEDIA_REMOVE, no_media(media_id))
        self.v.media.remove(media_id)
        return media

    def begin_upload(
        self, authkey: str, pool_id: str, name: str, holder_id: str, length: int | None
    ) -> Upload:
        """Check everything that can be checked before a byte is read.

        A declared length is reserved in full up front, so a body that cannot
        fit is refused before reading it.
        """
        caller = self._require(authkey, pool_id, MEDIA_CREATE)
        check_name(name, "file name")
        if self.v.pools.name_taken(pool_id, name):
            raise Conflict(f"'{name}' already exists in that pool")
        upload = Upload(self.v, pool_id, name, holder_id, _creator(caller))
        if length:
            upload.reserve(length)
        return upload


def no_pool(pool_id: str) -> NotFound:
    """The answer for a pool that does not exist, or that the caller may not see."""
    return NotFound(f"no pool {pool_id}")


def no_media(media_id: str) -> NotFound:
    """The answer for media that does not exist, or that the caller may not see."""
    return NotFound(f"no media {media_id}")


def no_group(group_ref: str) -> NotFound:
    """The answer for a group that does not exist, or that the caller is not in."""
    return NotFound(f"no group {group_ref}")


def _possible_id(object_id: str) -> bool:
    """Whether ``object_id`` can be a catalog id (printable ASCII, 36 characters at
    most): any other string names nothing, and PostgreSQL refuses some (NUL) as keys."""
    return len(object_id) <= ID_LENGTH and object_id.isascii() and object_id.isprintable()


def _creator(caller: Caller) -> Creator:
    """The API user and its groups, as the volume policy sees them."""
    return Creator(user=caller.name, groups=caller.group_names)


class Upload:
    """A media upload in flight: a temporary file and a grant that grows with it."""

    def __init__(
        self,
        velocity: Velocity,
        pool_id: str,
        name: str,
        holder_id: str,
        creator: Creator | None = None,
    ) -> None:
        self.v = velocity
        self.pool_id = pool_id
        self.name = name
        self.holder_id = holder_id
        self.media_id = str(uuid.uuid4())
        self.volume = velocity.media.choose_volume(pool_id, name, creator)
        self.path = velocity.backing.upload_path(self.volume, holder_id, self.media_id)
        self.grant_id: str | None = None
        self.reserved = 0

    def open(self) -> int:
        """Create the temporary file; the caller writes the body into the descriptor."""
        self.v.backing.make_media_dirs(self.volume, self.path.parent)
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)

    def reserve(self, need: int, chunk: int = 0) -> None:
        """Grow the grant by at least ``need`` bytes (ahead by up to ``chunk``), or raise
        QuotaExceeded (the API's 413)."""
        reservation = self.v.ledger.reserve_in_pool(
            self.pool_id, self.holder_id, need, self.grant_id, chunk
        )
        self.grant_id = reservation.grant_id
        self.reserved += reservation.added

    def grow(self, end: int) -> None:
        """Make the grant cover the body's first ``end`` bytes, reserving at most one step
        ahead of them, so an upload never holds much more than it has received; or raise
        QuotaExceeded (the API's 413)."""
        step = min(UPLOAD_STEP, max(UPLOAD_FIRST_STEP, end))
        self.reserve(end - self.reserved, step)

    def commit(self, size: int) -> MediaView:
        assert self.grant_id is not None or size == 0
        if self.grant_id is None:
            self.grant_id = self.v.ledger.reserve_in_pool(self.pool_id, self.holder_id, 0).grant_id
        try:
            return self.v.media.adopt_upload(
                self.grant_id,
                self.pool_id,
                self.media_id,
                self.volume,
                self.name,
                size,
                str(self.path),
            )
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Leave nothing behind: no file, no grant, no media."""
        self.path.unlink(missing_ok=True)
        if self.grant_id is not None:
            self.v.ledger.release(self.grant_id)
            self.grant_id = None
