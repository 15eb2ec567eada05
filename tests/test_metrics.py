"""Prometheus metrics at /metrics, scraped from live mounts.

Through a real mount with the API in-process (``--api``) and with only
``metrics_listen``: the series move when a file is written, a refused write
counts against the pool that is full, ``metrics = false`` takes /metrics away
(a JSON 404), and every metric the Grafana dashboard queries is served, so the
dashboard cannot drift from the daemon.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.api import free_port, standalone_fixture, wait_port  # noqa: F401

from velocityfs.config import problems_of

MIB = 1 << 20
DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"
# How long a scrape may lag what was done (the gauges are refreshed every 2 s).
CATCH_UP_S = 30.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def wait_for(port: int, check: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``check`` holds (the gauges follow the catalog within seconds)."""
    deadline = time.monotonic() + CATCH_UP_S
    while True:
        samples = scrape(port)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"the scrape never satisfied the check: {samples}")
        time.sleep(0.2)


def start(mount: Any, tmp_path: Path, config: str = "", *, api: bool = True) -> tuple[Any, int]:
    """A mount with the API in-process (``api``) or ``metrics_listen`` on a free port,
    with the configuration ``config`` besides; the mount and the port to scrape."""
    for attempt in range(3):
        port = free_port()
        path = tmp_path / f"velocityfs-{port}.toml"
        listen = "" if api else f'metrics_listen = "127.0.0.1:{port}"\n'
        path.write_text(listen + config)
        env = {**os.environ, "VELOCITYFS_CONFIG": str(path)}
        extra = ["--api", f"127.0.0.1:{port}"] if api else []
        try:
            m = mount(*extra, env=env)
        except pytest.fail.Exception as exc:
            # Other processes on this host pick free ports too; lost the race: again.
            if "Address already in use" in str(exc) and attempt < 2:
                continue
            raise
        wait_port(port)
        return m, port
    raise AssertionError("unreachable")


def write_file(path: Path, nbytes: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))


