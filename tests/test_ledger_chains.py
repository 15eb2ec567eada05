"""The ledger's remembered pool chains never charge the wrong ancestors after a move."""

from pathlib import Path

from velocityfs.service.velocity import Velocity

MIB = 1 << 20


def test_a_moved_pool_charges_its_new_ancestors(catalog_url: str, store_dir: Path) -> None:
    v = Velocity(catalog_url, store_dir)
    v.init()
    a = v.pools.create(None, "a", 100 * MIB)
    b = v.pools.create(None, "b", 100 * MIB)
    x = v.pools.create(a.id, "x", None)
    media = v.media.create(x.id, "disk.img")
    holder = v.ledger.register_holder()
    v.ledger.settle(media.id, holder, 1 * MIB)  # remembers x -> a
    assert v.pools.get(a.id).used_bytes == 1 * MIB

    v.pools.rename(x.id, b.id, "x")  # x now hangs under b; the memory says a
    assert (v.pools.get(a.id).used_bytes, v.pools.get(b.id).used_bytes) == (0, 1 * MIB)

    v.ledger.settle(media.id, holder, 3 * MIB)
    assert v.pools.get(a.id).used_bytes == 0
    assert v.pools.get(b.id).used_bytes == 3 * MIB
    assert v.pools.get(x.id).used_bytes == 3 * MIB
    v.close()


def test_a_moved_pool_outlives_the_ancestor_it_was_remembered_under(
    catalog_url: str, store_dir: Path
) -> None:
    """The memory says x hangs under a, which is gone: that is a stale hint, not a
    missing pool (found by tests/test_fs_stress.py: rmdir answered ENOENT)."""
    v = Velocity(catalog_url, store_dir)
    v.init()
    top = v.pools.create(None, "top", 100 * MIB)
    a = v.pools.create(top.id, "a", None)
    b = v.pools.create(top.id, "b", None)
    x = v.pools.create(a.id, "x", None)
    media = v.media.create(x.id, "disk.img")
    holder = v.ledger.register_holder()
    v.ledger.settle(media.id, holder, 1 * MIB)  # remembers x -> a -> top

    v.pools.rename(x.id, b.id, "x")
    v.pools.remove(a.id)
    v.ledger.settle(media.id, holder, 2 * MIB)
    assert v.pools.get(b.id).used_bytes == v.pools.get(top.id).used_bytes == 2 * MIB
    v.media.remove(media.id)
    v.pools.remove(x.id)
    assert {p.name for p in v.pools.all()} == {"top", "b"}
    v.close()
