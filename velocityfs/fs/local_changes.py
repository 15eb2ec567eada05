"""Which pools and media this mount is changing, or changed a moment ago.

The follower (``fs.follow``) reads other hosts' changes from the catalog and
mirrors them. A row it read before one of this mount's own changes committed
(a settle, a rename, a chmod) is older than what the mount holds; applying it
would undo the change. So every local change is recorded here, by id, as in
flight while it runs and with its time once it committed, and the follower
skips rows read before that (its look-back reads them again later).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

# The time of a change still in flight: later than any read.
IN_FLIGHT = 1 << 62


class LocalChanges:
    """The owner of the record of this mount's own changes (see the module docstring)."""

    def __init__(self) -> None:
        self._changed: dict[str, int] = {}

    @contextlib.contextmanager
    def changing(self, *object_ids: str | None) -> Iterator[None]:
        """Mark pools or media in flight for the block, and changed when it ends."""
        ids = [i for i in object_ids if i]
        for object_id in ids:
            self._changed[object_id] = IN_FLIGHT
        try:
            yield
        finally:
            self.done(*ids)

    def in_flight(self, *object_ids: str) -> None:
        """Mark a change that is answered now and committed later (a batched close)."""
        for object_id in object_ids:
            self._changed[object_id] = IN_FLIGHT

    def done(self, *object_ids: str) -> None:
        """The changes to these ids committed (or were dropped): they are ours until now."""
        now = time.time_ns()
        for object_id in object_ids:
            self._changed[object_id] = now

    def is_stale(self, object_id: str, read_ns: int) -> bool:
        """A row read at ``read_ns`` predates a change this mount made or is making."""
        return self._changed.get(object_id, 0) >= read_ns

    def forget_before(self, read_ns: int) -> None:
        """Changes that committed before a read started: that read saw them."""
        self._changed = {k: t for k, t in self._changed.items() if t >= read_ns}
