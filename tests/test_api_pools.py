"""The shim's /p endpoints: list a group's pools, create pools, remove pools.

GET /p lists the pools shared with a group that carry velocity.pool.view; only
members of that group (or of the root group) may ask. PUT /p refuses a quota
above the parent's or any ancestor's (406) and a taken name (409). DELETE /p
removes a pool with its subpools and media, their backing files, and gives the
usage back to the ancestors.
"""

from __future__ import annotations

import os
import uuid

from support.api import (
    MIB,
    api_mount_fixture,  # noqa: F401
    backing_file,
    store_files,
)

JSON = {"content-type": "application/json"}
# The six permissions of docs/pool-management-api.md plus media.read and media.write.
ALL_PERMISSIONS = sorted(
    f"velocity.pool.{p}"
    for p in ("view", "create", "remove", "media.view", "media.create", "media.remove")
    + ("media.read", "media.write")
)
NOT_OBJECTS = [b"{", b"gid=1", b"[]", b'"x"', b"7", b"null"]


def test_get_pools(api_mount):
    s = api_mount(
        subpools={"tenants/vm": 100, "tenants/inherit": None},
        shares=[("tenants/inherit", "viewers", ["view"]), ("tenants/vm", "globex", ["media.view"])],
    )
    api = s.api
    acme, globex, viewers, root = (s.gids[g] for g in ("acme", "globex", "viewers", "root"))
    tenants, isos = s.pids["tenants"], s.pids["isos"]

    # acme: tenants (shared with view) and, as shares are inherited, its subpools, root
    # first, each with its parent, its quota (its own or the one it inherits) and the
    # room really left; not 'hidden' (shared with acme, but without view).
    def pool(path: str, parent: str | None, quota: float, used: float, avail: float) -> dict:
        return {
            "pid": s.pids[path],
            "name": path.rpartition("/")[2],
            "parent": parent,
            "quota_mib": quota,
            "used_mib": used,
            "avail_mib": avail,
            "permissions": ALL_PERMISSIONS,
        }

    listed = api.pools(s.key("alice"), acme)
    assert listed == {
        "gid": acme,
        "pools": [
            pool("tenants", None, 1024, 0, 1024),
            pool("tenants/inherit", tenants, 1024, 0, 1024),
            pool("tenants/vm", tenants, 100, 0, 100),
        ],
    }

    # used_mib follows the media of the whole subtree, fractions included; avail_mib is
    # the least room left on the pool's chain.
    api.create_media(s.key("alice"), s.pids["tenants/vm"], "a.img", 3)
    api.create_media(s.key("alice"), tenants, "b.img", "0.5")
    assert api.pools(s.key("alice"), acme)["pools"] == [
        pool("tenants", None, 1024, 3.5, 1020.5),
        pool("tenants/inherit", tenants, 1024, 0, 1020.5),
        pool("tenants/vm", tenants, 100, 3, 97),
    ]

    # viewers: tenants and its subpools, each with the permissions of every share on its
    # chain (tenants' view and media.view; inherit's own view adds nothing).
    pools = api.pools(s.key("vera"), viewers)["pools"]
    assert [(p["name"], p["pid"], p["parent"]) for p in pools] == [
        ("tenants", tenants, None),
        ("inherit", s.pids["tenants/inherit"], tenants),
        ("vm", s.pids["tenants/vm"], tenants),
    ]
    assert {tuple(p["permissions"]) for p in pools} == {
        ("velocity.pool.media.view", "velocity.pool.view")
    }

    # globex: isos; its share of tenants/vm has no view, so vm is not listed.
    assert [p["pid"] for p in api.pools(s.key("bob"), globex)["pools"]] == [isos]

    # Not a member of the group: 404, as for a group that does not exist.
    api.pools(s.key("alice"), globex, status=404)
    api.pools(s.key("alice"), viewers, status=404)
    api.pools(s.key("alice"), root, status=404)
    api.pools(s.key("bob"), acme, status=404)
    api.pools(s.key("vera"), acme, status=404)
    for gid in (acme, globex, viewers, root):
        api.pools(s.key("nobody"), gid, status=404)

    # Members of the root group may list any group.
    admin = s.key("admin")
    assert api.pools(admin, acme) == api.pools(s.key("alice"), acme)
    assert [p["pid"] for p in api.pools(admin, globex)["pools"]] == [isos]
    assert api.pools(admin, root) == {"gid": root, "pools": []}

    # Unknown group: 404, for members of the root group too.
    for key in (s.key("alice"), admin):
        api.pools(key, str(uuid.uuid4()), status=404)
        api.pools(key, "no-such-group", status=404)

    # Missing or malformed gid, bad JSON, not an object: 400.
    key = s.key("alice")
    for body in [{"authkey": key}, {"authkey": key, "gid": ""}, {"authkey": key, "gid": 5}]:
        api.call("GET", "/p", body, status=400)
    api.call("GET", "/p", {"authkey": key, "gid": [acme]}, status=400)
    for raw in NOT_OBJECTS:
        api.call(
            "GET", "/p", content=raw, headers={**JSON, "Authorization": f"Bearer {key}"}, status=400
        )


