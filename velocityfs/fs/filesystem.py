"""One mount's objects, made and wired together in one place.

Who owns what (docs/architecture.md, "The mount"): ``Inodes`` the tree of
nodes; ``Grants`` every media's write state and the batches; ``LocalChanges``
the record of this mount's own changes; ``VelocityOperations`` the kernel's
requests and the open handles; ``Mirror`` and ``Follower`` the changes made
elsewhere. The daemon serves them under a kernel mount (``fs.session``); the
fast tests drive the same objects in-process, with no kernel.
"""

from __future__ import annotations

import time

import pyfuse3

from velocityfs.fs.follow import Follower
from velocityfs.fs.grants import Grants
from velocityfs.fs.local_changes import LocalChanges
from velocityfs.fs.mirror import KernelCache, Mirror
from velocityfs.fs.nodes import DirNode, Inodes
from velocityfs.fs.operations import VelocityOperations
from velocityfs.service.metrics import Metrics
from velocityfs.service.velocity import Velocity
from velocityfs.threads import Offload


class Filesystem:
    """The nodes, write state and operations of one mount, loaded from the catalog."""

    def __init__(
        self,
        velocity: Velocity,
        holder_id: str,
        offload: Offload,
        *,
        attr_timeout: float = 1.0,
        kernel: KernelCache | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        now = time.time_ns()
        root = DirNode(
            ino=pyfuse3.ROOT_INODE,
            name="",
            parent=None,
            mode=0o755,
            uid=0,
            gid=0,
            mtime_ns=now,
            ctime_ns=now,
            atime_ns=now,
        )
        self.velocity = velocity
        self.inodes = Inodes(root)
        self.changes = LocalChanges()
        self.grants = Grants(velocity, offload, holder_id, self.inodes, self.changes)
        self.mirror = Mirror(velocity, self.inodes, self.grants, kernel)
        self.ops = VelocityOperations(
            velocity,
            self.inodes,
            self.grants,
            self.changes,
            attr_timeout=attr_timeout,
            metrics=metrics,
        )
        self.follower = Follower(velocity, offload, self.mirror, self.changes, attr_timeout)
        self.mirror.load()
