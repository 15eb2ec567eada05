"""A quota-ledger worker: reserve, write into, settle and truncate media at random.

Imported by tests/test_ledger_contention.py to run in threads, and run as a script to
run in separate processes, each with its own Velocity on the same catalog and store:

    python ledger_worker.py CATALOG_URL STORE_DIR SEED THREADS

As a script it registers one holder per thread, prints ``ready``, waits for a line
``go DEADLINE`` (seconds since the epoch) on stdin, works until the deadline, releases
every grant it still holds, and prints one JSON line: a list with one dict of counters
per thread (or ``{"error": traceback}``).

Media are shared by all workers, as two mounts on two hosts share a file; each worker
sees only its own grants, so it reads the current size before each settlement and may
be refused when another worker changed the size in between (that refusal is legal and
counted, and must change nothing).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import traceback
from collections import Counter

from velocityfs.errors import QuotaExceeded
from velocityfs.service.velocity import Velocity

KIB = 1 << 10
MAX_NEED = 96 * KIB
TRUNCATE_SHARE = 0.25
RELEASE_ATTEMPTS = 50
MIN_RESERVE_ATTEMPTS = 25  # even on a slow machine, whatever the deadline


def all_media_ids(v: Velocity) -> list[str]:
    return sorted(m.id for m in v.media.all())


def _settle(v: Velocity, counts: Counter[str], mid: str, hid: str, size: int, keep: int) -> bool:
    try:
        v.ledger.settle(mid, hid, size, keep)
    except QuotaExceeded:
        counts["settle_refused"] += 1
        return False
    counts["settled"] += 1
    return True


def release_all(v: Velocity, hid: str, held: dict[str, int], counts: Counter[str]) -> None:
    """Settle every media this holder has a grant on to its current size, keeping nothing."""
    for mid, nbytes in held.items():
        if nbytes == 0:
            continue
        for _ in range(RELEASE_ATTEMPTS):
            # Shrinking a grant never needs room; only a concurrent size change between
            # the read and the settlement can make this one refused, and then we retry.
            if _settle(v, counts, mid, hid, v.media.get(mid).size, 0):
                held[mid] = 0
                break
        else:
            raise AssertionError(f"could not release the grant of {hid} on {mid}")


def work(v: Velocity, hid: str, media_ids: list[str], seed: int, deadline: float) -> Counter[str]:
    """Reserve and settle random amounts until ``deadline`` (time.time()); release all.

    A worker also goes on until it has tried MIN_RESERVE_ATTEMPTS reservations, so
    that a slow machine still gets enough contention for the test's thresholds.
    """
    rnd = random.Random(seed)
    counts: Counter[str] = Counter()
    held: dict[str, int] = {}  # this holder's grant on each media (only we change it)
    while time.time() < deadline or counts["reserved"] + counts["refused"] < MIN_RESERVE_ATTEMPTS:
        mid = rnd.choice(media_ids)
        if rnd.random() < TRUNCATE_SHARE:
            # truncate(1) by a user: give room back, keeping this holder's grant.
            cur = v.media.get(mid).size
            if _settle(v, counts, mid, hid, rnd.randint(0, cur), held.get(mid, 0)):
                counts["truncated"] += 1
            continue
        need = rnd.randint(1, MAX_NEED)
        partial = rnd.random() < 0.5
        try:
            got = v.ledger.reserve(
                mid, hid, need, partial=partial, chunk=rnd.choice((need, 4 * MAX_NEED))
            )
        except QuotaExceeded:
            counts["refused"] += 1
            continue
        counts["reserved"] += 1
        if got.added < need:
            assert partial, f"a non-partial reservation got {got.added} < {need}"
            counts["short"] += 1
        held[mid] = held.get(mid, 0) + got.added
        # Write some of what we hold, then settle, sometimes keeping a rest for later.
        written = rnd.randint(0, held[mid])
        keep = rnd.choice((0, rnd.randint(0, held[mid] - written)))
        cur = v.media.get(mid).size
        if _settle(v, counts, mid, hid, cur + written, keep):
            held[mid] = keep
    release_all(v, hid, held, counts)
    return counts


def main(argv: list[str]) -> int:
    catalog, store, seed, threads = argv[1], argv[2], int(argv[3]), int(argv[4])
    v = Velocity(catalog, store)
    media_ids = all_media_ids(v)
    holders = [v.ledger.register_holder() for _ in range(threads)]
    print("ready", flush=True)
    word, deadline = sys.stdin.readline().split()
    assert word == "go", word
    results: list[dict[str, object]] = [{} for _ in range(threads)]

    def run(i: int) -> None:
        try:
            results[i] = dict(work(v, holders[i], media_ids, seed * 1000 + i, float(deadline)))
        except BaseException:
            results[i] = {"error": traceback.format_exc()}

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for hid in holders:
        v.ledger.retire_holder(hid)
    v.close()
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
