"""libvirt on a mount (issue 19): a ``dir`` storage pool whose target is a velocityfs
pool, as the README shows it. libvirt sees the pool's quota as the pool's capacity,
makes qcow2 and raw volumes and uploads into them, and reports the quota reached as
ENOSPC in its own words. A real libvirtd (tests/support/libvirt.py) on a real mount,
on SQLite and PostgreSQL.
"""

from __future__ import annotations

import subprocess

from support.admin import MIB, pattern, sha256_bytes, sha256_of
from support.libvirt import private_libvirtd

QUOTA = 64 * MIB


def test_a_libvirt_dir_pool_on_a_velocityfs_pool(vcli, mount, tmp_path):
    vcli("init")
    vcli("pool", "create", "vms", "--quota-mib", str(QUOTA // MIB))
    seed = pattern(30 * MIB)
    (tmp_path / "seed.raw").write_bytes(seed)
    (tmp_path / "big.raw").write_bytes(pattern(40 * MIB, seed=1))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "big.raw", "big.qcow2"],
        cwd=tmp_path,
        check=True,
        timeout=60,
    )
    m = mount()
    target = m / "vms"

    with private_libvirtd(tmp_path / "libvirt") as virsh:
        virsh("pool-define-as", "vms", "dir", "--target", str(target))
        virsh("pool-start", "vms")
        info = virsh.pool_info("vms")
        assert (info["State"], int(info["Capacity"])) == ("running", QUOTA)

        virsh("vol-create-as", "vms", "disk0.qcow2", "20M", "--format", "qcow2")
        image = subprocess.run(
            ["qemu-img", "info", "--output=json", str(target / "disk0.qcow2")],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        assert '"format": "qcow2"' in image and '"virtual-size": 20971520' in image

        virsh("vol-create-as", "vms", "seed.raw", "30M", "--format", "raw")
        virsh("vol-upload", "--pool", "vms", "seed.raw", str(tmp_path / "seed.raw"))
        assert sha256_of(target / "seed.raw") == sha256_bytes(seed)
        listed = {d["name"]: d for d in vcli("media", "list", "vms", "--json").json()}
        assert set(listed) == {"disk0.qcow2", "seed.raw"}
        assert listed["seed.raw"]["size_bytes"] == 30 * MIB

        # an upload past the quota: libvirt's error is the mount's ENOSPC
        virsh("vol-create-as", "vms", "up.qcow2", "40M", "--format", "qcow2")
        res = virsh(
            "vol-upload", "--pool", "vms", "up.qcow2", str(tmp_path / "big.qcow2"), check=False
        )
        assert res.returncode == 1
        assert "error: cannot send data to volume up.qcow2" in res.stderr, res.stderr
        assert f"Unable to write {target / 'up.qcow2'}: No space left on device" in res.stderr
        virsh("pool-refresh", "vms")
        info = virsh.pool_info("vms")
        pool = vcli("pool", "show", "vms", "--json").json()
        assert int(info["Available"]) == pool["avail_bytes"] < MIB
        assert pool["used_bytes"] <= QUOTA

        # a fully allocated raw volume that does not fit: refused, and nothing left of it
        res = virsh("vol-create-as", "vms", "big.raw", "10M", "--format", "raw", check=False)
        assert res.returncode == 1
        assert (
            f"cannot extend file '{target / 'big.raw'}': No space left on device" in res.stderr
        ), res.stderr
        assert not (target / "big.raw").exists()

        # deleting a volume gives its room back
        virsh("vol-delete", "--pool", "vms", "up.qcow2")
        virsh("pool-refresh", "vms")
        assert int(virsh.pool_info("vms")["Available"]) > 30 * MIB
        virsh("vol-create-as", "vms", "big.raw", "10M", "--format", "raw")
        assert (target / "big.raw").stat().st_size == 10 * MIB

        virsh("pool-destroy", "vms")
        virsh("pool-undefine", "vms")
    assert sorted(p.name for p in target.iterdir()) == ["big.raw", "disk0.qcow2", "seed.raw"]
