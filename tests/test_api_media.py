"""The shim's /p/media endpoints with JSON bodies: list, create (sparse) and remove media.

PUT /p/media creates a sparse file of size_mib whose full size is charged to the
pool and every ancestor; 413 when any of their quotas would be passed, 409 for a
taken name. DELETE /p/media removes the media, its backing file and its charge.
"""

from __future__ import annotations

import errno
import os
import time
import uuid

import pytest
from support.api import (
    MIB,
    api_mount_fixture,  # noqa: F401
    backing_file,
    store_files,
)
from support.fs import sync_dir

JSON = {"content-type": "application/json"}
NOT_OBJECTS = [b"{", b"pid=1", b"[]", b'"x"', b"7", b"null"]


def test_media_create_list_delete(api_mount):
    s = api_mount(subpools={"tenants/vm": 100, "tenants/loose": 1000})
    api = s.api
    tenants, vm, loose = s.pids["tenants"], s.pids["tenants/vm"], s.pids["tenants/loose"]
    alice = s.key("alice")
    mnt_vm = s.mount / "tenants" / "vm"

    assert api.media(alice, vm) == {"pid": vm, "media": []}
    assert not os.path.exists(mnt_vm / "disk.img")

    # A sparse file of size_mib, charged in full to the pool and its ancestors.
    made = api.create_media(alice, vm, "disk.img", 16)
    assert made["pid"] == vm and made["filename"] == "disk.img"
    disk = made["mid"]
    st = os.stat(backing_file(s.store, disk))
    assert st.st_size == 16 * MIB
    assert st.st_blocks * 512 < MIB, "the backing file is not sparse"
    assert os.stat(mnt_vm / "disk.img").st_size == 16 * MIB
    with open(mnt_vm / "disk.img", "rb") as f:
        assert f.read(MIB) == bytes(MIB)
    assert s.usage("tenants", "tenants/vm") == {"tenants": 16 * MIB, "tenants/vm": 16 * MIB}
    assert s.used("tenants", "tenants/vm") == {"tenants": 16 * MIB, "tenants/vm": 16 * MIB}

    # Sizes as numbers or numeric strings, fractions and zero included.
    half = api.create_media(alice, vm, "half.img", "0.5")["mid"]
    three = api.create_media(alice, vm, "three.img", "3")["mid"]
    empty = api.create_media(alice, vm, "empty.img", 0)["mid"]
    listed = api.media(alice, vm)
    assert listed["pid"] == vm
    assert [(m["filename"], m["mid"], m["size_mib"]) for m in listed["media"]] == [
        ("disk.img", disk, 16),
        ("empty.img", empty, 0),
        ("half.img", half, 0.5),
        ("three.img", three, 3),
    ]
    assert os.path.getsize(mnt_vm / "half.img") == MIB // 2

    # 409: the name is taken by media or by a subpool.
    sub = api.create_pool(alice, vm, "sub", 10)["pid"]
    api.create_media(alice, vm, "disk.img", 1, status=409)
    api.create_media(alice, vm, "sub", 1, status=409)
    api.create_media(alice, sub, "disk.img", 1)  # same name, another pool

    # 413 at the pool's own quota: exactly the room fits, one byte more does not.
    used = 16 * MIB + MIB // 2 + 3 * MIB + MIB
    api.create_media(alice, vm, "too-big.img", 100 - 20.5 + 0.001, status=413)
    api.create_media(alice, sub, "too-big.img", 11, status=413)
    fill = api.create_media(alice, vm, "fill.img", 100 - 20.5)["mid"]
    api.create_media(alice, vm, "crumb.img", 0.001, status=413)
    api.create_media(alice, sub, "crumb.img", 0.001, status=413)  # sub has room, vm not
    assert s.used("tenants/vm")["tenants/vm"] == 100 * MIB
    api.delete_media(alice, fill)
    assert s.used("tenants/vm")["tenants/vm"] == used

    # 413 at an ANCESTOR's quota: loose allows 1000 MiB, but tenants has only 103.5 left.
    api.create_media(alice, tenants, "filler.img", 900)
    files = store_files(s.store)
    room = 1024 * MIB - used - 900 * MIB
    api.create_media(alice, loose, "big.img", 200, status=413)
    api.create_media(alice, loose, "big.img", room / MIB + 0.001, status=413)
    assert store_files(s.store) == files
    assert s.used("tenants", "tenants/vm", "tenants/loose") == {
        "tenants": used + 900 * MIB,
        "tenants/vm": used,
        "tenants/loose": 0,
    }
    for name in ("too-big.img", "crumb.img", "big.img"):
        assert not os.path.exists(mnt_vm / name)
        assert not os.path.exists(s.mount / "tenants" / "loose" / name)

    # 404 unknown pool, or one the caller has no share on; 403 without
    # velocity.pool.media.create where it has some other permission.
    api.create_media(alice, str(uuid.uuid4()), "x.img", 1, status=404)
    api.create_media(s.key("vera"), vm, "x.img", 1, status=403)
    api.create_media(s.key("bob"), vm, "x.img", 1, status=404)
    api.create_media(s.key("nobody"), tenants, "x.img", 1, status=404)
    api.create_media(alice, s.pids["isos"], "x.img", 1, status=404)
    api.create_media(alice, s.pids["hidden"], "blind.img", 1)  # create without view is fine

    # 400: missing or malformed fields, bad JSON, not an object.
    good = {"authkey": alice, "pid": vm, "filename": "x.img", "size_mib": 1}
    bodies = [{k: v for k, v in good.items() if k != f} for f in ("pid", "filename", "size_mib")]
    for value in (-1, "-0.5", "abc", True, None, [], "", "nan", "inf", 10**400):
        bodies.append({**good, "size_mib": value})
    for value in ("", ".", "..", "a/b", "a\0b", "x" * 256, "é" * 128, 5, None):
        bodies.append({**good, "filename": value})
    bodies.append({**good, "pid": 5})
    for body in bodies:
        api.call("PUT", "/p/media", body, status=400)
    auth = {**JSON, "Authorization": f"Bearer {alice}"}
    for raw in NOT_OBJECTS:
        api.call("PUT", "/p/media", content=raw, headers=auth, status=400)
    assert not os.path.exists(mnt_vm / "x.img")
    api.create_media(alice, vm, "y" * 255, 0)  # the longest name that fits
    assert os.path.exists(mnt_vm / ("y" * 255))

    # GET /p/media: media.view is needed (a share of an ancestor counts); 404; 400.
    names = sorted(m["filename"] for m in api.media(alice, vm)["media"])
    assert sorted(m["filename"] for m in api.media(s.key("vera"), vm)["media"]) == names
    assert sorted(os.listdir(mnt_vm)) == sorted([*names, "sub"])
    api.media(s.key("bob"), vm, status=404)  # no share there: as if it did not exist
    api.media(s.key("nobody"), vm, status=404)
    api.media(alice, s.pids["isos"], status=404)
    assert [m["filename"] for m in api.media(alice, s.pids["hidden"])["media"]] == ["blind.img"]
    assert [m["filename"] for m in api.media(s.key("admin"), sub)["media"]] == ["disk.img"]
    api.media(alice, str(uuid.uuid4()), status=404)
    api.media(alice, disk, status=404)  # a media id is no pool id
    for body in ({"authkey": alice}, {"authkey": alice, "pid": ""}, {"authkey": alice, "pid": 1}):
        api.call("GET", "/p/media", body, status=400)
    for raw in NOT_OBJECTS:
        api.call("GET", "/p/media", content=raw, headers=auth, status=400)

    # DELETE /p/media: 403 without media.remove, 404 unknown (or no share on its pool),
    # 400 malformed; nothing changes.
    before = (api.media(alice, vm), store_files(s.store), s.used("tenants"))
    api.delete_media(s.key("vera"), disk, status=403)
    api.delete_media(s.key("bob"), disk, status=404)
    api.delete_media(s.key("nobody"), disk, status=404)
    api.delete_media(alice, str(uuid.uuid4()), status=404)
    api.delete_media(alice, vm, status=404)  # a pool id is no media id
    for body in ({"authkey": alice}, {"authkey": alice, "mid": ""}, {"authkey": alice, "mid": 3}):
        api.call("DELETE", "/p/media", body, status=400)
    for raw in NOT_OBJECTS:
        api.call("DELETE", "/p/media", content=raw, headers=auth, status=400)
    assert (api.media(alice, vm), store_files(s.store), s.used("tenants")) == before

    # Removing media takes its backing file and its charge, and it leaves the mount.
    assert api.delete_media(alice, disk) == {}
    assert not backing_file(s.store, disk).exists()
    assert not os.path.exists(mnt_vm / "disk.img")
    assert "disk.img" not in [m["filename"] for m in api.media(alice, vm)["media"]]
    assert s.used("tenants/vm")["tenants/vm"] == used - 16 * MIB
    api.delete_media(alice, disk, status=404)
    assert api.delete_media(s.key("admin"), half) == {}  # the root group may
    assert s.usage("tenants/vm")["tenants/vm"] == used - 16 * MIB - MIB // 2


