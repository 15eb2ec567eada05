#!/usr/bin/env python3
"""HTTP shim benchmark: upload throughput against the bare disk, server memory, GET /p rate.

In one run, on one disk:

* native: 1 GiB (``--size-mib``) written with ``dd`` (1 MiB blocks) into a file next to
  the store, closed, no fsync: what the disk takes;
* upload: the same bytes (a source file read once first, so the page cache serves it)
  sent with ``curl -T`` to ``PUT /p/media/<authkey>/<pid>/<name>`` of a mount daemon
  started with ``--api`` (the production layout); the server's peak RSS (VmHWM) is read
  from /proc before and after, so streaming shows as a small, size-independent peak;
* GET /p: ``wrk`` (Debian's) against ``GET /p?gid=...`` with ``Authorization: Bearer``,
  for ``--seconds`` with ``--connections`` connections.

The ratio upload/native says what HTTP parsing, the quota grants and the Python loop
cost. Run as root from the repository: ``.venv/bin/python scripts/bench/api.py``.
Everything is unmounted and removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
VFS = [sys.executable, "-m", "velocityfs"]
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vmhwm_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1))  # type: ignore[union-attr]


def timed(cmd: list[str], **kwargs) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, **kwargs)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    (TOP / "var").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-api-", dir=TOP / "var"))
    store, mnt = work / "store", work / "mnt"
    mnt.mkdir()
    base = [*VFS, "--catalog", f"sqlite:///{work}/catalog.sqlite", "--store", str(store)]
    daemon = None
    try:
        subprocess.run([*base, "init"], check=True, capture_output=True)
        quota = str(args.size_mib * 4)
        subprocess.run(
            [*base, "pool", "create", "bench", "--quota-mib", quota],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [*base, "user", "add", "bench", "--password-stdin"],
            input="bench\n",
            text=True,
            check=True,
            capture_output=True,
        )
        subprocess.run([*base, "group", "add", "bench"], check=True, capture_output=True)
        subprocess.run([*base, "member", "add", "bench", "bench"], check=True, capture_output=True)
        subprocess.run([*base, "share", "bench", "bench", "--all"], check=True, capture_output=True)
        pid = json.loads(
            subprocess.run(
                [*base, "pool", "show", "bench", "--json"], check=True, capture_output=True
            ).stdout
        )["pid"]
        groups = json.loads(
            subprocess.run(
                [*base, "group", "list", "--json"], check=True, capture_output=True
            ).stdout
        )
        gid = next(g["gid"] for g in groups if g["name"] == "bench")
        port = free_port()
        log = open(work / "daemon.log", "w")  # noqa: SIM115 - closed in finally
        daemon = subprocess.Popen(
            [*base, "mount", str(mnt), "--api", f"127.0.0.1:{port}", "--log-level", "WARNING"],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 30
        while "velocityfs: mounted" not in (work / "daemon.log").read_text():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit((work / "daemon.log").read_text())
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        key = json.loads(
            subprocess.run(
                [
                    "curl",
                    "-sf",
                    "-XPOST",
                    f"{url}/u/auth",
                    "-d",
                    '{"name":"bench","password":"bench"}',
                ],
                check=True,
                capture_output=True,
            ).stdout
        )["authkey"]

        source = work / "source.bin"
        count = str(args.size_mib)
        subprocess.run(
            ["dd", "if=/dev/urandom", f"of={source}", "bs=1M", f"count={count}", "status=none"],
            check=True,
        )
        subprocess.run(["cat", str(source)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["sync"], check=True)
        native_s = timed(
            ["dd", f"if={source}", f"of={work / 'native.bin'}", "bs=1M", "status=none"]
        )
        (work / "native.bin").unlink()
        subprocess.run(["sync"], check=True)

        rss_before = vmhwm_kib(daemon.pid)
        upload_s = timed(
            [
                "curl",
                "-sf",
                "-o",
                "/dev/null",
                "-T",
                str(source),
                f"{url}/p/media/{key}/{pid}/up.bin",
            ]
        )
        rss_after = vmhwm_kib(daemon.pid)
        if (mnt / "bench" / "up.bin").stat().st_size != source.stat().st_size:
            raise SystemExit("the uploaded media has the wrong size")

        wrk = subprocess.run(
            [
                "wrk",
                "-t2",
                f"-c{args.connections}",
                f"-d{args.seconds}s",
                "-H",
                f"Authorization: Bearer {key}",
                f"{url}/p?gid={gid}",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1))  # type: ignore[union-attr]
        latency = re.search(r"Latency\s+(\S+)", wrk).group(1)  # type: ignore[union-attr]
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)

        size = args.size_mib
        print(f"velocityfs HTTP shim benchmark, {size} MiB body, work dir {work}")
        print(f"{'row':<44}{'figure':>14}{'ratio':>9}")
        print("-" * 67)
        print(f"{'native write (dd, 1 MiB blocks)':<44}{size / native_s:>10.0f} MiB/s{1:>8.2f}")
        print(
            f"{'upload PUT /p/media/... (curl -T)':<44}{size / upload_s:>10.0f} MiB/s"
            f"{native_s / upload_s:>8.2f}"
        )
        print(f"{'server peak RSS before upload':<44}{rss_before / 1024:>10.1f} MiB")
        print(f"{'server peak RSS after upload':<44}{rss_after / 1024:>10.1f} MiB")
        row = f"GET /p (wrk, {args.connections} connections)"
        print(f"{row:<44}{rps:>10.0f} req/s")
        print(f"{'GET /p mean latency':<44}{latency:>14}")
        if non_2xx:
            print(f"warning: {non_2xx.group(1)} responses were not 2xx")
    finally:
        if daemon is not None:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.umask(0o022)
    main()
