"""Domain errors raised by the service layer.

Each adapter maps these to its own protocol (errno for FUSE, HTTP status for
the shim, exit code and message for the CLI); the service never speaks either.
"""


class VelocityError(Exception):
    """Base of every refusal the service layer can give."""


class NotFound(VelocityError):
    """A pool, media, user, group or authkey does not exist."""


class Conflict(VelocityError):
    """A name is already taken in that namespace."""


class InvalidName(VelocityError):
    """A pool, media or account name breaks the naming rules."""


class NameTooLong(InvalidName):
    """A name is longer than 255 bytes (ENAMETOOLONG in the mount)."""


class InvalidValue(VelocityError):
    """A numeric or enumerated argument is out of its range."""


class QuotaExceeded(VelocityError):
    """Usage would pass the quota of the pool or of an ancestor; ``pool`` is the path of
    the pool that is full, when known (the metrics count refusals by it)."""

    def __init__(self, message: str, pool: str | None = None) -> None:
        super().__init__(message)
        self.pool = pool


class QuotaAboveAncestor(VelocityError):
    """A pool's quota would exceed an ancestor's quota (the API's 406)."""


class QuotaBelowUsage(VelocityError):
    """A quota would drop below what the pool already uses."""


class NotEmpty(VelocityError):
    """A pool still has subpools or media."""


class Busy(VelocityError):
    """The target is in use (open for writing, holds media) or lacks room for the move."""


class PermissionDenied(VelocityError):
    """The caller lacks the permission the operation needs."""


class AuthenticationFailed(VelocityError):
    """Unknown user, wrong password, or an unknown or expired authkey."""


class NotSupported(VelocityError):
    """The operation does not exist in this model (hard links, symlinks, devices)."""


class LeaseLost(VelocityError):
    """This process was cut off from the catalog longer than its lease: another
    process may have reclaimed its grants, so it must not write into them (EIO)."""


class VolumeOffline(VelocityError):
    """A volume's disk is not there: its directory lacks the marker ``volume add`` wrote
    on the disk (not mounted, or another disk mounted there). Nothing goes onto it or
    off it until it is back (ENODEV in the mount, 503 in the API)."""
