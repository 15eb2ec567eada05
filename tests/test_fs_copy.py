"""cp, cp -a, rsync -a and rsync -aX round trips through a real mount.

A tree goes INTO a pool and back OUT again; contents are compared by sha256,
and for the preserving tools also modes, owners, mtimes (ns) and user xattrs.
The tree has small and empty files, a sparse file made with ``truncate -s``,
a 200 MiB file, names with spaces and unicode, and nested directories (which
become subpools in the mount).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support.fs import MIB, file_sizes, manifest, run, used

pytestmark = [
    pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True),
    pytest.mark.watchdog(200),
]


BIG = 200 * MIB
SPARSE = 64 * MIB
BASE_MTIME_NS = 1_600_000_000_123_456_789


def _xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    """user.* attributes of every entry below root (what rsync -X and cp -a copy)."""
    found: dict[str, dict[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            names = sorted(n for n in os.listxattr(p) if n.startswith("user."))
            if names:
                found[str(p.relative_to(root))] = {n: os.getxattr(p, n) for n in names}
    return found


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """The tree to copy (built once per module) with its manifest and xattrs."""
    src = tmp_path_factory.mktemp("copy") / "src"
    src.mkdir()
    files: dict[str, bytes | None] = {
        "small.txt": b"hello, pool!\n",
        "empty": b"",
        "odd.bin": os.urandom(4097),
        "run.sh": b"#!/bin/sh\necho hi\n",
        "with space.img": os.urandom(100 * 1024),
        "ünïcødé 日本語.iso": os.urandom(64 * 1024 + 1),
        "sub one/nested.txt": b"nested\n" * 1000,
        "sub one/deeper ü/leaf.dat": os.urandom(MIB + 3),
        "sub one/deeper ü/empty dir/keep": b"k",
    }
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data or b"")
    (src / "empty pool").mkdir()

    big = src / "big.bin"
    with open(big, "wb") as f:
        for _ in range(BIG // (8 * MIB)):
            f.write(os.urandom(8 * MIB))

    sparse = src / "sparse.raw"
    run("truncate", "-s", str(SPARSE), sparse)
    with open(sparse, "r+b") as f:
        f.seek(MIB)
        f.write(b"data in the middle of a hole" * 100)
        f.seek(SPARSE - 5)
        f.write(b"tail!")
    assert os.stat(sparse).st_blocks * 512 < SPARSE // 4, "source file is not sparse"

    os.chmod(src / "odd.bin", 0o600)
    os.chmod(src / "run.sh", 0o755)
    os.chmod(src / "with space.img", 0o640)
    os.chmod(src / "sub one", 0o750)
    os.chmod(src / "sub one/deeper ü", 0o700)
    os.chown(src / "sub one/nested.txt", 1234, 5678)
    os.chown(src / "sub one/deeper ü", 4321, 8765)

    os.setxattr(src / "small.txt", "user.comment", b"a note")
    os.setxattr(src / "big.bin", "user.checksum.kind", b"sha256")
    os.setxattr(src / "sub one", "user.owner", "équipe".encode())

    # Distinct mtimes with nanoseconds, deepest entries first so parents keep theirs.
    entries = sorted(src.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for i, p in enumerate(entries):
        t = BASE_MTIME_NS + i * 1_000_003_007
        os.utime(p, ns=(t, t))
    return src, manifest(src), _xattrs(src)


# (copy in, copy out) command lines; {src} and {dst} are directories.
TOOLS = {
    "cp": (["cp", "-r", "{src}", "{dst}"], ["cp", "-r", "{src}", "{dst}"]),
    "cp-a": (["cp", "-a", "{src}", "{dst}"], ["cp", "-a", "{src}", "{dst}"]),
    "rsync-a": (["rsync", "-a", "{src}/", "{dst}/"], ["rsync", "-a", "{src}/", "{dst}/"]),
    "rsync-aX": (["rsync", "-aX", "{src}/", "{dst}/"], ["rsync", "-aX", "{src}/", "{dst}/"]),
}
PRESERVES_META = {"cp-a", "rsync-a", "rsync-aX"}
PRESERVES_XATTRS = {"cp-a", "rsync-aX"}


def _copy(template: list[str], src: Path, dst: Path) -> None:
    run(*[arg.format(src=src, dst=dst) for arg in template], timeout=180)


@pytest.mark.parametrize("tool", list(TOOLS))
def test_round_trip(tool, source, catalog, mount, tmp_path):
    src, src_manifest, src_xattrs = source
    catalog.setup({"tenants": 1024})
    m = mount()
    inside = m / "tenants" / "copy"
    out = tmp_path / "out"
    copy_in, copy_out = TOOLS[tool]

    _copy(copy_in, src, inside)
    _copy(copy_out, inside, out)

    meta = tool in PRESERVES_META
    expected = manifest(src, meta=meta) if not meta else src_manifest
    assert manifest(inside, meta=meta) == expected
    assert manifest(out, meta=meta) == expected
    if meta:
        # The copied directory itself (a subpool) also keeps the source's mode and mtime.
        assert os.stat(inside).st_mtime_ns == os.stat(src).st_mtime_ns
        assert os.stat(inside).st_mode == os.stat(src).st_mode
    if tool in PRESERVES_XATTRS:
        assert _xattrs(inside) == src_xattrs
        assert _xattrs(out) == src_xattrs

    # Directories became subpools; usage counts the apparent size of every file,
    # the sparse one included, with no grant left behind after the tools closed.
    total = file_sizes(src)
    assert total > BIG + SPARSE
    assert (inside / "sub one" / "deeper ü").is_dir()
    assert used(inside) == total
    assert used(m / "tenants") == total
    assert catalog.pool("tenants")["used_bytes"] == total
    assert catalog.pool("tenants/copy/sub one")["used_bytes"] == file_sizes(src / "sub one")
    assert os.stat(inside / "sparse.raw").st_size == SPARSE
    assert os.stat(inside / "big.bin").st_size == BIG


@pytest.mark.parametrize("sparse_flag", ["--sparse=always", "--sparse=auto"])
def test_cp_keeps_sparse_file_sparse(sparse_flag, catalog, mount, tmp_path):
    """cp writes holes as holes: the backing file stays sparse, usage counts its full size."""
    catalog.setup({"tenants": 256})
    m = mount()
    src = tmp_path / "disk.raw"
    run("truncate", "-s", str(SPARSE), src)
    with open(src, "r+b") as f:
        f.seek(3 * MIB)
        f.write(b"x" * 8192)
    dst = m / "tenants" / "disk.raw"
    run("cp", sparse_flag, src, dst)
    st = os.stat(dst)
    assert st.st_size == SPARSE
    backing = os.getxattr(dst, "user.velocity.backing_path").decode()
    assert os.stat(backing).st_blocks * 512 < SPARSE // 4
    assert st.st_blocks * 512 < SPARSE // 4
    assert used(m / "tenants") == SPARSE
    run("cmp", src, dst)


@pytest.mark.parametrize("tool", ["cp", "rsync"])
def test_copy_into_too_small_pool_fails_cleanly(tool, catalog, mount, tmp_path):
    """ENOSPC mid-copy: the tool reports it, and usage is what the pool really holds."""
    catalog.setup({"tenants": 8})
    m = mount()
    src = tmp_path / "big.img"
    src.write_bytes(os.urandom(12 * MIB))
    dst = m / "tenants" / "big.img"
    cmd = ["cp", str(src), str(dst)] if tool == "cp" else ["rsync", str(src), str(dst)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode != 0
    assert "No space left on device" in res.stderr, res.stderr
    left = file_sizes(m / "tenants")
    if tool == "rsync":
        assert os.listdir(m / "tenants") == []  # rsync removed its temporary file
    else:
        assert os.stat(dst).st_size == 8 * MIB  # cp wrote what fit
        with open(src, "rb") as f:
            assert dst.read_bytes() == f.read(8 * MIB)
    assert used(m / "tenants") == left
    assert catalog.pool("tenants")["used_bytes"] == left


def test_updates_replace_and_release(catalog, mount, tmp_path):
    """rsync again after changes (temp file + rename over the old media), rsync --inplace,
    and cp over an existing file: usage follows the new sizes, nothing is left behind."""
    catalog.setup({"tenants": 64})
    m = mount()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.img").write_bytes(os.urandom(6 * MIB))
    (src / "sub" / "b.img").write_bytes(os.urandom(3 * MIB))
    dst = m / "tenants" / "dst"
    run("rsync", "-a", f"{src}/", f"{dst}/")
    assert used(dst) == 9 * MIB
    old_backing = os.getxattr(dst / "a.img", "user.velocity.backing_path").decode()

    (src / "a.img").write_bytes(os.urandom(2 * MIB))  # smaller now
    (src / "sub" / "b.img").write_bytes(os.urandom(5 * MIB))  # bigger now
    (src / "sub" / "c.img").write_bytes(os.urandom(MIB))
    run("rsync", "-a", "--delete", f"{src}/", f"{dst}/")
    assert manifest(dst, meta=False) == manifest(src, meta=False)
    assert not os.path.exists(old_backing)  # the replaced media's file is gone
    assert used(dst) == 8 * MIB
    assert used(dst / "sub") == 6 * MIB

    (src / "sub" / "b.img").write_bytes(os.urandom(4 * MIB))
    run("rsync", "-a", "--inplace", f"{src}/", f"{dst}/")
    assert manifest(dst, meta=False) == manifest(src, meta=False)
    assert used(dst) == 7 * MIB

    run("cp", src / "sub" / "c.img", dst / "a.img")  # 1 MiB over 2 MiB
    assert os.stat(dst / "a.img").st_size == MIB
    (src / "sub" / "c.img").unlink()
    run("rsync", "-a", "--delete", f"{src}/sub/", f"{dst}/sub/")
    assert sorted(os.listdir(dst / "sub")) == ["b.img"]
    assert used(dst) == 5 * MIB == file_sizes(dst)
    assert catalog.pool("tenants")["used_bytes"] == 5 * MIB


def test_overwrite_truncates(catalog, mount):
    """open(O_TRUNC) of an existing media (shell >, open "wb", cp over it) empties it first."""
    catalog.setup({"tenants": 64})
    m = mount()
    path = m / "tenants" / "disk.img"
    path.write_bytes(os.urandom(4 * MIB))
    with open(path, "wb") as f:
        f.write(b"short")
    assert path.read_bytes() == b"short"
    assert used(m / "tenants") == 5
    run("sh", "-c", f"echo hi > '{path}'")
    assert path.read_bytes() == b"hi\n"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 0
    assert used(m / "tenants") == 0
    with open(path, "rb+") as f:  # no O_TRUNC: the bytes stay
        f.write(b"abc")
    path.write_bytes(b"0123456789")
    with open(path, "r+b") as f:
        f.write(b"AB")
    assert path.read_bytes() == b"AB23456789"
    assert used(m / "tenants") == 10
    assert catalog.pool("tenants")["used_bytes"] == 10
