"""Users, groups, shares, authkeys and the permission rule.

A pool shared with a group grants that group a set of permissions on the
pool and its whole subtree; a user acts through any group it belongs to;
members of the root group may do everything.
"""

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from velocityfs.catalog.database import Database
from velocityfs.catalog.models import AuthKey, Group, Membership, Pool, Share, User
from velocityfs.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidName,
    InvalidValue,
    NotFound,
)
from velocityfs.service.chains import Chains, Link, chain_path, room
from velocityfs.service.names import check_name
from velocityfs.service.pools import pool_view
from velocityfs.service.views import ListedPool

ROOT_GROUP = "root"

PERMISSIONS = (
    "velocity.pool.view",
    "velocity.pool.create",
    "velocity.pool.remove",
    "velocity.pool.media.view",
    "velocity.pool.media.create",
    "velocity.pool.media.remove",
    "velocity.pool.media.read",
    "velocity.pool.media.write",
)

DEFAULT_AUTHKEY_LIFETIME_S = 3600


def _key_hash(authkey: str) -> str:
    """Authkeys are 256-bit random tokens, so a plain SHA-256 is enough to store them.

    Any string hashes (a lone surrogate from a JSON body too): one that is no
    authkey then simply matches none.
    """
    return hashlib.sha256(authkey.encode("utf-8", "surrogatepass")).hexdigest()


def _could_be_name(name: str) -> bool:
    """Whether a user could have this name (users are made under the naming rule); the
    catalog is not asked for others (PostgreSQL refuses a NUL in a string)."""
    try:
        check_name(name)
    except InvalidName:
        return False
    return True


def unknown_user_hash(hasher: PasswordHasher) -> str:
    """An argon2 hash with ``hasher``'s parameters that no password matches.

    A login for a user that does not exist verifies against it, so it costs
    what a wrong password costs: the time of an answer does not tell whether a
    user exists. Made without hashing (a random salt and digest in argon2's
    encoding), as verifying costs the parameters written in it.
    """

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii").rstrip("=")

    return (
        f"$argon2{hasher.type.name.lower()}$v=19"
        f"$m={hasher.memory_cost},t={hasher.time_cost},p={hasher.parallelism}"
        f"${b64(secrets.token_bytes(hasher.salt_len))}${b64(secrets.token_bytes(hasher.hash_len))}"
    )


def check_permissions(permissions: list[str]) -> list[str]:
    unknown = [p for p in permissions if p not in PERMISSIONS]
    if unknown:
        raise InvalidValue(f"unknown permission(s): {', '.join(unknown)}")
    return sorted(set(permissions))


@dataclass(frozen=True)
class IssuedKey:
    """An authkey as handed to the client: the only time its plain text exists."""

    authkey: str
    user_id: str
    expires_ns: int


@dataclass(frozen=True)
class Caller:
    """An authenticated API user and the groups it acts through."""

    user_id: str
    name: str
    group_ids: frozenset[str]
    group_names: frozenset[str]

    @property
    def is_root(self) -> bool:
        return ROOT_GROUP in self.group_names


@dataclass(frozen=True)
class ShareView:
    pool_id: str
    group_id: str
    permissions: list[str]


def caller_of(s: Session, user_id: str) -> Caller:
    """A user and its groups, as permission checks see them."""
    user = s.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    groups = s.execute(
        select(Group.id, Group.name)
        .join(Membership, Membership.group_id == Group.id)
        .where(Membership.user_id == user_id)
    ).all()
    return Caller(
        user_id=user.id,
        name=user.name,
        group_ids=frozenset(gid for gid, _name in groups),
        group_names=frozenset(name for _gid, name in groups),
    )


