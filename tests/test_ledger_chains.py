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
