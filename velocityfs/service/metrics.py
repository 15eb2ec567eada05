"""The Prometheus metrics of one process, in a registry of its own.

``Metrics`` owns every metric object: the adapters and the catalog report to
it (a kernel request's time, a quota refusal, a committed transaction, an API
request, an upload under way) and the API serves ``exposition`` at
``/metrics``. Nothing here reads the catalog: the pool and volume gauges come
from ``service.usage`` (kept in memory from the change feed), the lease and
grants from what the process holds, each read when a scrape asks
(``UsageCollector``, ``HolderCollector``). A registry per process, not
prometheus_client's global one, so tests that run several services in one
interpreter never share series.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from velocityfs.service.ledger import Ledger
from velocityfs.service.usage import Usage
from velocityfs.service.volumes import VolumeService

# Kernel requests take microseconds (from memory) to a catalog round trip or a disk's
# stall; catalog transactions tens of microseconds to seconds (a lock held elsewhere).
FAST_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
API_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class Metrics:
    """Every metric of one process (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._fuse = Histogram(
            "velocityfs_fuse_request_seconds",
            "Kernel requests served by the mount, by operation, and the time each took",
            ["op"],
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )
        self._enospc = Counter(
            "velocityfs_fuse_enospc",
            "Kernel requests answered ENOSPC, by the pool that is full (empty: a volume's disk)",
            ["pool"],
            registry=self.registry,
        )
        self._catalog = Histogram(
            "velocityfs_catalog_transaction_seconds",
            "Catalog transactions committed (kind: transaction, statements, batch, read), "
            "and their time from begin to commit",
            ["kind"],
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )
        self._batch_units = Histogram(
            "velocityfs_catalog_batch_units",
            "Units of work (a create each) committed together by one batch transaction",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._api = Histogram(
            "velocityfs_api_request_seconds",
            "API requests by method, route template and status, and the time each took",
            ["method", "route", "status"],
            buckets=API_BUCKETS,
            registry=self.registry,
        )
        # Children by label, so a kernel request or a transaction pays no label lookup.
        self._fuse_ops: dict[str, Histogram] = {}
        self._catalog_kinds: dict[str, Histogram] = {}
        self.uploads_in_flight = 0

    def fuse_request(self, op: str, seconds: float) -> None:
        child = self._fuse_ops.get(op)
        if child is None:
            child = self._fuse_ops[op] = self._fuse.labels(op)
        child.observe(seconds)

    def enospc(self, pool: str | None) -> None:
        self._enospc.labels(pool or "").inc()

    def catalog_commit(self, kind: str, seconds: float, units: int) -> None:
        """A catalog transaction committed; a batch's ``units`` are its units of work."""
        child = self._catalog_kinds.get(kind)
        if child is None:
            child = self._catalog_kinds[kind] = self._catalog.labels(kind)
        child.observe(seconds)
        if kind == "batch":
            self._batch_units.observe(units)

    def api_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._api.labels(method, route, str(status)).observe(seconds)

    def upload_started(self) -> None:
        self.uploads_in_flight += 1

    def upload_ended(self) -> None:
        self.uploads_in_flight -= 1

    def add(self, collector: Collector) -> None:
        """Read ``collector`` at every scrape as well."""
        self.registry.register(collector)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body of a scrape and its content type (OpenMetrics if asked for)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def _gauge(name: str, documentation: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


class UsageCollector(Collector):
    """Pool and volume gauges from ``Usage`` (memory), and each volume's free space
    (one statvfs each: the disk, not the catalog)."""

    def __init__(self, usage: Usage, volumes: VolumeService) -> None:
        self._usage = usage
        self._volumes = volumes

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        used, quota, avail, media, v_media, v_used, v_free, v_online = families
        for pool in self._usage.pools():
            used.add_metric([pool.path], pool.used_bytes)
            quota.add_metric([pool.path], pool.quota_bytes)
            avail.add_metric([pool.path], pool.avail_bytes)
            media.add_metric([pool.path], pool.media)
        for name, (count, nbytes) in sorted(self._usage.volumes().items()):
            v_media.add_metric([name], count)
            v_used.add_metric([name], nbytes)
            online = self._volumes.presence.offline_reason(name) is None
            v_online.add_metric([name], 1 if online else 0)
            if online:
                try:
                    disk = os.statvfs(self._volumes.backing.volume_dir(name))
                except OSError:
                    continue
                v_free.add_metric([name], disk.f_bavail * disk.f_frsize)
        yield from families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            _gauge(
                "velocityfs_pool_used_bytes",
                "Bytes used in the pool's subtree (settled sizes and outstanding grants)",
                ["pool"],
            ),
            _gauge(
                "velocityfs_pool_quota_bytes",
                "The pool's quota, its own or the nearest ancestor's",
                ["pool"],
            ),
            _gauge(
                "velocityfs_pool_avail_bytes",
                "Bytes that may still be written into the pool, given every ancestor's quota",
                ["pool"],
            ),
            _gauge("velocityfs_pool_media", "Media directly in the pool", ["pool"]),
            _gauge("velocityfs_volume_media", "Media on the volume", ["volume"]),
            _gauge("velocityfs_volume_used_bytes", "Sizes of the media on the volume", ["volume"]),
            _gauge(
                "velocityfs_volume_free_bytes",
                "Bytes free on the volume's disk (online volumes only)",
                ["volume"],
            ),
            _gauge("velocityfs_volume_online", "1 while the volume's disk is there", ["volume"]),
        ]


class HolderCollector(Collector):
    """This process as a grant holder: the grants it holds and its lease's age, and
    the API's uploads under way."""

    def __init__(
        self,
        metrics: Metrics,
        ledger: Ledger,
        holder_id: Callable[[], str],
        grants_held: Callable[[], int],
    ) -> None:
        self._metrics = metrics
        self._ledger = ledger
        self._holder_id = holder_id
        self._grants_held = grants_held

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        grants, lease_age, uploads = families
        grants.add_metric([], self._grants_held() + self._metrics.uploads_in_flight)
        try:
            lease = self._ledger.lease_of(self._holder_id())
        except KeyError:  # registering again just now
            pass
        else:
            lease_age.add_metric([], time.monotonic() - lease.sent)
        uploads.add_metric([], self._metrics.uploads_in_flight)
        yield from families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            _gauge(
                "velocityfs_grants_held",
                "Grants this process holds: media open for writing here, and uploads",
            ),
            _gauge(
                "velocityfs_lease_age_seconds",
                "Seconds since this process's lease was last renewed",
            ),
            _gauge("velocityfs_api_uploads_in_flight", "API uploads whose body is arriving"),
        ]