def test_a_refusal_names_the_pool_that_is_full(api_mount):
    """The quota that refuses may be an ancestor's: the 413 names that pool, not the
    one written to, which still has room of its own."""
    s = api_mount(subpools={"tenants/b": 100})
    api, key = s.api, s.key("alice")
    b = s.pids["tenants/b"]
    api.create_media(key, s.pids["tenants"], "big.img", 1000)  # tenants: 24 MiB left
    refused = api.create_media(key, b, "vm.img", 50, status=413)
    assert refused["error"].startswith("pool 'tenants' is full: 25165824 bytes left"), refused
    refused = api.upload(key, b, "seed.iso", bytes(30 << 20), status=413)
    assert "'tenants'" in refused["error"], refused
    # On the mount: ENOSPC, and the daemon's log line names the full pool too.
    fd = os.open(s.mount / "tenants" / "b" / "dd.img", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as refused_write:
            for _ in range(30):
                os.write(fd, bytes(1 << 20))
    finally:
        os.close(fd)
    assert refused_write.value.errno == errno.ENOSPC
    deadline = time.monotonic() + 10
    while "pool 'tenants' is full" not in s.mount.log:
        assert time.monotonic() < deadline, s.mount.log
        time.sleep(0.05)
    os.unlink(s.mount / "tenants" / "b" / "dd.img")
    sync_dir(s.mount / "tenants" / "b")
    api.create_media(key, b, "vm.img", 24)  # what is left fits, exactly
