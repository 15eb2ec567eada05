"""The API inside the mount daemon and the mount agree at once, in both directions.

Media created or uploaded through the API is readable in the mount immediately
(no sleep, no attribute timeout to wait out); media and pools removed through
the API are gone from the mount immediately; files copied into the mount with
cp are listed by GET /p/media with their size.
"""

from __future__ import annotations

import os
import socket
import subprocess

import httpx
from support.api import MIB, api_mount_fixture  # noqa: F401


def test_api_and_mount_agree(api_mount, tmp_path):
    s = api_mount(subpools={"tenants/vm": 200}, users=["alice"])
    api = s.api
    alice = s.key("alice")
    vm = s.pids["tenants/vm"]
    mnt_vm = s.mount / "tenants" / "vm"

    # Looked up (and missed) first, so a cached negative entry would show.
    for name in ("api.img", "up.bin", "new-pool"):
        assert not os.path.exists(mnt_vm / name)
    assert os.listdir(mnt_vm) == []

    # Created through the API: there at once, with its size, readable (zeros: sparse).
    api_img = api.create_media(alice, vm, "api.img", 4)["mid"]
    assert os.path.exists(mnt_vm / "api.img")
    assert os.stat(mnt_vm / "api.img").st_size == 4 * MIB
    assert (mnt_vm / "api.img").read_bytes() == bytes(4 * MIB)
    assert os.getxattr(mnt_vm / "api.img", "user.velocity.mid").decode() == api_img

    # Uploaded through the API: there at once, byte for byte.
    content = os.urandom(3 * MIB + 5)
    up = api.upload(alice, vm, "up.bin", content)["mid"]
    assert (mnt_vm / "up.bin").read_bytes() == content
    assert sorted(os.listdir(mnt_vm)) == ["api.img", "up.bin"]

    # Written through the mount into API-made media: the API sees the new size.
    with open(mnt_vm / "api.img", "r+b") as f:
        f.seek(5 * MIB - 3)
        f.write(b"end")
    listed = api.media_names(alice, vm)
    assert listed["api.img"]["size_bytes"] == 5 * MIB
    assert listed["api.img"]["size_mib"] == 5

    # Copied in with cp (and written by Python): listed by the API with the right size.
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(2 * MIB + 7))
    subprocess.run(["cp", str(src), str(mnt_vm / "copied.bin")], check=True, timeout=60)
    (mnt_vm / "written.txt").write_bytes(b"hello")
    listed = api.media_names(alice, vm)
    assert sorted(listed) == ["api.img", "copied.bin", "up.bin", "written.txt"]
    assert listed["copied.bin"]["size_bytes"] == 2 * MIB + 7
    assert listed["copied.bin"]["size_mib"] == round((2 * MIB + 7) / MIB, 6)
    assert listed["up.bin"]["size_mib"] == round((3 * MIB + 5) / MIB, 6)
    assert listed["written.txt"]["size_mib"] == round(5 / MIB, 6)
    assert (
        listed["copied.bin"]["mid"]
        == os.getxattr(mnt_vm / "copied.bin", "user.velocity.mid").decode()
    )
    total = 5 * MIB + 3 * MIB + 5 + 2 * MIB + 7 + 5
    assert s.used("tenants/vm") == {"tenants/vm": total}
    pool, subpool = api.pools(alice, s.gids["acme"])["pools"]  # tenants, tenants/vm
    assert pool["used_mib"] == subpool["used_mib"] == round(total / MIB, 6)

    # Removed through the API: gone from the mount at once, whoever made it.
    assert api.delete_media(alice, api_img) == {}
    assert not os.path.exists(mnt_vm / "api.img")
    assert api.delete_media(alice, listed["copied.bin"]["mid"]) == {}
    assert not os.path.exists(mnt_vm / "copied.bin")
    assert sorted(os.listdir(mnt_vm)) == ["up.bin", "written.txt"]
    assert s.used("tenants/vm") == {"tenants/vm": 3 * MIB + 5 + 5}

    # Removed while open in the mount: the open file keeps working, the name is gone.
    with open(mnt_vm / "up.bin", "rb") as f:
        assert api.delete_media(alice, up) == {}
        assert not os.path.exists(mnt_vm / "up.bin")
        assert f.read() == content
    assert sorted(os.listdir(mnt_vm)) == ["written.txt"]

    # Pools: one made through the API is there at once; one made with mkdir is usable
    # through the API by its pid.
    sub = api.create_pool(alice, vm, "new-pool", 10)["pid"]
    assert os.path.isdir(mnt_vm / "new-pool")
    assert os.getxattr(mnt_vm / "new-pool", "user.velocity.pid").decode() == sub
    os.mkdir(mnt_vm / "made-by-mkdir")
    made = os.getxattr(mnt_vm / "made-by-mkdir", "user.velocity.pid").decode()
    api.upload(alice, made, "in-mkdir.bin", b"via the API")
    assert (mnt_vm / "made-by-mkdir" / "in-mkdir.bin").read_bytes() == b"via the API"
    api.create_media(alice, sub, "deep.img", 1)
    assert os.path.getsize(mnt_vm / "new-pool" / "deep.img") == MIB

    # A pool removed through the API leaves the mount at once, with everything in it.
    assert api.delete_pool(alice, vm) == {}
    assert not os.path.exists(mnt_vm / "new-pool" / "deep.img")
    assert not os.path.exists(mnt_vm / "written.txt")
    assert not os.path.exists(mnt_vm)
    assert os.listdir(s.mount / "tenants") == []
    assert s.used("tenants") == {"tenants": 0}
    assert s.usage("tenants") == {"tenants": 0}


def _answers(port: int) -> bool:
    """Whether anything serves HTTP on 127.0.0.1:PORT (the API's own document)."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).status_code == 200
    except httpx.ConnectError:
        return False


def test_the_mount_serves_the_api_only_when_asked(catalog, mount, tmp_path):
    """Separate failure domains by default: a configuration that names api_listen (for
    velocityfs serve, the API's own unit) does not put the API into the mount's
    process, which carries every VM disk; api_in_mount = true, or --api, does."""
    catalog.setup({"tenants": 16})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "velocityfs.toml"
    env = {**os.environ, "VELOCITYFS_CONFIG": str(config)}

    config.write_text(f'api_listen = "127.0.0.1:{port}"\n')
    alone = mount(env=env)
    assert (alone / "tenants").is_dir()
    assert not _answers(port)
    alone.stop()

    config.write_text(f'api_listen = "127.0.0.1:{port}"\napi_in_mount = true\n')
    together = mount(env=env)
    assert _answers(port)
    together.stop()