def fill(path: Path) -> int:
    """Write 1 MiB blocks into ``path`` until ENOSPC; the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                written += os.write(fd, bytes(MIB))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return written
    finally:
        os.close(fd)


def make_pools(catalog: Any) -> None:
    """tenants (64 MiB) with acme (32 MiB) and dev (inherits); q (8 MiB) with a and b
    (6 MiB each, more than q has left once a holds 5 MiB)."""
    catalog.setup({"tenants": 64, "q": 8})
    pools = catalog.v.pools
    tenants, q = catalog.v.pool_by_ref("tenants").id, catalog.v.pool_by_ref("q").id
    pools.create(tenants, "acme", 32 * MIB)
    pools.create(tenants, "dev", None)
    pools.create(q, "a", 6 * MIB)
    pools.create(q, "b", 6 * MIB)


def check_series_move_on_write(m: Any, port: int) -> None:
    before = scrape(port)
    assert value(before, "velocityfs_pool_used_bytes", pool="tenants/acme") == 0
    assert value(before, "velocityfs_pool_media", pool="tenants/acme") == 0
    assert value(before, "velocityfs_pool_quota_bytes", pool="tenants/acme") == 32 * MIB
    assert value(before, "velocityfs_pool_quota_bytes", pool="tenants/dev") == 64 * MIB
    assert value(before, "velocityfs_pool_avail_bytes", pool="tenants/dev") == 64 * MIB
    assert value(before, "velocityfs_volume_free_bytes", volume="DEFAULT") > 0
    assert value(before, "velocityfs_volume_online", volume="DEFAULT") == 1
    assert value(before, "velocityfs_lease_age_seconds") is not None
    writes = total(before, "velocityfs_fuse_request_seconds_count", op="write")
    transactions = total(before, "velocityfs_catalog_transaction_seconds_count")
    on_volume = value(before, "velocityfs_volume_media", volume="DEFAULT")
    volume_bytes = value(before, "velocityfs_volume_used_bytes", volume="DEFAULT")
    assert on_volume is not None and volume_bytes is not None

    write_file(m / "tenants" / "acme" / "disk.img", 3 * MIB)

    after = wait_for(
        port,
        lambda s: (
            value(s, "velocityfs_pool_used_bytes", pool="tenants/acme") == 3 * MIB
            and value(s, "velocityfs_volume_used_bytes", volume="DEFAULT") == volume_bytes + 3 * MIB
        ),
    )
    assert value(after, "velocityfs_pool_used_bytes", pool="tenants") == 3 * MIB
    assert value(after, "velocityfs_pool_media", pool="tenants/acme") == 1
    assert value(after, "velocityfs_pool_media", pool="tenants") == 0  # only its own
    assert value(after, "velocityfs_pool_avail_bytes", pool="tenants/acme") == 29 * MIB
    # dev inherits tenants' limit, and tenants' usage leaves it less room.
    assert value(after, "velocityfs_pool_avail_bytes", pool="tenants/dev") == 61 * MIB
    assert value(after, "velocityfs_volume_media", volume="DEFAULT") == on_volume + 1
    assert total(after, "velocityfs_fuse_request_seconds_count", op="write") > writes
    assert total(after, "velocityfs_fuse_request_seconds_bucket", op="write", le="+Inf") > writes
    assert total(after, "velocityfs_catalog_transaction_seconds_count") > transactions

    # And back when it is removed (the change feed's tombstones).
    (m / "tenants" / "acme" / "disk.img").unlink()
    gone = wait_for(
        port, lambda s: value(s, "velocityfs_volume_media", volume="DEFAULT") == on_volume
    )
    assert value(gone, "velocityfs_volume_used_bytes", volume="DEFAULT") == volume_bytes
    assert value(gone, "velocityfs_pool_used_bytes", pool="tenants/acme") == 0
    assert value(gone, "velocityfs_pool_media", pool="tenants/acme") == 0


def test_series_move_when_a_file_is_written(catalog, mount, tmp_path):
    make_pools(catalog)
    m, port = start(mount, tmp_path)
    check_series_move_on_write(m, port)
    samples = scrape(port)
    # The scrapes themselves are API requests, by route template and status.
    assert value(samples, "velocityfs_api_request_seconds_count", method="GET",
                 route="/metrics", status="200") >= 1  # fmt: skip
    assert value(samples, "velocityfs_grants_held") is not None
    assert value(samples, "velocityfs_api_uploads_in_flight") == 0


def test_metrics_listen_serves_them_without_the_api(catalog, mount, tmp_path):
    make_pools(catalog)
    m, port = start(mount, tmp_path, api=False)
    check_series_move_on_write(m, port)
    # Only /metrics there: the API's routes are not, and every error is JSON.
    response = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10)
    assert response.status_code == 404
    assert "error" in response.json()
    response = httpx.post(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 405
    assert "error" in response.json()


def test_velocityfs_serve_shows_what_a_mount_writes(catalog, mount, standalone):
    """The API's own process serves the metrics too, and its pool gauges follow the
    catalog, whoever writes: here a mount in another process."""
    make_pools(catalog)
    server = standalone()
    m = mount()
    write_file(m / "tenants" / "acme" / "disk.img", 2 * MIB)
    samples = wait_for(
        server.port,
        lambda s: value(s, "velocityfs_pool_used_bytes", pool="tenants/acme") == 2 * MIB,
    )
    assert value(samples, "velocityfs_pool_media", pool="tenants/acme") == 1
    assert value(samples, "velocityfs_lease_age_seconds") is not None
    assert total(samples, "velocityfs_fuse_request_seconds_count") == 0  # no mount in it
    # OpenMetrics for a scraper that asks for it.
    response = httpx.get(
        f"http://127.0.0.1:{server.port}/metrics",
        headers={"accept": "application/openmetrics-text; version=1.0.0"},
        timeout=10,
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_metrics_false_takes_metrics_off_the_api(catalog, mount, tmp_path):
    catalog.setup({"tenants": 64})
    _m, port = start(mount, tmp_path, "metrics = false\n")
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()
    assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).status_code == 200


def test_enospc_is_counted_against_the_pool_that_is_full(catalog, mount, tmp_path):
    make_pools(catalog)
    m, port = start(mount, tmp_path)
    write_file(m / "q" / "a" / "x.img", 5 * MIB)
    assert fill(m / "q" / "b" / "y.img") == 3 * MIB  # q's room, though b had 6 MiB
    samples = wait_for(port, lambda s: value(s, "velocityfs_pool_avail_bytes", pool="q/b") == 0)
    assert value(samples, "velocityfs_fuse_enospc_total", pool="q") >= 1
    assert value(samples, "velocityfs_fuse_enospc_total", pool="q/b") is None
    assert value(samples, "velocityfs_pool_used_bytes", pool="q") == 8 * MIB


def dashboard_metric_names() -> set[str]:
    """Every metric name in the dashboard's queries (panels and variables)."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"]
                if variable["type"] == "query"]  # fmt: skip
    assert queries
    return {name for query in queries for name in re.findall(r"\bvelocityfs_\w+", query)}


def test_every_metric_the_dashboard_queries_is_served(catalog, mount, tmp_path):
    make_pools(catalog)
    m, port = start(mount, tmp_path)
    # Something of everything the dashboard shows: a write, an ENOSPC, API requests.
    write_file(m / "q" / "a" / "x.img", 5 * MIB)
    fill(m / "q" / "b" / "y.img")
    assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).status_code == 200
    samples = wait_for(port, lambda s: total(s, "velocityfs_api_request_seconds_count") > 0)
    served = {name for name, _labels in samples}
    wanted = dashboard_metric_names()
    assert {"velocityfs_pool_used_bytes", "velocityfs_pool_quota_bytes"} <= wanted
    assert wanted - served == set()


def test_metrics_listen_must_be_an_address():
    assert problems_of({"metrics_listen": "nowhere"}) == [
        "'metrics_listen' must be HOST:PORT, not 'nowhere'"
    ]
    assert problems_of({"metrics": "yes"}) == ["'metrics' must be bool, not str"]
    assert problems_of({"metrics": False, "metrics_listen": "127.0.0.1:9108"}) == []