class AccountService:
    """Accounts and access; each public method is one transaction."""

    def __init__(
        self,
        database: Database,
        chains: Chains,
        authkey_lifetime_s: int = DEFAULT_AUTHKEY_LIFETIME_S,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.db = database
        self.chains = chains
        self.authkey_lifetime_s = authkey_lifetime_s
        self.hasher = hasher or PasswordHasher()
        self._unknown_user_hash = unknown_user_hash(self.hasher)

    # users -----------------------------------------------------------------
    def add_user(self, name: str, password: str) -> str:
        check_name(name, "user name")
        if not password:
            raise InvalidValue("password must not be empty")
        with self.db.transaction() as s:
            if s.execute(select(User.id).where(User.name == name)).first():
                raise Conflict(f"user '{name}' exists")
            user = User(name=name, password_hash=self.hasher.hash(password))
            s.add(user)
            s.flush()
            return user.id

    def set_password(self, name: str, password: str) -> None:
        if not password:
            raise InvalidValue("password must not be empty")
        with self.db.transaction() as s:
            user = self._user(s, name)
            user.password_hash = self.hasher.hash(password)
            s.execute(delete(AuthKey).where(AuthKey.user_id == user.id))

    def remove_user(self, name: str) -> None:
        with self.db.transaction() as s:
            s.delete(self._user(s, name))

    def users(self) -> list[tuple[str, str]]:
        with self.db.transaction() as s:
            return [(u.id, u.name) for u in s.execute(select(User).order_by(User.name)).scalars()]

    @staticmethod
    def _user(s: Session, name: str) -> User:
        user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if user is None:
            raise NotFound(f"no user '{name}'")
        return user

    # groups ----------------------------------------------------------------
    def add_group(self, name: str) -> str:
        check_name(name, "group name")
        with self.db.transaction() as s:
            if s.execute(select(Group.id).where(Group.name == name)).first():
                raise Conflict(f"group '{name}' exists")
            group = Group(name=name)
            s.add(group)
            s.flush()
            return group.id

    def ensure_root_group(self) -> str:
        with self.db.transaction() as s:
            gid = s.execute(select(Group.id).where(Group.name == ROOT_GROUP)).scalar()
            if gid is not None:
                return gid
            group = Group(name=ROOT_GROUP)
            s.add(group)
            s.flush()
            return group.id

    def remove_group(self, name: str) -> None:
        if name == ROOT_GROUP:
            raise InvalidValue("the root group cannot be removed")
        with self.db.transaction() as s:
            s.delete(self._group(s, name))

    def groups(self) -> list[tuple[str, str]]:
        with self.db.transaction() as s:
            rows = s.execute(select(Group).order_by(Group.name)).scalars()
            return [(g.id, g.name) for g in rows]

    def group_id(self, name_or_id: str) -> str:
        with self.db.transaction() as s:
            group = s.get(Group, name_or_id)
            return group.id if group is not None else self._group(s, name_or_id).id

    @staticmethod
    def _group(s: Session, name: str) -> Group:
        group = s.execute(select(Group).where(Group.name == name)).scalar_one_or_none()
        if group is None:
            raise NotFound(f"no group '{name}'")
        return group

    # memberships -----------------------------------------------------------
    def add_member(self, group: str, user: str) -> None:
        with self.db.transaction() as s:
            g, u = self._group(s, group), self._user(s, user)
            if s.get(Membership, (u.id, g.id)) is not None:
                raise Conflict(f"user '{user}' is already in group '{group}'")
            s.add(Membership(user_id=u.id, group_id=g.id))

    def remove_member(self, group: str, user: str) -> None:
        with self.db.transaction() as s:
            g, u = self._group(s, group), self._user(s, user)
            row = s.get(Membership, (u.id, g.id))
            if row is None:
                raise NotFound(f"user '{user}' is not in group '{group}'")
            s.delete(row)

    def members(self, group: str) -> list[str]:
        with self.db.transaction() as s:
            g = self._group(s, group)
            rows = s.execute(
                select(User.name)
                .join(Membership, Membership.user_id == User.id)
                .where(Membership.group_id == g.id)
                .order_by(User.name)
            )
            return list(rows.scalars())

    # shares ----------------------------------------------------------------
    def share(self, pool_id: str, group: str, permissions: list[str]) -> ShareView:
        """Share a pool (and its subtree) with a group; replaces an earlier share."""
        perms = check_permissions(permissions)
        with self.db.transaction() as s:
            if s.get(Pool, pool_id) is None:
                raise NotFound(f"no pool {pool_id}")
            g = self._group(s, group)
            row = s.get(Share, (pool_id, g.id))
            if not perms:
                if row is not None:
                    s.delete(row)
                return ShareView(pool_id, g.id, [])
            if row is None:
                s.add(Share(pool_id=pool_id, group_id=g.id, permissions=",".join(perms)))
            else:
                row.permissions = ",".join(perms)
            return ShareView(pool_id, g.id, perms)

    def group_pools(self, group_ref: str) -> tuple[str, list[ListedPool]]:
        """A group's id (``group_ref`` is its id or name) and every pool its shares reach:
        the shared pools and all their subpools, as shares are inherited, root first.
        One transaction that reads the pools table once, for ``GET /p``."""
        with self.db.transaction() as s:
            group = (
                s.get(Group, group_ref)
                or s.execute(select(Group).where(Group.name == group_ref)).scalar_one_or_none()
            )
            if group is None:
                raise NotFound(f"no group {group_ref}")
            shares = {
                share.pool_id: set(share.permissions.split(","))
                for share in s.execute(select(Share).where(Share.group_id == group.id)).scalars()
            }
            pools = {pool.id: pool for pool in s.execute(select(Pool)).scalars()}
        listed = []
        for pool in pools.values():
            chain = [pool]  # the pool, then its ancestors
            while chain[-1].parent_id is not None:
                chain.append(pools[chain[-1].parent_id])
            permissions = set().union(*(shares.get(p.id, set()) for p in chain))
            if not permissions:
                continue
            links = [Link(p.id, p.parent_id, p.name, p.quota_bytes, p.used_bytes) for p in chain]
            links.reverse()
            quota = next((p.quota_bytes for p in chain if p.quota_bytes is not None), 0)
            listed.append(
                ListedPool(
                    pool=pool_view(pool),
                    path=chain_path(links),
                    quota_bytes=quota,
                    avail_bytes=room(links),
                    permissions=sorted(permissions),
                )
            )
        return group.id, sorted(listed, key=lambda p: p.path.split("/"))

    def shares_of_pool(self, pool_id: str) -> list[ShareView]:
        with self.db.transaction() as s:
            rows = s.execute(select(Share).where(Share.pool_id == pool_id)).scalars()
            return [ShareView(r.pool_id, r.group_id, r.permissions.split(",")) for r in rows]

    # access ----------------------------------------------------------------
    def identify(self, authkey: str) -> Caller:
        """Who is behind a live authkey, with all their groups: one transaction."""
        with self.db.transaction() as s:
            return caller_of(s, self._live_key(s, authkey).user_id)

    def caller_permissions(self, caller: Caller, pool_id: str) -> set[str]:
        """What a caller may do on a pool: shares on it or any ancestor (root: all)."""
        with self.db.transaction() as s:
            if s.get(Pool, pool_id) is None:
                raise NotFound(f"no pool {pool_id}")
            if caller.is_root:
                return set(PERMISSIONS)
            if not caller.group_ids:
                return set()
            rows = s.execute(
                select(Share.permissions).where(
                    Share.pool_id.in_(self.chains.ids(s.connection(), pool_id)),
                    Share.group_id.in_(caller.group_ids),
                )
            ).scalars()
            return {p for row in rows for p in row.split(",")}

    def group_ids_of(self, user_id: str) -> set[str]:
        with self.db.transaction() as s:
            rows = s.execute(select(Membership.group_id).where(Membership.user_id == user_id))
            return set(rows.scalars())

    def permissions_on(self, user_id: str, pool_id: str) -> set[str]:
        """What a user may do on a pool (the CLI's and tests' view of the rule)."""
        with self.db.transaction() as s:
            caller = caller_of(s, user_id)
        return self.caller_permissions(caller, pool_id)

    # authkeys --------------------------------------------------------------
    def login(self, name: str, password: str) -> IssuedKey:
        """Check a password and issue an authkey; any failure reads the same.

        Three steps, which the API runs apart (the verification on a thread of its
        own, so that logins never hold up catalog calls): ``password_hash`` reads
        the user, ``check_password`` verifies without the catalog, ``issue``
        makes the key. An unknown user costs one argon2 verification too (against
        ``unknown_user_hash``), as a wrong password does.
        """
        user_id, stored = self.password_hash(name)
        return self.issue(self.check_password(stored, password, user_id), stored)

    def password_hash(self, name: str) -> tuple[str | None, str]:
        """A user's id and password hash, or (None, a hash no password matches) for a
        name no user has: one read, no write lock."""
        if _could_be_name(name):
            with self.db.reading() as s:
                row = s.execute(
                    select(User.id, User.password_hash).where(User.name == name)
                ).one_or_none()
            if row is not None:
                return row.id, row.password_hash
        return None, self._unknown_user_hash

    def check_password(self, stored: str, password: str, user_id: str | None) -> str:
        """``user_id`` if ``password`` matches ``stored``, else AuthenticationFailed; an
        argon2 verification (~0.1 s of CPU) either way, and no catalog."""
        try:
            self.hasher.verify(stored, password)
            if user_id is None:
                raise VerificationError("no such user")
        except (VerificationError, InvalidHashError, UnicodeError) as exc:
            raise AuthenticationFailed("wrong user name or password") from exc
        return user_id

    def issue(self, user_id: str, checked: str) -> IssuedKey:
        """A new authkey for a user whose password (hash ``checked``) was just checked;
        refused if it has changed since, or the user is gone."""
        authkey = secrets.token_urlsafe(32)
        expires = time.time_ns() + self.authkey_lifetime_s * 1_000_000_000
        with self.db.transaction() as s:
            user = s.get(User, user_id)
            if user is None or user.password_hash != checked:
                raise AuthenticationFailed("wrong user name or password")
            s.add(AuthKey(user_id=user.id, key_hash=_key_hash(authkey), expires_ns=expires))
            return IssuedKey(authkey, user.id, expires)

    def _live_key(self, s: Session, authkey: str) -> AuthKey:
        if not authkey:
            raise AuthenticationFailed("an authkey is required")
        row = s.execute(
            select(AuthKey).where(AuthKey.key_hash == _key_hash(authkey))
        ).scalar_one_or_none()
        if row is None or row.expires_ns <= time.time_ns():
            raise AuthenticationFailed("unknown or expired authkey")
        return row

    def authenticate(self, authkey: str) -> str:
        """The user id behind a live authkey."""
        with self.db.transaction() as s:
            return self._live_key(s, authkey).user_id

    def renew(self, authkey: str) -> IssuedKey:
        with self.db.transaction() as s:
            row = self._live_key(s, authkey)
            row.expires_ns = time.time_ns() + self.authkey_lifetime_s * 1_000_000_000
            return IssuedKey(authkey, row.user_id, row.expires_ns)

    def drop(self, authkey: str) -> None:
        with self.db.transaction() as s:
            s.delete(self._live_key(s, authkey))
