"""The fault boundary: what a kernel request gets back when something fails.

An exception that escapes a pyfuse3 handler ends the whole FUSE session, and
with it every VM disk this daemon carries. So no handler is trusted to catch
its own: ``fault_boundary`` wraps every handler of an operations class once,
and maps whatever it raises here, in one place:

- ``pyfuse3.FUSEError``: the handler chose the errno; passed on;
- ``OSError`` (a volume's disk failed, filled up or went away): its errno,
  EIO when it has none, with one warning line naming the request;
- a service refusal (``VelocityError``): its errno from ``ERRNO`` (a quota's
  refusal, which names the full pool, with an info line);
- an unreachable catalog (``CatalogUnavailable``): EIO, with one warning line;
- anything else (a bug): EIO, with one error line and the traceback.

Cancellation and other ``BaseException``s are trio's and pyfuse3's own
business and pass untouched. See docs/architecture.md, "The fault boundary".

Being the one place every request passes, it also counts them, by kind, in the
operations object's ``requests`` (``Counted``): what a workload costs in
kernel round trips, which no disk noise moves. Requests the class leaves to
pyfuse3's defaults (answered ENOSYS) are counted too. It reports each one's
time, and each ENOSPC with the pool that is full, to the process's metrics.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import pyfuse3

from velocityfs import errors
from velocityfs.service.metrics import Metrics
from velocityfs.threads import CatalogUnavailable

log = logging.getLogger("velocityfs.fs")

C = TypeVar("C", bound=type)
T = TypeVar("T")

ERRNO: list[tuple[type[errors.VelocityError], int]] = [
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
    (errors.LeaseLost, errno.EIO),
    (errors.VolumeOffline, errno.ENODEV),
]


class Counted(Protocol):
    """An operations object: it owns the count of requests its handlers served, and
    reports them to the process's metrics."""

    requests: Counter[str]
    metrics: Metrics


# Every handler ``guard`` made, so a test can tell that none was left out.
_GUARDED: set[Callable[..., Awaitable[Any]]] = set()


def errno_of(exc: BaseException) -> int:
    """The errno a kernel request gets for ``exc`` (see the module docstring)."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    if isinstance(exc, errors.VelocityError):
        for kind, code in ERRNO:
            if isinstance(exc, kind):
                return code
    return errno.EIO


def _log(request: str, exc: Exception) -> None:
    if isinstance(exc, pyfuse3.FUSEError):
        return
    if isinstance(exc, errors.VelocityError):
        if isinstance(exc, errors.LeaseLost | errors.VolumeOffline):
            log.warning("%s: %s", request, exc)
        elif isinstance(exc, errors.QuotaExceeded):
            log.info("%s: no space: %s", request, exc)  # names the pool that is full
        return
    if isinstance(exc, (OSError, CatalogUnavailable)):
        log.warning("%s: %s", request, exc)
        return
    log.error("%s failed", request, exc_info=exc)


def guard(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """``handler``, with every exception it raises turned into its ``FUSEError``."""
    request = handler.__name__

    @functools.wraps(handler)
    async def guarded(operations: Counted, *args: Any, **kwargs: Any) -> T:
        operations.requests[request] += 1
        started = time.perf_counter()
        try:
            return await handler(operations, *args, **kwargs)
        except pyfuse3.FUSEError as exc:
            if exc.errno == errno.ENOSPC:
                operations.metrics.enospc(None)
            raise
        except Exception as exc:
            _log(request, exc)
            code = errno_of(exc)
            if code == errno.ENOSPC:
                operations.metrics.enospc(
                    exc.pool if isinstance(exc, errors.QuotaExceeded) else None
                )
            raise pyfuse3.FUSEError(code) from exc
        finally:
            operations.metrics.fuse_request(request, time.perf_counter() - started)

    _GUARDED.add(guarded)
    return guarded


def fault_boundary(cls: C) -> C:
    """Guard every pyfuse3 request handler of ``cls``, its own and those it leaves to
    pyfuse3's defaults (see ``guard``)."""
    for name, value in vars(pyfuse3.Operations).items():
        if inspect.iscoroutinefunction(value):
            setattr(cls, name, guard(vars(cls).get(name, value)))
    return cls


def is_guarded(handler: object) -> bool:
    """Whether a handler runs inside the boundary (the tests check every one does)."""
    return handler in _GUARDED
