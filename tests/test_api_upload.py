"""Uploads: PUT /p/media/<authkey>/<pid>/<filename> with the raw bytes as the body.

A body streams to a temporary file under a grant that grows with it and becomes
media atomically when complete. A declared Content-Length that cannot fit is
refused with 413 before a byte of the body is read; a chunked body that grows
past a quota is cut off with 413; an upload that is refused or aborted leaves
nothing behind: no media, no file (not even under store/media/.uploads), no usage.
A chunked body's grant stays within one step (at most 8 MiB) of the bytes received,
and an upload that receives nothing for upload_idle_s is aborted with 408.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from support.admin import service, write_config
from support.api import (
    MIB,
    UPLOAD_TEMPLATE,
    Api,
    api_mount_fixture,  # noqa: F401
    backing_file,
    chunks,
    read_response,
    store_files,
    upload_target,
)
from support.usage import assert_usage_consistent, grant_count

# The most a chunked upload may hold beyond the bytes it has received.
UPLOAD_STEP_MAX = 8 * MIB


def uploads_in_flight(store: os.PathLike[str]) -> list[str]:
    return sorted(f for f in store_files(store) if f.startswith("media/.uploads/"))


def poll(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of a process (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


class Gate:
    """A streamed body that pauses after ``first`` bytes until the test opens it."""

    def __init__(self, total: int, first: int) -> None:
        self.total = total
        self.first = first
        self.opened = threading.Event()
        self.paused = threading.Event()
        self.sha = hashlib.sha256()

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for piece in chunks(self.total, MIB):
            if sent >= self.first and not self.opened.is_set():
                self.paused.set()
                assert self.opened.wait(60), "the test never opened the gate"
            self.sha.update(piece)
            sent += len(piece)
            yield piece


def test_large_streamed_upload_appears_atomically(api_mount):
    """300 MiB from a generator (never whole in the client or the server), checked by sha256
    through the mount; while in flight it is neither listed nor visible in the mount."""
    s = api_mount(users=["alice"])
    api = s.api
    tenants = s.pids["tenants"]
    alice = s.key("alice")
    total = 300 * MIB
    before_files = store_files(s.store)
    hwm_before = vm_hwm_kib(s.mount.pid)

    body = Gate(total, first=16 * MIB)
    result: dict[str, object] = {}

    def upload() -> None:
        try:
            result["body"] = api.upload(alice, tenants, "big.iso", body, timeout=120)
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    thread = threading.Thread(target=upload, name="upload")
    thread.start()
    try:
        assert body.paused.wait(30), f"the upload did not start: {result}"
        # The server has the first bytes in its temporary file...
        assert poll(lambda: uploads_in_flight(s.store) != []), store_files(s.store)
        (tmp,) = uploads_in_flight(s.store)
        assert poll(lambda: os.path.getsize(s.store / tmp) > 0)
        # Its grant follows the bytes received: with the first 16 MiB stored, it holds at
        # most one step more, not a large chunk ahead (far from a limit, as here).
        assert poll(lambda: os.path.getsize(s.store / tmp) == body.first)
        held = s.used("tenants")["tenants"]
        assert body.first <= held <= body.first + UPLOAD_STEP_MAX, f"{held / MIB:.2f} MiB held"
        # ...but the media does not exist yet, for the API or the mount.
        with_other = Api(s.port)
        try:
            assert with_other.media(alice, tenants)["media"] == []
        finally:
            with_other.close()
        assert "big.iso" not in os.listdir(s.mount / "tenants")
        assert not os.path.exists(s.mount / "tenants" / "big.iso")
    finally:
        body.opened.set()
        thread.join(120)
    assert not thread.is_alive(), "the upload did not finish"
    assert "error" not in result, result["error"]
    made = result["body"]
    assert made["pid"] == tenants and made["filename"] == "big.iso"  # type: ignore[index]
    mid = made["mid"]  # type: ignore[index]

    # Complete and readable through the mount at once, byte for byte.
    path = s.mount / "tenants" / "big.iso"
    assert os.path.getsize(path) == total
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(4 * MIB):
            digest.update(piece)
    assert digest.hexdigest() == body.sha.hexdigest()
    assert os.path.getsize(backing_file(s.store, mid)) == total

    (listed,) = api.media(alice, tenants)["media"]
    assert (listed["mid"], listed["filename"], listed["size_mib"]) == (mid, "big.iso", 300)
    # The grant that carried the upload is settled to the exact size.
    assert s.usage("tenants") == {"tenants": total}
    assert s.used("tenants") == {"tenants": total}
    assert uploads_in_flight(s.store) == []
    assert store_files(s.store) - before_files == {
        str(backing_file(s.store, mid).relative_to(s.store))
    }
    # Streamed: the daemon's peak memory grew by far less than the body.
    grown = (vm_hwm_kib(s.mount.pid) - hwm_before) * 1024
    print(f"daemon peak RSS {hwm_before / 1024:.0f} -> {vm_hwm_kib(s.mount.pid) / 1024:.0f} MiB")
    assert grown < 64 * MIB, f"the daemon's peak RSS grew by {grown / MIB:.0f} MiB"


def send_head(port: int, target: str, length: int | None, *, chunked: bool = False):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n"
    sock.sendall((head + "\r\n").encode())
    return sock


def test_refused_and_aborted_uploads_leave_nothing(api_mount):
    # Small amounts: near a quota the server reserves chunk by chunk (two SQL
    # transactions per ~64 KiB received), which is slow on purpose, not a hang.
    s = api_mount(subpools={"tenants/small": 2, "tenants/loose": 1000}, users=["alice"])
    api = s.api
    tenants, small, loose = s.pids["tenants"], s.pids["tenants/small"], s.pids["tenants/loose"]
    alice = s.key("alice")
    paths = ("tenants", "tenants/small", "tenants/loose")

    def state() -> dict[str, object]:
        return {
            "files": store_files(s.store),
            "used": s.used(*paths),
            "media": {p: api.media(alice, s.pids[p])["media"] for p in paths},
            "mount": {p: sorted(os.listdir(s.mount / p)) for p in paths},
        }

    # 1. Aborted uploads: the client goes away in the middle of the body.
    baseline = state()
    for pid, chunked in [(tenants, False), (loose, False), (small, True)]:
        sock = send_head(
            s.port,
            upload_target(alice, pid, "aborted.img"),
            None if chunked else 10 * MIB,
            chunked=chunked,
        )
        with sock:
            if chunked:
                sock.sendall(f"{MIB:x}\r\n".encode() + b"a" * MIB + b"\r\n")
            else:
                sock.sendall(b"a" * MIB)
            # The upload is in flight (a temporary file exists) when the client vanishes.
            assert poll(lambda: uploads_in_flight(s.store) != []), "no upload in flight"
        # Closed without the rest of the body: everything must go away on its own.
        assert poll(lambda: uploads_in_flight(s.store) == [] and s.used(*paths) == baseline["used"])
        assert state() == baseline, "an aborted upload left something behind"

    # Leave 4 MiB of room in tenants, so that loose (1000 MiB) is bounded by its parent.
    filler = api.create_media(alice, tenants, "filler.img", 1020)["mid"]
    baseline = state()

    def assert_nothing_left(what: str) -> None:
        assert state() == baseline, f"{what} left something behind"

    # 2. A Content-Length that cannot fit: 413 at once, before any of the body is sent.
    for pid, length in [
        (small, 2 * MIB + 1),  # the pool's own quota
        (small, 10 << 30),
        (loose, 5 * MIB),  # loose would allow it, tenants (4 MiB left) does not
        (tenants, 1 << 50),
    ]:
        with send_head(s.port, upload_target(alice, pid, "big.img"), length) as sock:
            started = time.monotonic()
            res = read_response(sock, timeout=10)
            assert time.monotonic() - started < 5
        api.check(res, UPLOAD_TEMPLATE, "PUT", 413)
        assert_nothing_left(f"a refused Content-Length of {length}")

    # ...and the same with a client that sends the whole body anyway.
    api.upload(alice, small, "big.img", bytes(3 * MIB), status=413)
    api.upload(alice, loose, "big.img", bytes(5 * MIB), status=413)
    assert_nothing_left("a refused body with Content-Length")

    # 3. Chunked bodies (no Content-Length) that grow past a quota: cut off with 413.
    api.upload(alice, small, "grow.img", chunks(20 * MIB), status=413)
    api.upload(alice, small, "grow.img", chunks(2 * MIB + 1), status=413)
    api.upload(alice, loose, "grow.img", chunks(10 * MIB), status=413)
    api.upload(alice, tenants, "grow.img", chunks(4 * MIB + 1, 64 * 1024), status=413)
    assert_nothing_left("a chunked body past the quota")

    # A chunked body that fits exactly is taken, to the byte; removing it restores all.
    made = api.upload(alice, small, "exact.img", chunks(2 * MIB, 100_000))
    assert s.used("tenants/small") == {"tenants/small": 2 * MIB}
    api.delete_media(alice, made["mid"])
    assert_nothing_left("an upload removed again")

    # The daemon took all of that in its stride: no tracebacks, and no authkey in its log.
    api.media(alice, tenants)
    log = s.mount.log
    assert "Traceback" not in log, log
    assert alice not in log, "an authkey was written to the daemon's log"
    api.delete_media(alice, filler)
    assert s.usage("tenants") == {"tenants": 0}


def configure(monkeypatch, tmp_path, **values) -> None:
    """A configuration file for the daemons (and CLI calls) this test starts."""
    config = write_config(tmp_path / "velocityfs.toml", **values)
    monkeypatch.setenv("VELOCITYFS_CONFIG", str(config))


def send_chunk(sock: socket.socket, data: bytes) -> None:
    sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")


IDLE_S = 4.0


def test_idle_uploads_are_aborted_and_leave_nothing(api_mount, catalog_url, monkeypatch, tmp_path):
    """An upload that receives nothing of its body for upload_idle_s is aborted with 408,
    chunked or with a Content-Length, and everything it held is gone by the time the answer
    comes; one whose bytes keep coming, however slowly, goes on."""
    configure(monkeypatch, tmp_path, upload_idle_s=IDLE_S)
    s = api_mount(subpools={"tenants/vm": 100}, users=["alice"])
    api = s.api
    vm = s.pids["tenants/vm"]
    alice = s.key("alice")

    def state() -> dict[str, object]:
        with service(catalog_url, s.store) as v:
            grants = grant_count(v)
            assert_usage_consistent(v)
        return {
            "files": store_files(s.store),
            "used": s.used("tenants", "tenants/vm"),
            "media": api.media(alice, vm)["media"],
            "mount": sorted(os.listdir(s.mount / "tenants" / "vm")),
            "grants": grants,
        }

    baseline = state()
    assert baseline["grants"] == 0

    # A byte, then nothing: one chunked, one that declared 10 MiB.
    chunked = send_head(s.port, upload_target(alice, vm, "chunked.img"), None, chunked=True)
    declared = send_head(s.port, upload_target(alice, vm, "declared.img"), 10 * MIB)
    with chunked, declared:
        sent = time.monotonic()  # before the bytes: the server's clock starts after them
        send_chunk(chunked, b"a")
        declared.sendall(b"a")
        # In flight, holding room: the declared size, and a step for the chunked byte.
        assert poll(lambda: len(uploads_in_flight(s.store)) == 2), store_files(s.store)
        assert poll(lambda: s.used("tenants/vm")["tenants/vm"] > 10 * MIB)
        answers = []
        for sock in (chunked, declared):
            answers.append(read_response(sock, timeout=IDLE_S + 60))
            assert time.monotonic() - sent >= IDLE_S - 0.05, "aborted before upload_idle_s"
    for res in answers:
        answer = api.check(res, UPLOAD_TEMPLATE, "PUT", 408)
        assert "arrived" in answer["error"], answer
        assert res.headers.get("connection") == "close", res.headers
    # Each answer comes after its clean-up: nothing is left, at once.
    assert state() == baseline, "an idle upload left something behind"

    # A slow but steady upload is not idle: every byte restarts the clock.
    content = b""
    with send_head(s.port, upload_target(alice, vm, "slow.img"), None, chunked=True) as sock:
        until = time.monotonic() + 1.5 * IDLE_S
        while time.monotonic() < until:
            piece = bytes([len(content) % 251]) * 3
            send_chunk(sock, piece)
            content += piece
            time.sleep(IDLE_S / 16)
        sock.sendall(b"0\r\n\r\n")
        made = api.check(read_response(sock, timeout=60), UPLOAD_TEMPLATE, "PUT", 200)
    assert made["filename"] == "slow.img"
    assert (s.mount / "tenants" / "vm" / "slow.img").read_bytes() == content
    assert s.used("tenants/vm") == {"tenants/vm": len(content)}
    api.delete_media(alice, made["mid"])
    assert state() == baseline
    assert "Traceback" not in s.mount.log, s.mount.log


def test_idle_chunked_uploads_do_not_starve_their_pool(
    api_mount, catalog_url, monkeypatch, tmp_path
):
    """Six chunked uploads that sent a byte each and wait hold little of their 60 MiB pool:
    while they wait, a 50 MiB upload and a 50 MiB write on the mount still fit; then they
    all complete, and usage is exact."""
    configure(monkeypatch, tmp_path, upload_idle_s=600)  # they must not time out here
    s = api_mount(subpools={"tenants/vm": 60}, users=["alice"])
    api = s.api
    vm = s.pids["tenants/vm"]
    alice = s.key("alice")
    mnt_vm = s.mount / "tenants" / "vm"

    socks = []
    try:
        for i in range(6):
            sock = send_head(s.port, upload_target(alice, vm, f"idle-{i}.img"), None, chunked=True)
            socks.append(sock)
            send_chunk(sock, bytes([65 + i]))
        # Each has its byte in its temporary file, so its grant grew for it.
        assert poll(
            lambda: [os.path.getsize(s.store / f) for f in uploads_in_flight(s.store)] == [1] * 6
        ), store_files(s.store)
        held = s.used("tenants/vm")["tenants/vm"]
        print(f"six waiting uploads hold {held / MIB:.2f} MiB")

        # A 50 MiB upload (Content-Length: reserved in full before reading) fits...
        made = api.upload(alice, vm, "big.img", bytes(50 * MIB))
        assert os.path.getsize(mnt_vm / "big.img") == 50 * MIB
        api.delete_media(alice, made["mid"])
        # ...and so does a 50 MiB write on the mount (dd of the report: ENOSPC).
        block = bytes(range(256)) * (MIB // 256)
        with open(mnt_vm / "disk.img", "wb") as f:
            for _ in range(50):
                f.write(block)
        assert os.path.getsize(mnt_vm / "disk.img") == 50 * MIB

        for sock in socks:
            sock.sendall(b"0\r\n\r\n")
        for sock in socks:
            api.check(read_response(sock, timeout=60), UPLOAD_TEMPLATE, "PUT", 200)
    finally:
        for sock in socks:
            sock.close()
    for i in range(6):
        assert (mnt_vm / f"idle-{i}.img").read_bytes() == bytes([65 + i])
    assert sorted(os.listdir(mnt_vm)) == ["disk.img"] + [f"idle-{i}.img" for i in range(6)]
    assert s.used("tenants/vm") == {"tenants/vm": 50 * MIB + 6}
    assert uploads_in_flight(s.store) == []
    with service(catalog_url, s.store) as v:
        assert grant_count(v) == 0
        assert_usage_consistent(v)


BAD_NAMES = [
    "..",
    "%2e%2e",
    "%2E%2e",
    ".%2E",
    ".",
    "%2e",
    "a%2Fb",
    "a%2fb",
    "%2F",
    "%2Fetc%2Fpasswd",
    "..%2F..%2Fescape",
    "a/b",  # an unencoded slash: still one filename parameter, still refused
    "%00",
    "a%00b",
    "x" * 256,
    "%C3%A9" * 128,  # 256 bytes of UTF-8
    "%ff",  # not UTF-8
    "a%C3",  # a truncated UTF-8 sequence
    "",
]


def test_upload_names_and_statuses(api_mount):
    s = api_mount(subpools={"tenants/vm": 100})
    api = s.api
    vm = s.pids["tenants/vm"]
    alice = s.key("alice")
    mnt_vm = s.mount / "tenants" / "vm"
    before = store_files(s.store)

    # URL-decoded, then held to the naming rule of the mount: 400, and nothing is stored.
    for name in BAD_NAMES:
        api.raw(
            "PUT",
            upload_target(alice, vm, name, encode=False),
            UPLOAD_TEMPLATE,
            body=b"evil",
            status=400,
        )
    assert store_files(s.store) == before
    assert api.media(alice, vm)["media"] == []
    assert os.listdir(mnt_vm) == []
    assert sorted(os.listdir(s.mount / "tenants")) == ["vm"]
    assert s.used("tenants") == {"tenants": 0}

    # Percent-escapes are decoded once: these names arrive as written on the right.
    good = {
        "ok%20name.iso": "ok name.iso",
        "caf%C3%A9.img": "café.img",
        "100%25.img": "100%.img",
        "%2e%2e%2e": "...",
        ".hidden": ".hidden",
        "y" * 255: "y" * 255,
        "%C3%A9" * 127 + "z": "é" * 127 + "z",  # 255 bytes
    }
    for raw, name in good.items():
        content = name.encode() * 3
        made = api.raw(
            "PUT",
            upload_target(alice, vm, raw, encode=False),
            UPLOAD_TEMPLATE,
            body=content,
            status=200,
        )
        assert made["filename"] == name
        assert (mnt_vm / name).read_bytes() == content
    assert sorted(m["filename"] for m in api.media(alice, vm)["media"]) == sorted(good.values())

    # An empty body makes an empty media.
    empty = api.upload(alice, vm, "empty.img", b"")
    assert os.path.getsize(mnt_vm / "empty.img") == 0
    assert os.path.getsize(backing_file(s.store, empty["mid"])) == 0

    # 409: the name is taken by media or by a subpool; the existing file is untouched.
    api.create_pool(alice, vm, "sub", 10)
    api.upload(alice, vm, "ok name.iso", b"other", status=409)
    api.upload(alice, vm, "sub", b"other", status=409)
    assert (mnt_vm / "ok name.iso").read_bytes() == b"ok name.iso" * 3

    # 404: unknown pool, or one the caller has no share on. 403: without
    # velocity.pool.media.create where it has some other permission, or a bad authkey.
    api.upload(alice, str(uuid.uuid4()), "x.img", b"x", status=404)
    api.upload(s.key("vera"), vm, "x.img", b"x", status=403)
    for user in ("bob", "nobody"):
        api.upload(s.key(user), vm, "x.img", b"x", status=404)
    api.upload(alice, s.pids["isos"], "x.img", b"x", status=404)
    api.upload("not-a-key", vm, "x.img", b"x", status=403)
    # create without view is enough; the root group may upload anywhere.
    api.upload(alice, s.pids["hidden"], "blind.img", b"blind")
    api.upload(s.key("admin"), s.pids["isos"], "admin.iso", b"admin")
    assert not os.path.exists(mnt_vm / "x.img")
    assert uploads_in_flight(s.store) == []
