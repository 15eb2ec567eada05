"""Listings stay exact under concurrent namespace changes.

Several processes (tests/support/namespace_stress.py) make, rename (files and
directories, across pools), unlink and remove for a bounded time, listing their
way down as they go. Then the tree the mount shows must be exactly the
catalog's, and ``rm -rf`` of it must succeed the first time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.fs import sync_dir

STRESS = Path(__file__).parent / "support" / "namespace_stress.py"
WORKERS = 3
SECONDS = 12.0


def mount_tree(top: Path) -> set[str]:
    """Every path under ``top``, directories ending in '/'."""
    found = set()
    for directory, dirs, files in os.walk(top):
        here = Path(directory).relative_to(top)
        found.update(f"{here / d}/" for d in dirs)
        found.update(str(here / f) for f in files)
    return found


def catalog_tree(v) -> set[str]:
    """The same, from the catalog's pools and media."""
    pools = {p.id: p for p in v.pools.all()}

    def path(pool_id: str) -> str:
        pool = pools[pool_id]
        return pool.name if pool.parent_id is None else f"{path(pool.parent_id)}/{pool.name}"

    found = {f"{path(p.id)}/" for p in pools.values()}
    found.update(f"{path(m.pool_id)}/{m.name}" for m in v.media.all())
    return found


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_listings_stay_exact_under_concurrent_renames_and_removals(catalog, mount):
    catalog.setup({"a": 256, "b": 256})
    m = mount()
    tops = [str(m / "a"), str(m / "b")]
    for top in tops:
        for name in ("d1", "d2"):
            os.mkdir(os.path.join(top, name))
    workers = [
        subprocess.Popen(
            [sys.executable, str(STRESS), str(seed), str(SECONDS), *tops],
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(WORKERS)
    ]
    outputs = [w.communicate(timeout=SECONDS + 120)[0] for w in workers]
    problems = [line for out in outputs for line in out.splitlines()[:-1]]
    assert not problems, problems
    assert all(w.returncode == 0 for w in workers), outputs
    done = [json.loads(out.splitlines()[-1]) for out in outputs]
    renames = sum(d.get("rename dir", 0) + d.get("rename file", 0) for d in done)
    assert renames > 100, done  # the workers really raced

    for top in tops:
        sync_dir(top)
    seen = {f"{Path(t).name}/{p}" for t in tops for p in mount_tree(Path(t))} | {"a/", "b/"}
    assert seen == catalog_tree(catalog.v)
    links = {
        directory: (os.stat(directory).st_nlink, 2 + len(dirs))
        for top in tops
        for directory, dirs, _files in os.walk(top)
    }
    assert {d: n for d, n in links.items() if n[0] != n[1]} == {}

    for top in tops:
        for entry in os.listdir(top):
            removed = subprocess.run(
                ["rm", "-rf", os.path.join(top, entry)], capture_output=True, text=True
            )
            assert removed.returncode == 0, removed.stderr
    assert os.listdir(tops[0]) == os.listdir(tops[1]) == []
    for top in tops:
        sync_dir(top)
    assert catalog_tree(catalog.v) == {"a/", "b/"}
    m.stop()
