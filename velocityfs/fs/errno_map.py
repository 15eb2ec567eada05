"""Service refusals as errno values for the kernel."""

import errno

from velocityfs import errors

_ERRNO: list[tuple[type[errors.VelocityError], int]] = [
    (errors.NotFound, errno.ENOENT),
    (errors.Conflict, errno.EEXIST),
    (errors.NameTooLong, errno.ENAMETOOLONG),
    (errors.InvalidName, errno.EINVAL),
    (errors.QuotaExceeded, errno.ENOSPC),
    (errors.QuotaAboveAncestor, errno.EINVAL),
    (errors.QuotaBelowUsage, errno.EINVAL),
    (errors.InvalidValue, errno.EINVAL),
    (errors.NotEmpty, errno.ENOTEMPTY),
    (errors.PermissionDenied, errno.EACCES),
    (errors.AuthenticationFailed, errno.EACCES),
    (errors.NotSupported, errno.EPERM),
]


def errno_of(exc: errors.VelocityError) -> int:
    for kind, code in _ERRNO:
        if isinstance(exc, kind):
            return code
    return errno.EIO
