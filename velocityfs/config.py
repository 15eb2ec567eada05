"""The configuration file, ``/etc/velocityfs/velocityfs.toml`` by default.

Every key is optional; command-line flags override the file, the file
overrides the defaults below. ``velocityfs config check`` reports every
problem, one line each, instead of stopping at the first.
"""

from __future__ import annotations

import logging
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from velocityfs.api import DEFAULT_MAX_BODY_BYTES
from velocityfs.errors import VelocityError
from velocityfs.service.access import DEFAULT_UPLOAD_IDLE_S
from velocityfs.service.accounts import DEFAULT_AUTHKEY_LIFETIME_S
from velocityfs.service.policy import DEFAULT_POLICY, parse

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/velocityfs/velocityfs.toml")
DEFAULT_STORE = "/var/lib/velocityfs"
# ``default_permissions`` was a key (default false); the kernel's check is now always on.
# A file may still ask for it (true: a warning); it can no longer turn it off.
ALWAYS_CHECKED = "the kernel always checks modes, owners and groups on the mount"
# ``lease_s`` was a key (default 30); the lease length is now the catalog's, so that no
# two processes judge a holder by different leases. A file may still name it (a number:
# a warning, and it is ignored).
LEASE_IN_CATALOG = (
    "the lease length is the catalog's, the same for every process "
    "('velocityfs lease set SECONDS'); this value is ignored (remove the key)"
)
# Keys that are gone; a file that still has them is read with a warning.
RETIRED = ("default_permissions", "lease_s")
# The range of ``api_max_body_bytes``: JSON request bodies are parsed on the loop that
# also serves the mount, so even the largest must parse in milliseconds.
MAX_BODY_RANGE = (1 << 10, 16 << 20)

EXAMPLE = f"""\
# velocityfs configuration. Every key is optional; flags override it.
catalog = "sqlite:///{DEFAULT_STORE}/catalog.sqlite"   # or postgresql+psycopg://user@host/db
store = "{DEFAULT_STORE}"             # store top = the DEFAULT volume
mountpoint = "/srv/velocityfs"
api_listen = "127.0.0.1:8080"        # where `velocityfs serve` (velocityfs-api.service) listens
api_in_mount = false                 # true: the mount serves the API in its own process too,
                                     # one failure domain for the API and every VM disk
api_max_body_bytes = {DEFAULT_MAX_BODY_BYTES}         # larger JSON bodies get 413, unread
                                     # (uploads have no limit but the quotas)
authkey_lifetime_s = {DEFAULT_AUTHKEY_LIFETIME_S}
attr_timeout_s = 1.0                 # how long kernels cache names and attributes; also how
                                     # soon a mount sees other hosts' changes (1 s at most)
catalog_timeout_s = 10.0             # how long a request waits for an unreachable catalog
upload_idle_s = 60.0                 # an API upload whose body stops arriving this long
                                     # is aborted (408) and gives its room back
allow_other = true                   # let the hypervisor's user open media
metrics = true                       # Prometheus metrics at /metrics on the API's address;
                                     # no authkey needed: firewall it like the API
# metrics_listen = "127.0.0.1:9108"  # also serve /metrics here (a mount without the API)
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
    api_in_mount: bool = False
    api_max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    authkey_lifetime_s: int = DEFAULT_AUTHKEY_LIFETIME_S
    attr_timeout_s: float = 1.0
    catalog_timeout_s: float = 10.0
    upload_idle_s: float = DEFAULT_UPLOAD_IDLE_S
    allow_other: bool = False
    metrics: bool = True
    metrics_listen: str | None = None
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
    "api_in_mount": (bool,),
    "api_max_body_bytes": (int,),
    "authkey_lifetime_s": (int,),
    "attr_timeout_s": (int, float),
    "catalog_timeout_s": (int, float),
    "upload_idle_s": (int, float),
    "allow_other": (bool,),
    "metrics": (bool,),
    "metrics_listen": (str,),
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
        if key == "default_permissions":
            if value is not True:
                found.append(
                    f"'default_permissions' can no longer be turned off: {ALWAYS_CHECKED} "
                    "(remove the key)"
                )
            continue
        if key == "lease_s":
            if isinstance(value, bool) or not isinstance(value, int | float):
                found.append(f"'lease_s' must be int or float, not {type(value).__name__}")
            continue
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
    for key in ("api_listen", "metrics_listen"):
        listen = typed.get(key)
        if isinstance(listen, str) and (key == "metrics_listen" or listen):
            host, _, port = listen.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                found.append(f"'{key}' must be HOST:PORT, not {listen!r}")
    api_listen = typed.get("api_listen")
    if typed.get("api_in_mount") is True and not api_listen:
        found.append("'api_in_mount' needs 'api_listen', the address to serve the API on")
    body = typed.get("api_max_body_bytes")
    if isinstance(body, int) and not MAX_BODY_RANGE[0] <= body <= MAX_BODY_RANGE[1]:
        low, high = MAX_BODY_RANGE
        found.append(f"'api_max_body_bytes' must be {low} to {high} bytes, not {body}")
    level = typed.get("log_level", "INFO")
    if isinstance(level, str) and not isinstance(logging.getLevelName(level.upper()), int):
        found.append(f"'log_level' must be DEBUG, INFO, WARNING or ERROR, not {level!r}")
    for key in ("authkey_lifetime_s", "attr_timeout_s", "catalog_timeout_s"):
        number = typed.get(key)
        if isinstance(number, int | float) and number < 0:
            found.append(f"'{key}' must not be negative")
    idle = typed.get("upload_idle_s")
    if isinstance(idle, int | float) and not 0 < idle < math.inf:
        found.append("'upload_idle_s' must be a positive number of seconds")
    volume_policy = typed.get("volume_policy")
    if policy and isinstance(volume_policy, str):
        try:
            parse(volume_policy)
        except VelocityError as exc:
            found.append(f"'volume_policy': {exc}")
    return found


def warnings_of(values: Mapping[str, object]) -> list[str]:
    """What a valid configuration still says that it need not, one sentence each."""
    notes = []
    if values.get("default_permissions") is True:
        notes.append(f"'default_permissions' is deprecated: {ALWAYS_CHECKED} (remove the key)")
    if "lease_s" in values:
        notes.append(f"'lease_s' is deprecated: {LEASE_IN_CATALOG}")
    return notes


def load(
    path: str | os.PathLike[str] | None,
    *,
    strict: bool = False,
    warn: Callable[[str], object] | None = None,
) -> Settings:
    """Read the file (the default path only if it exists); raise ConfigError on problems.

    A volume policy that does not parse is a problem only when ``strict``
    (``config check``): otherwise it is loaded, and, as in Koji, media then
    goes to DEFAULT with a warning instead of the daemon refusing to start.
    Each of ``warnings_of`` goes to ``warn`` (default: a logged warning).
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
    for note in warnings_of(values):
        if warn is None:
            log.warning("%s: %s", path, note)
        else:
            warn(note)
    return Settings(**{k: v for k, v in values.items() if k not in RETIRED})
