"""A host that stalls past its lease and resumes while another host reclaims its
grants (issue 16): no pool over its quota, no acknowledged byte lost, a clean unmount.

Host B holds 601 grants (600 files open for writing, one more it appends to);
it stops dead (as under SIGSTOP: none of its tasks runs, nothing renews its
lease) until its lease has run out and host A has begun reclaiming its
grants (fenced B, or handed back the first grant), then resumes at once,
while A goes on; A then fills the pool. Both
mounts are the daemon's own objects (``fs.filesystem.Filesystem``) on one
PostgreSQL catalog and one store, driven in-process (tests/support/inprocess.py)
so that B can be held still at the exact moment: the resumed B is what a
SIGCONT'd daemon is, a process whose clock ran on while it did nothing.

A thread samples the pool's recorded usage and the bytes really on disk
throughout; B's client remembers every byte a write acknowledged.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import pytest
import trio
from support.inprocess import Client, filesystem
from support.usage import assert_usage_consistent, grant_count

from velocityfs.catalog.models import Holder
from velocityfs.fs.filesystem import Filesystem
from velocityfs.service.fsck import Fsck
from velocityfs.service.velocity import Velocity
from velocityfs.threads import Offload

pytestmark = pytest.mark.parametrize("catalog_url", ["postgresql"], indirect=True)

KIB = 1 << 10
MIB = 1 << 20
LEASE_S = 1.0
QUOTA = 32 * MIB
OPEN_FILES = 600
# B's appends: not a multiple of anything the ledger rounds to.
APPEND = 64 * KIB + 3
APPEND_EVERY_S = 0.02


def bytes_on_disk(store: Path) -> int:
    """The apparent size of every backing file in the store (one volume: DEFAULT)."""
    total = 0
    for path in (store / "media").glob("[0-9a-f][0-9a-f]/*"):
        with contextlib.suppress(FileNotFoundError):  # unlinked since the listing
            total += path.stat().st_size
    return total


@dataclass
class Sampler:
    """The pool's recorded usage and the store's real bytes, every few milliseconds."""

    v: Velocity
    store: Path
    samples: list[tuple[int, int]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                used = self.v.pool_by_ref("p").used_bytes
                self.samples.append((used, bytes_on_disk(self.store)))
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)
                return
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@dataclass
class Stalled:
    """Whether host B runs: its tasks wait here while it is stopped."""

    running: trio.Event = field(default_factory=trio.Event)

    async def gate(self) -> None:
        await self.running.wait()

    def stop(self) -> None:
        self.running = trio.Event()

    def resume(self) -> None:
        self.running.set()


@dataclass
class HostB:
    """Host B's life: renew the lease, append to one file, record what was acknowledged."""

    fs: Filesystem
    client: Client
    fh: int = -1
    state: Stalled = field(default_factory=Stalled)
    acknowledged: bytearray = field(default_factory=bytearray)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    renewal_errors: list[BaseException] = field(default_factory=list)
    done: bool = False

    async def renew(self) -> None:
        while not self.done:
            await self.state.gate()
            try:
                await self.fs.grants.renew_lease()
            except Exception as exc:  # as the follower does: log, try next round
                self.renewal_errors.append(exc)
            await trio.sleep(LEASE_S / 3)

    async def append(self) -> None:
        step = 0
        while not self.done:
            await self.state.gate()
            data = bytes([step % 251 + 1]) * APPEND
            try:
                written = await self.client.write(self.fh, len(self.acknowledged), data)
                self.acknowledged += data[:written]
                step += 1
            except pyfuse3.FUSEError as exc:
                self.refused[errno.errorcode[exc.errno]] += 1
            await trio.sleep(APPEND_EVERY_S)


def holder_grants(v: Velocity, holder_id: str) -> int:
    return sum(int(h["grants"]) for h in v.ledger.holders() if h["id"] == holder_id)


def reclaim_begun(v: Velocity, holder_id: str, grants: int) -> tuple[bool, int]:
    """Whether a reclaim of the holder has begun (it is fenced, or its grants started
    to go), and how many grants it has left."""
    with v.db.transaction() as s:
        holder = s.get(Holder, holder_id)
    left = holder_grants(v, holder_id)
    return holder is None or holder.fenced or left < grants, left


async def fill(client: Client, path: str) -> int:
    """Write 1 MiB at a time until ENOSPC; the bytes written."""
    fh = await client.create(path)
    total = 0
    try:
        while True:
            try:
                total += await client.write(fh, total, b"\xaa" * MIB)
            except pyfuse3.FUSEError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return total
    finally:
        await client.close(fh)


