"""The users' own workloads for scripts/bench/fs.py: rsync of a media tree, VM disk I/O
(fio, 4 KiB random, psync, iodepth 1) and qemu-img convert of a sparse image.

Each function times one run on one target and returns (seconds or a rate, operations),
the operations being what fs.py divides a velocityfs row's request and transaction
counts by: files for rsync, I/Os for fio, MiB of the image for qemu-img.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

MIB = 1 << 20
SMALL_FILE = 4096
TREE_DIRS = 10


def make_tree(top: Path, files: int, big_mib: int) -> int:
    """A media tree as users copy one: ``files`` 4 KiB files in TREE_DIRS directories
    and one ``big_mib`` MiB image; returns how many files it holds."""
    rng = random.Random(0)
    for d in range(TREE_DIRS):
        (top / f"dir{d:02d}").mkdir(parents=True)
    for i in range(files):
        path = top / f"dir{i % TREE_DIRS:02d}" / f"file{i:05d}.iso"
        path.write_bytes(rng.randbytes(SMALL_FILE))
    block = rng.randbytes(MIB)
    with open(top / "disk.img", "wb") as image:
        for _ in range(big_mib):
            image.write(block)
    return files + 1


def timed_rsync(source: Path, dest: Path) -> float:
    """``rsync -a`` of a tree into a new directory (its temporary names, renames, chmod
    and utimes included, as users run it)."""
    start = time.perf_counter()
    subprocess.run(["rsync", "-a", f"{source}/", f"{dest}/"], check=True)
    return time.perf_counter() - start


def fio(path: Path, rw: str, size_mib: int, seconds: float) -> tuple[float, int]:
    """IOPS and I/Os of ``fio`` 4 KiB ``rw`` (randread or randwrite) on ``path``, psync,
    iodepth 1, for ``seconds``; the file is laid out first (not timed) if missing."""
    common = [
        "fio",
        "--name=bench",
        f"--filename={path}",
        f"--size={size_mib}M",
        "--bs=4k",
        "--ioengine=psync",
        "--iodepth=1",
        "--fallocate=none",
        "--randrepeat=1",
        "--output-format=json",
    ]
    if not path.exists():
        subprocess.run([*common, "--rw=write", "--bs=1M"], check=True, capture_output=True)
    done = subprocess.run(
        [*common, f"--rw={rw}", f"--runtime={seconds}", "--time_based"],
        check=True,
        capture_output=True,
        text=True,
    )
    job = json.loads(done.stdout)["jobs"][0]
    side = job["read" if rw == "randread" else "write"]
    return float(side["iops"]), int(side["total_ios"])


def make_sparse_image(path: Path, size_mib: int, data_mib: int) -> None:
    """A raw image of ``size_mib`` MiB with ``data_mib`` MiB of data in 1 MiB extents
    spread over it, the rest holes (a VM disk a few percent full)."""
    rng = random.Random(1)
    with open(path, "wb") as image:
        image.truncate(size_mib * MIB)
        for extent in sorted(rng.sample(range(size_mib), data_mib)):
            image.seek(extent * MIB)
            image.write(rng.randbytes(MIB))


def timed_convert(source: Path, dest: Path) -> float:
    """``qemu-img convert -O raw`` (it writes only the data it finds: holes stay holes
    where the source shows them)."""
    start = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(source), str(dest)], check=True)
    return time.perf_counter() - start


def same_content(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (compared in 1 MiB blocks)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while block := fa.read(MIB):
            if block != fb.read(MIB):
                return False
    return True
