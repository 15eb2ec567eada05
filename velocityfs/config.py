"""The configuration file, ``/etc/velocityfs/velocityfs.toml`` by default.

Every key is optional; command-line flags override the file, the file
overrides the defaults below. ``velocityfs config check`` reports every
problem, one line each, instead of stopping at the first.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from velocityfs.errors import VelocityError
from velocityfs.service.accounts import DEFAULT_AUTHKEY_LIFETIME_S
from velocityfs.service.policy import DEFAULT_POLICY, parse

DEFAULT_CONFIG = Path("/etc/velocityfs/velocityfs.toml")
DEFAULT_STORE = "/var/lib/velocityfs"

EXAMPLE = f"""\
# velocityfs configuration. Every key is optional; flags override it.
catalog = "sqlite:///{DEFAULT_STORE}/catalog.sqlite"   # or postgresql+psycopg://user@host/db
store = "{DEFAULT_STORE}"             # store top = the DEFAULT volume
mountpoint = "/srv/velocityfs"
api_listen = "127.0.0.1:8080"        # "" to run the mount without the API
authkey_lifetime_s = {DEFAULT_AUTHKEY_LIFETIME_S}
attr_timeout_s = 1.0                 # how long kernels cache names and attributes; also how
                                     # soon a mount sees other hosts' changes
lease_s = 30.0                       # a dead host's grants are reclaimed after this
catalog_timeout_s = 10.0             # how long a request waits for an unreachable catalog
allow_other = true                   # let the hypervisor's user open media
default_permissions = true
log_level = "INFO"
volume_policy = \"\"\"
{DEFAULT_POLICY}
\"\"\"
"""


class ConfigError(VelocityError):
    """The configuration file is unreadable or has wrong values; ``problems`` lists them."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


@dataclass
class Settings:
    """Everything the daemon, the API and the admin commands need to know."""

    catalog: str | None = None
    store: str = DEFAULT_STORE
    mountpoint: str | None = None
    api_listen: str | None = None
    authkey_lifetime_s: int = DEFAULT_AUTHKEY_LIFETIME_S
    attr_timeout_s: float = 1.0
    lease_s: float = 30.0
    catalog_timeout_s: float = 10.0
    allow_other: bool = False
    default_permissions: bool = False
    log_level: str = "INFO"
    volume_policy: str = DEFAULT_POLICY

    @property
    def catalog_url(self) -> str:
        return self.catalog or f"sqlite:///{Path(self.store).resolve() / 'catalog.sqlite'}"


_TYPES: dict[str, tuple[type, ...]] = {
    "catalog": (str,),
    "store": (str,),
    "mountpoint": (str,),
    "api_listen": (str,),
    "authkey_lifetime_s": (int,),
    "attr_timeout_s": (int, float),
    "lease_s": (int, float),
    "catalog_timeout_s": (int, float),
    "allow_other": (bool,),
    "default_permissions": (bool,),
    "log_level": (str,),
    "volume_policy": (str,),
}


def problems_of(values: Mapping[str, object], *, policy: bool = True) -> list[str]:
    """Every problem with a parsed configuration, one human sentence each.

    With ``policy`` a volume policy that does not parse is one of them.
    """
    found = []
    known = {f.name for f in fields(Settings)}
    # The values whose type is right: only those can be checked further (the
    # isinstance tests below only tell the type checker what was checked here).
    typed: dict[str, object] = {}
    for key, value in values.items():
        if key not in known:
            found.append(f"unknown key '{key}'")
            continue
        types = _TYPES[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            found.append(f"'{key}' must be {wanted}, not {type(value).__name__}")
            continue
        typed[key] = value
    catalog = typed.get("catalog")
    if isinstance(catalog, str):
        try:
            url = make_url(catalog)
            if url.get_backend_name() not in ("sqlite", "postgresql"):
                found.append(f"'catalog' must be a sqlite or postgresql URL, not {url.drivername}")
        except ArgumentError:
            found.append(f"'catalog' is not a database URL: {catalog!r}")
    api_listen = typed.get("api_listen")
    if isinstance(api_listen, str) and api_listen:
        host, _, port = api_listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            found.append(f"'api_listen' must be HOST:PORT, not {api_listen!r}")
    level = typed.get("log_level", "INFO")
    if isinstance(level, str) and not isinstance(logging.getLevelName(level.upper()), int):
        found.append(f"'log_level' must be DEBUG, INFO, WARNING or ERROR, not {level!r}")
    for key in ("authkey_lifetime_s", "attr_timeout_s", "lease_s", "catalog_timeout_s"):
        number = typed.get(key)
        if isinstance(number, int | float) and number < 0:
            found.append(f"'{key}' must not be negative")
    volume_policy = typed.get("volume_policy")
    if policy and isinstance(volume_policy, str):
        try:
            parse(volume_policy)
        except VelocityError as exc:
            found.append(f"'volume_policy': {exc}")
    return found


def load(path: str | os.PathLike[str] | None, *, strict: bool = False) -> Settings:
    """Read the file (the default path only if it exists); raise ConfigError on problems.

    A volume policy that does not parse is a problem only when ``strict``
    (``config check``): otherwise it is loaded, and, as in Koji, media then
    goes to DEFAULT with a warning instead of the daemon refusing to start.
    """
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return Settings()
        path = DEFAULT_CONFIG
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from exc
    problems = problems_of(values, policy=strict)
    if problems:
        raise ConfigError(path, problems)
    return Settings(**values)