def test_create_pool(api_mount):
    s = api_mount(subpools={"tenants/inherit": None, "tenants/small": 100})
    api = s.api
    tenants, small, inherit = s.pids["tenants"], s.pids["tenants/small"], s.pids["tenants/inherit"]
    alice = s.key("alice")

    # Quotas as JSON numbers and as numeric strings, fractions included.
    vm1 = api.create_pool(alice, tenants, "vm1", 100)["pid"]
    vm2 = api.create_pool(alice, tenants, "vm2", "200")["pid"]
    vm3 = api.create_pool(alice, tenants, "vm3", 12.5)["pid"]
    vm4 = api.create_pool(alice, tenants, "vm4", "0.5")["pid"]
    full = api.create_pool(alice, tenants, "full", 1024)["pid"]  # equal to the parent's: fits
    zero = api.create_pool(alice, small, "zero", 0)["pid"]
    deep = api.create_pool(alice, small, "deep", 50)["pid"]
    again = api.create_pool(alice, small, "vm1", 10)["pid"]  # same name, other parent
    assert len({vm1, vm2, vm3, vm4, full, zero, deep, again}) == 8

    # Visible in the mount at once.
    for name in ("vm1", "vm2", "vm3", "vm4", "full"):
        assert os.path.isdir(s.mount / "tenants" / name)
    assert os.path.isdir(s.mount / "tenants" / "small" / "deep")
    assert os.path.isdir(s.mount / "tenants" / "small" / "vm1")

    pools = s.pool_list()
    expected = {
        "tenants/vm1": (vm1, tenants, 100 * MIB),
        "tenants/vm2": (vm2, tenants, 200 * MIB),
        "tenants/vm3": (vm3, tenants, int(12.5 * MIB)),
        "tenants/vm4": (vm4, tenants, MIB // 2),
        "tenants/full": (full, tenants, 1024 * MIB),
        "tenants/small/zero": (zero, small, 0),
        "tenants/small/deep": (deep, small, 50 * MIB),
        "tenants/small/vm1": (again, small, 10 * MIB),
    }
    for path, (pid, parent, quota) in expected.items():
        assert (pools[path]["pid"], pools[path]["parent"], pools[path]["quota_bytes"]) == (
            pid,
            parent,
            quota,
        ), path

    # 406: above the parent's quota, or above ANY ancestor's.
    api.create_pool(alice, tenants, "big", 1025, status=406)
    api.create_pool(alice, tenants, "big", "1024.5", status=406)
    api.create_pool(alice, small, "big", 101, status=406)
    api.create_pool(alice, inherit, "big", 2000, status=406)  # inherit has none; tenants has
    api.create_pool(alice, deep, "big", 80, status=406)  # fits small (100), not deep (50)
    api.create_pool(alice, deep, "big", 101, status=406)
    api.create_pool(alice, zero, "big", 1, status=406)

    # 409: the name is taken by a pool or by media (one namespace, as in a directory).
    api.create_pool(alice, tenants, "vm1", 1, status=409)
    api.create_pool(alice, tenants, "small", 1, status=409)
    api.create_media(alice, tenants, "disk.img", 1)
    api.create_pool(alice, tenants, "disk.img", 1, status=409)

    # 404: unknown parent.
    api.create_pool(alice, str(uuid.uuid4()), "x", 1, status=404)

    # 403: without velocity.pool.create on the parent (or any ancestor), where the caller
    # has some other permission; 404 where it has none (as for an unknown parent).
    api.create_pool(s.key("vera"), tenants, "x", 1, status=403)  # view only
    api.create_pool(s.key("vera"), vm1, "x", 1, status=403)
    api.create_pool(s.key("bob"), tenants, "x", 1, status=404)
    api.create_pool(s.key("nobody"), tenants, "x", 1, status=404)
    api.create_pool(alice, s.pids["isos"], "x", 1, status=404)
    # create without view is still create; the root group may create anywhere.
    api.create_pool(alice, s.pids["hidden"], "blind", 10)
    api.create_pool(s.key("admin"), s.pids["isos"], "by-admin", 10)

    # 400: missing or malformed fields, bad JSON, not an object.
    good = {"authkey": alice, "parentpool": tenants, "name": "x", "quota_mib": 1}
    bad_bodies = [
        {k: v for k, v in good.items() if k != field} for field in good if field != "authkey"
    ]
    for value in (
        "abc",
        -1,
        "-1",
        True,
        None,
        [],
        {},
        "",
        "NaN",
        "inf",
        "-inf",
        "1e400",
        "1x",
        10**400,
    ):
        bad_bodies.append({**good, "quota_mib": value})
    for value in ("", "..", ".", "a/b", "a\0b", "x" * 256, 5, None):
        bad_bodies.append({**good, "name": value})
    bad_bodies.append({**good, "parentpool": 7})
    for body in bad_bodies:
        api.call("PUT", "/p", body, status=400)
    # a JSON number too large for a double parses as infinity
    raw_inf = f'{{"parentpool": "{tenants}", "name": "x", "quota_mib": 1e999}}'.encode()
    api.call(
        "PUT",
        "/p",
        content=raw_inf,
        headers={**JSON, "Authorization": f"Bearer {alice}"},
        status=400,
    )
    for raw in NOT_OBJECTS:
        api.call(
            "PUT",
            "/p",
            content=raw,
            headers={**JSON, "Authorization": f"Bearer {alice}"},
            status=400,
        )

    # No refusal created anything.
    after = s.pool_list()
    assert sorted(set(after) - set(pools)) == ["hidden/blind", "isos/by-admin"]
    assert not os.path.exists(s.mount / "tenants" / "x")
    assert not os.path.exists(s.mount / "tenants" / "big")


def test_delete_pool(api_mount):
    s = api_mount(subpools={"tenants/keep": 100, "isos/sub": 50})
    api = s.api
    tenants = s.pids["tenants"]
    alice = s.key("alice")

    doomed = api.create_pool(alice, tenants, "doomed", 300)["pid"]
    inner = api.create_pool(alice, doomed, "inner", 100)["pid"]
    innermost = api.create_pool(alice, inner, "innermost", 100)["pid"]
    mids = [
        api.create_media(alice, doomed, "a.img", 10)["mid"],
        api.create_media(alice, inner, "b.img", 20)["mid"],
        api.upload(alice, inner, "c.bin", b"c" * MIB)["mid"],
        api.create_media(alice, innermost, "d.img", "0.25")["mid"],
    ]
    keep = api.create_media(alice, s.pids["tenants/keep"], "keep.img", 5)["mid"]
    assert (s.mount / "tenants" / "doomed" / "inner" / "c.bin").read_bytes() == b"c" * MIB
    for mid in [*mids, keep]:
        assert backing_file(s.store, mid).is_file()
    assert s.usage("tenants")["tenants"] == (36 * MIB + MIB // 4)

    # 403 without velocity.pool.remove; 404 unknown pid, or one without any share of the
    # caller's; 400 missing or malformed pid.
    api.delete_pool(s.key("vera"), doomed, status=403)
    for user in ("bob", "nobody"):
        api.delete_pool(s.key(user), doomed, status=404)
    api.delete_pool(alice, s.pids["isos"], status=404)
    api.delete_pool(alice, s.pids["isos/sub"], status=404)
    api.delete_pool(alice, str(uuid.uuid4()), status=404)
    api.delete_pool(alice, keep, status=404)  # a media id is no pool id
    for body in [{"authkey": alice}, {"authkey": alice, "pid": 5}, {"authkey": alice, "pid": ""}]:
        api.call("DELETE", "/p", body, status=400)
    for raw in NOT_OBJECTS:
        api.call(
            "DELETE",
            "/p",
            content=raw,
            headers={**JSON, "Authorization": f"Bearer {alice}"},
            status=400,
        )
    assert os.path.isdir(s.mount / "tenants" / "doomed" / "inner")

    # Removing it takes the subpools, the media, the backing files and the usage.
    assert api.delete_pool(alice, doomed) == {}
    for mid in mids:
        assert not backing_file(s.store, mid).exists()
    assert store_files(s.store) == {str(backing_file(s.store, keep).relative_to(s.store))}
    assert s.usage("tenants", "tenants/keep") == {"tenants": 5 * MIB, "tenants/keep": 5 * MIB}
    assert "doomed" not in os.listdir(s.mount / "tenants")
    assert not os.path.exists(s.mount / "tenants" / "doomed" / "inner" / "c.bin")
    for pid in (doomed, inner, innermost):
        api.media(alice, pid, status=404)
        api.delete_pool(alice, pid, status=404)
    assert [m["mid"] for m in api.media(alice, s.pids["tenants/keep"])["media"]] == [keep]
    assert set(s.pool_list()) == {"tenants", "tenants/keep", "isos", "isos/sub", "hidden"}

    # The root group may remove any pool; a root pool goes with its shares.
    api.create_media(s.key("bob"), s.pids["isos/sub"], "x.iso", 1)
    assert api.delete_pool(s.key("admin"), s.pids["isos"]) == {}
    assert api.pools(s.key("bob"), s.gids["globex"])["pools"] == []
    assert "isos" not in os.listdir(s.mount)
    assert store_files(s.store) == {str(backing_file(s.store, keep).relative_to(s.store))}
