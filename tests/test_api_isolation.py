"""Groups are isolated: a pool shared only with group B is out of reach for group A.

Alice (group acme) may do everything in 'tenants'; Bob (group globex) in 'isos'.
Neither may list, create in, upload to, list media of, or remove anything from
the other's pools, and a refused request changes nothing anywhere. What a caller
has no share on does not exist for it (404, as an unknown id); 403 is for a pool
it has some permission on, but not the one asked for. Members of the root group
may act on every pool.
"""

from __future__ import annotations

import os

from support.api import (
    MIB,
    UPLOAD_TEMPLATE,
    api_mount_fixture,  # noqa: F401
    store_files,
    upload_target,
)


def snapshot(s, key_by_pool: dict[str, str]) -> dict[str, object]:
    """Everything a refused request could have changed, seen by the pools' own users."""
    api = s.api
    return {
        "media": {p: api.media(k, s.pids[p])["media"] for p, k in key_by_pool.items()},
        "pools": sorted(d for d, _, _ in os.walk(s.mount)),
        "files": store_files(s.store),
        "used": s.used(*key_by_pool),
        "mount": {p: sorted(os.listdir(s.mount / p)) for p in key_by_pool},
    }


def test_groups_are_isolated(api_mount):
    s = api_mount(subpools={"isos/sub": 50, "tenants/vm": 100})
    api = s.api
    alice, bob = s.key("alice"), s.key("bob")
    isos, isos_sub = s.pids["isos"], s.pids["isos/sub"]
    tenants, vm = s.pids["tenants"], s.pids["tenants/vm"]

    bob_iso = api.upload(bob, isos, "b.iso", b"bob's" * 1000)["mid"]
    bob_img = api.create_media(bob, isos_sub, "c.img", 5)["mid"]
    alice_img = api.upload(alice, vm, "a.img", b"alice's" * 1000)["mid"]
    alice_raw = api.create_media(alice, tenants, "a.raw", 3)["mid"]
    owners = {"isos": bob, "isos/sub": bob, "tenants": alice, "tenants/vm": alice}
    before = snapshot(s, owners)

    def refused_everywhere(key: str, gid: str, pids: list[str], mids: list[str]) -> None:
        api.pools(key, gid, status=404)
        for pid in pids:
            api.create_pool(key, pid, "intruder", 1, status=404)
            api.create_media(key, pid, "intruder.img", 1, status=404)
            api.upload(key, pid, "intruder.img", b"x" * 1000, status=404)
            # refused before the body, even when its length could never fit
            api.raw(
                "PUT",
                upload_target(key, pid, "intruder.img"),
                UPLOAD_TEMPLATE,
                headers={"Content-Length": str(1 << 40)},
                status=404,
            )
            api.media(key, pid, status=404)
            api.delete_pool(key, pid, status=404)
        for mid in mids:
            api.delete_media(key, mid, status=404)

    # Alice (acme) against globex's pools, Bob (globex) against acme's.
    refused_everywhere(alice, s.gids["globex"], [isos, isos_sub], [bob_iso, bob_img])
    refused_everywhere(bob, s.gids["acme"], [tenants, vm], [alice_img, alice_raw])
    # A user in no group, and one whose group may only look at tenants.
    refused_everywhere(s.key("nobody"), s.gids["acme"], [isos, tenants], [bob_iso, alice_img])
    refused_everywhere(s.key("vera"), s.gids["globex"], [isos, isos_sub], [bob_iso, bob_img])
    vera = s.key("vera")
    for pid in (tenants, vm):
        api.create_pool(vera, pid, "intruder", 1, status=403)
        api.create_media(vera, pid, "intruder.img", 1, status=403)
        api.upload(vera, pid, "intruder.img", b"x", status=403)
        api.delete_pool(vera, pid, status=403)
    api.delete_media(vera, alice_img, status=403)

    assert snapshot(s, owners) == before
    assert (s.mount / "isos" / "b.iso").read_bytes() == b"bob's" * 1000
    assert (s.mount / "tenants" / "vm" / "a.img").read_bytes() == b"alice's" * 1000

    # Each still sees only their own pools.
    assert [p["name"] for p in api.pools(alice, s.gids["acme"])["pools"]] == ["tenants", "vm"]
    assert [p["name"] for p in api.pools(bob, s.gids["globex"])["pools"]] == ["isos", "sub"]

    # The root group may act on both sides.
    admin = s.key("admin")
    assert [p["pid"] for p in api.pools(admin, s.gids["globex"])["pools"]] == [isos, isos_sub]
    assert {m["mid"] for m in api.media(admin, isos)["media"]} == {bob_iso}
    assert api.delete_media(admin, bob_img) == {}
    assert api.delete_media(admin, alice_raw) == {}
    assert s.used("isos", "tenants") == {"isos": 5000, "tenants": 7000}
    assert not os.path.exists(s.mount / "isos" / "sub" / "c.img")
    assert s.used("isos/sub") == {"isos/sub": 0}
    assert before["used"]["isos/sub"] == 5 * MIB  # type: ignore[index]
