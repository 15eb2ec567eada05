"""One worker of the namespace stress test (tests/test_fs_stress.py), run as a process
of its own, as fsstress runs its workers.

``python namespace_stress.py SEED SECONDS TOP...``: for SECONDS, picks a random
directory under one of the TOPs (by listing its way down, so listings run
beside everything else) and makes, renames (files and directories, across the
TOPs), unlinks or removes something there. Races with the other workers give
ENOENT, EEXIST, ENOTEMPTY and the like, which are expected; any other error,
and any listing that shows a name twice, is printed as one JSON line per
problem, and the exit code is 1. The last line is a JSON count of operations.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

# What racing workers do to each other (and renaming a directory into itself). ESTALE:
# the kernel's own answer when a lookup finds a directory that a rename running beside
# it is moving (d_splice_alias cannot take the rename lock); it retries once, and a
# second race reaches the caller, on any FUSE filesystem.
EXPECTED = {
    errno.ESTALE,
    errno.ENOENT,
    errno.EEXIST,
    errno.ENOTEMPTY,
    errno.EINVAL,
    errno.ENOTDIR,
    errno.EISDIR,
}


def listing(directory: Path, problems: list[dict[str, str]]) -> list[os.DirEntry[str]]:
    entries = list(os.scandir(directory))
    names = Counter(entry.name for entry in entries)
    twice = sorted(name for name, count in names.items() if count > 1)
    if twice:
        problems.append({"listed twice": str(directory), "names": ", ".join(twice)})
    return entries


def somewhere(tops: list[Path], rng: random.Random, problems: list[dict[str, str]]) -> Path:
    """A directory reached by walking down from a random top, listing each level."""
    here = rng.choice(tops)
    while rng.random() < 0.6:
        subdirs = [e for e in listing(here, problems) if e.is_dir(follow_symlinks=False)]
        if not subdirs:
            break
        here = Path(rng.choice(subdirs).path)
    return here


def pick(directory: Path, rng: random.Random, dirs: bool) -> Path | None:
    entries = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False) == dirs]
    return Path(rng.choice(entries).path) if entries else None


def step(
    tops: list[Path], rng: random.Random, seed: int, n: int, problems: list[dict[str, str]]
) -> str:
    here = somewhere(tops, rng, problems)
    name = f"w{seed}-{n}"
    kind = rng.choice(["mkdir", "create", "create", "rename file", "rename dir", "unlink", "rmdir"])
    if kind == "mkdir":
        os.mkdir(here / name)
    elif kind == "create":
        (here / f"{name}.img").write_bytes(b"x" * rng.randrange(1, 4096))
    elif kind == "unlink":
        if (victim := pick(here, rng, dirs=False)) is not None:
            os.unlink(victim)
    elif kind == "rmdir":
        if (victim := pick(here, rng, dirs=True)) is not None:
            os.rmdir(victim)
    else:
        moved = pick(here, rng, dirs=kind == "rename dir")
        if moved is not None:
            target = somewhere(tops, rng, problems)
            os.rename(moved, target / (name + moved.suffix))
    return kind


def main() -> int:
    seed, seconds = int(sys.argv[1]), float(sys.argv[2])
    tops = [Path(p) for p in sys.argv[3:]]
    rng = random.Random(seed)
    problems: list[dict[str, str]] = []
    done: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            done[step(tops, rng, seed, n, problems)] += 1
        except OSError as exc:
            if exc.errno not in EXPECTED:
                problems.append({"error": f"{exc!r}"})
    for problem in problems:
        print(json.dumps(problem))
    print(json.dumps(dict(done)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