def test_a_host_resuming_during_the_reclaim_of_its_grants_loses_nothing(
    catalog_url: str, store_dir: Path
) -> None:
    setup = Velocity(catalog_url, store_dir)
    setup.init(lease_s=LEASE_S)
    pool = setup.pools.create(None, "p", QUOTA)
    for i in range(OPEN_FILES):
        setup.media.create(pool.id, f"idle-{i:03}.img")
    host_a = Velocity(catalog_url, store_dir)
    host_b = Velocity(catalog_url, store_dir)
    fs_a = filesystem(host_a, offload=Offload(4))
    fs_b = filesystem(host_b, offload=Offload(4))
    a, b_client = Client(fs_a), Client(fs_b)
    report: dict[str, object] = {}

    async def keep_a_alive() -> None:
        while True:
            await fs_a.grants.renew_lease()
            await trio.sleep(LEASE_S / 3)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_a_alive)
            nursery.start_soon(fs_a.grants.run_batches)
            nursery.start_soon(fs_b.grants.run_batches)
            b = HostB(fs_b, b_client)
            b.state.resume()
            nursery.start_soon(b.renew)
            idle = [
                await b_client.open(f"p/idle-{i:03}.img", os.O_WRONLY) for i in range(OPEN_FILES)
            ]
            b.fh = await b_client.create("p/log.img")
            first_holder = fs_b.grants.holder_id
            report["grants before"] = holder_grants(setup, first_holder)
            nursery.start_soon(b.append)
            await trio.sleep(0.5)

            # B stops dead and stays so past its lease.
            b.state.stop()
            report["acknowledged before the stall"] = len(b.acknowledged)
            await trio.sleep(LEASE_S + 0.5)

            # A reclaims B's grants; B resumes the moment their count starts to drop.
            reclaimed: list[int] = []

            async def reclaim() -> None:
                reclaimed.append(await fs_a.follower.offload(host_a.reclaim_dead_holders))

            nursery.start_soon(reclaim)
            before = holder_grants(setup, first_holder)
            while not reclaimed:
                begun, left = await trio.to_thread.run_sync(
                    reclaim_begun, setup, first_holder, before
                )
                if begun:
                    break
                await trio.sleep(0.001)
            b.state.resume()
            report["resumed with grants left"] = left
            while not reclaimed:
                await trio.sleep(0.01)

            # A fills the pool while B goes on appending.
            report["A filled"] = await fill(a, "p/fill.img")
            await trio.sleep(1.5)

            # B unmounts cleanly: stop its tasks, close every file, settle, retire.
            b.done = True
            b.state.resume()
            await trio.sleep(LEASE_S / 3 + APPEND_EVERY_S)
            for fh in [b.fh, *idle]:
                await b_client.close(fh)
            try:
                await fs_b.ops.settle_all()
                await fs_b.grants.commit()
                host_b.media.end_creates()
                host_b.ledger.retire_holder(fs_b.grants.holder_id)
            except BaseException as exc:
                report["unmount failed"] = repr(exc)
            report["B"] = b
            await fs_a.grants.commit()
            host_a.media.end_creates()
            host_a.ledger.retire_holder(fs_a.grants.holder_id)
            nursery.cancel_scope.cancel()

    try:
        with Sampler(setup, store_dir) as sampler:
            trio.run(main)
        b = report.pop("B")
        assert isinstance(b, HostB)
        log_path = b_client.media("p/log.img").open_path
        kept = Path(log_path).read_bytes()
        used_peak = max(used for used, _ in sampler.samples)
        disk_peak = max(disk for _, disk in sampler.samples)
        print(
            f"samples {len(sampler.samples)}; peak usage {used_peak} and bytes on disk "
            f"{disk_peak} against a quota of {QUOTA}; acknowledged {len(b.acknowledged)} "
            f"bytes, kept {len(kept)} (identical: {kept == bytes(b.acknowledged)}); "
            f"B's writes refused: {dict(b.refused)}; B's renewals failed: {b.renewal_errors}; "
            f"{report}"
        )
        assert not sampler.errors, sampler.errors
        assert "unmount failed" not in report, report
        assert disk_peak <= QUOTA, f"bytes on disk passed the quota by {disk_peak - QUOTA}"
        assert used_peak <= QUOTA, f"recorded usage passed the quota by {used_peak - QUOTA}"
        assert kept == bytes(b.acknowledged), "acknowledged bytes were lost or changed"
        assert len(b.acknowledged) > report["acknowledged before the stall"]  # type: ignore[operator]
        sizes = {m.name: m.size for m in setup.media.in_pool(pool.id)}
        assert sizes["log.img"] == len(kept)
        assert sum(sizes.values()) == bytes_on_disk(store_dir)
        assert setup.pool_by_ref("p").used_bytes == sum(sizes.values()) <= QUOTA
        assert grant_count(setup) == 0
        assert_usage_consistent(setup)
        assert [str(p) for p in Fsck(setup).run()] == []
    finally:
        for v in (host_a, host_b, setup):
            v.close()
