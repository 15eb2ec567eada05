"""Run blocking service calls off the trio loop, through one shared limiter.

SQLAlchemy here is synchronous; an inline call that waits on a lock would
freeze every FUSE and HTTP request served by the loop. The mount and the
in-process API share one limiter, so SQLite sees a single writer thread
(which gave the best tail latency) while PostgreSQL may use a few.
"""

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class Offload:
    """Awaitable access to blocking callables, at most ``threads`` at a time."""

    def __init__(self, threads: int = 1) -> None:
        self.limiter = trio.CapacityLimiter(threads)

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.limiter
        )


def threads_for(is_sqlite: bool) -> int:
    return 1 if is_sqlite else 4
