"""Helpers for the HTTP shim tests (tests/test_api_*.py).

- ``Api``: an httpx client that checks every response's status and validates its
  JSON body against the OpenAPI document the server itself serves.
- ``raw_request``: one HTTP/1.1 request over a plain socket, for what httpx would
  not send as is (dot segments, bodies shorter than their Content-Length).
- ``cli_batch``: run many ``velocityfs`` CLI commands in ONE interpreter (each
  spawned CLI process costs ~0.6 s; a test world needs ~20 commands).
- ``World``: the users, groups, pools and shares most API tests start from.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

MIB = 1 << 20
PASSWORD = "correct horse battery staple"

# -- ports and raw HTTP -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Return once something accepts connections on 127.0.0.1:port; fail loudly otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing answers on 127.0.0.1:{port}: {exc}") from exc
            time.sleep(0.05)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def read_response(sock: socket.socket, timeout: float = 30.0) -> RawResponse:
    """Read one HTTP/1.1 response (Content-Length framed, as the shim sends them)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a full response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return RawResponse(status, headers, rest[:length])


def raw_request(
    port: int,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> RawResponse:
    """Send ``target`` byte for byte (no normalisation, no re-encoding) and read the answer."""
    hdrs = {"Host": f"127.0.0.1:{port}", "Connection": "close"}
    if body or method in ("PUT", "POST", "PATCH"):
        hdrs["Content-Length"] = str(len(body))
    hdrs.update(headers or {})
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        return read_response(sock, timeout)


# -- OpenAPI validation ---------------------------------------------------------------


class OpenApi:
    """The served OpenAPI document; validates response bodies against it."""

    URI = "urn:velocityfs:openapi"

    def __init__(self, document: dict[str, Any]) -> None:
        self.doc = document
        resource = DRAFT202012.create_resource(document)
        self.registry: Registry = Registry().with_resource(self.URI, resource)
        self.checked: set[tuple[str, str, int]] = set()

    @staticmethod
    def _escape(token: str) -> str:
        return token.replace("~", "~0").replace("/", "~1")

    def schema_pointer(self, path: str, method: str, status: int) -> str:
        """JSON pointer of the schema of one documented response (fails if undocumented)."""
        paths = self.doc.get("paths", {})
        assert path in paths, f"{path} is not in the OpenAPI document"
        op = paths[path].get(method.lower())
        assert op is not None, f"{method} {path} is not in the OpenAPI document"
        responses = op.get("responses", {})
        assert str(status) in responses, (
            f"{method} {path} answered {status}, which its OpenAPI entry does not document "
            f"(documented: {sorted(responses)})"
        )
        content = responses[str(status)].get("content", {})
        assert "application/json" in content, (
            f"{method} {path} {status} has no application/json schema in the document"
        )
        parts = ["paths", path, method.lower(), "responses", str(status), "content"]
        parts += ["application/json", "schema"]
        return "#/" + "/".join(self._escape(p) for p in parts)

    def validate(self, path: str, method: str, status: int, body: Any) -> None:
        pointer = self.schema_pointer(path, method, status)
        validator = Draft202012Validator({"$ref": self.URI + pointer}, registry=self.registry)
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
        assert not errors, (
            f"{method} {path} {status}: the body does not match the served OpenAPI schema:\n"
            + "\n".join(f"  at {list(e.path)}: {e.message}" for e in errors)
            + f"\nbody: {body!r}"
        )
        self.checked.add((path, method.upper(), status))


UPLOAD_TEMPLATE = "/p/media/{authkey}/{pid}/{filename}"


def upload_target(authkey: str, pid: str, filename: str, *, encode: bool = True) -> str:
    """The upload path; ``encode=False`` keeps ``filename`` exactly as given."""
    name = quote(filename, safe="") if encode else filename
    return f"/p/media/{quote(authkey, safe='')}/{quote(pid, safe='')}/{name}"


class Api:
    """A client of one running shim; every call checks status and schema."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.base, timeout=httpx.Timeout(60.0))
        res = self.client.get("/openapi.json")
        assert res.status_code == 200, res.text
        self.openapi = OpenApi(res.json())

    def close(self) -> None:
        self.client.close()

    def check(self, res: httpx.Response | RawResponse, template: str, method: str, status: int):
        code = res.status_code if isinstance(res, httpx.Response) else res.status
        text = res.text if isinstance(res, httpx.Response) else res.body.decode(errors="replace")
        assert code == status, f"{method} {template}: expected {status}, got {code}: {text}"
        ctype = res.headers.get("content-type", "")
        assert ctype.startswith("application/json"), f"{method} {template}: content-type {ctype!r}"
        body = res.json()
        self.openapi.validate(template, method, status, body)
        if status >= 400:
            assert isinstance(body.get("error"), str) and body["error"], body
        return body

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        status: int = 200,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One JSON request (``body`` as JSON, or raw ``content``); returns the parsed answer."""
        kwargs: dict[str, Any] = {"headers": headers}
        if content is not None:
            kwargs["content"] = content
        elif body is not None:
            kwargs["json"] = body
        res = self.client.request(method, path, **kwargs)
        try:
            return self.check(res, path, method, status)
        except AssertionError as exc:
            sent = content if content is not None else body
            raise AssertionError(f"{exc}\nrequest body: {sent!r}") from None

    # conveniences ---------------------------------------------------------------------
    def login(self, name: str, password: str = PASSWORD, *, status: int = 200) -> Any:
        body = self.call("POST", "/u/auth", {"name": name, "password": password}, status=status)
        return body["authkey"] if status == 200 else body

    def pools(self, key: str, gid: str, *, status: int = 200) -> Any:
        return self.call("GET", "/p", {"authkey": key, "gid": gid}, status=status)

    def create_pool(
        self, key: str, parent: str, name: str, quota: Any, *, status: int = 200
    ) -> Any:
        body = {"authkey": key, "parentpool": parent, "name": name, "quota_mib": quota}
        return self.call("PUT", "/p", body, status=status)

    def delete_pool(self, key: str, pid: str, *, status: int = 200) -> Any:
        return self.call("DELETE", "/p", {"authkey": key, "pid": pid}, status=status)

    def media(self, key: str, pid: str, *, status: int = 200) -> Any:
        return self.call("GET", "/p/media", {"authkey": key, "pid": pid}, status=status)

    def media_names(self, key: str, pid: str) -> dict[str, dict[str, Any]]:
        return {m["filename"]: m for m in self.media(key, pid)["media"]}

    def create_media(
        self, key: str, pid: str, filename: str, size: Any, *, status: int = 200
    ) -> Any:
        body = {"authkey": key, "pid": pid, "filename": filename, "size_mib": size}
        return self.call("PUT", "/p/media", body, status=status)

    def delete_media(self, key: str, mid: str, *, status: int = 200) -> Any:
        return self.call("DELETE", "/p/media", {"authkey": key, "mid": mid}, status=status)

    def upload(
        self,
        key: str,
        pid: str,
        filename: str,
        content: bytes | Iterable[bytes],
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> Any:
        """PUT a raw body (bytes, or an iterator of chunks: sent chunked, never held whole)."""
        res = self.client.put(
            upload_target(key, pid, filename),
            content=content,
            headers=headers,
            timeout=timeout,
        )
        return self.check(res, UPLOAD_TEMPLATE, "PUT", status)

    def raw(
        self,
        method: str,
        target: str,
        template: str,
        *,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Any:
        """A raw-socket request, checked like the others against ``template``'s schema."""
        res = raw_request(self.port, method, target, body, headers)
        return self.check(res, template, method, status)


# -- the CLI, many commands per process -----------------------------------------------

_BATCH = r"""
import json, sys
from click.testing import CliRunner
from velocityfs.cli.main import main

catalog, store = sys.argv[1:3]
runner = CliRunner()
results = []
for args, stdin in json.load(sys.stdin):
    r = runner.invoke(main, ["--catalog", catalog, "--store", store, *args], input=stdin)
    exc = r.exception
    results.append({
        "args": args, "code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr,
        "exception": None if exc is None or isinstance(exc, SystemExit) else repr(exc),
    })
    if r.exit_code != 0:
        break
json.dump(results, sys.stdout)
"""


def cli_batch(
    catalog: str, store: str | os.PathLike[str], commands: list[tuple[list[str], str | None]]
) -> list[str]:
    """Run velocityfs CLI commands (argv, stdin) in one process; all must succeed.

    Returns each command's stdout. The commands run through click exactly as from
    a shell, only without a new interpreter per command.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _BATCH, catalog, str(store)],
        input=json.dumps(commands),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"CLI batch failed:\n{proc.stderr}"
    results = json.loads(proc.stdout)
    for r in results:
        assert r["code"] == 0 and r["exception"] is None, (
            f"velocityfs {' '.join(r['args'])} exited with {r['code']} ({r['exception']}):\n"
            f"--- stdout ---\n{r['stdout']}--- stderr ---\n{r['stderr']}"
        )
    assert len(results) == len(commands), "the CLI batch stopped early"
    return [r["stdout"] for r in results]


# -- the standard world ---------------------------------------------------------------

# Root pools and their quotas (MiB).
ROOT_POOLS = {"tenants": 1024, "isos": 256, "hidden": 64}
# user -> groups
USERS = {
    "alice": ["acme"],  # everything on tenants; create-only on hidden (no view)
    "bob": ["globex"],  # everything on isos
    "vera": ["viewers"],  # view and media.view on tenants, nothing else
    "admin": ["root"],  # the root group may do everything
    "nobody": [],  # in no group at all
}
GROUPS = ["acme", "globex", "viewers"]
# (pool, group, permissions); "--all" for every permission
SHARES = [
    ("tenants", "acme", ["--all"]),
    ("isos", "globex", ["--all"]),
    ("tenants", "viewers", ["view", "media.view"]),
    ("hidden", "acme", ["create", "media.create", "media.view"]),
]


@dataclass
class World:
    """Ids of what ``build_world`` created: pools by path, groups by name."""

    catalog: str
    store: Path
    pids: dict[str, str]
    gids: dict[str, str]


def build_world(
    catalog: str,
    store: str | os.PathLike[str],
    *,
    root_pools: dict[str, int] | None = None,
    subpools: dict[str, int | None] | None = None,
    shares: list[tuple[str, str, list[str]]] | None = None,
    users: list[str] | None = None,
) -> World:
    """init, root pools (+ subpools), users, groups, memberships and shares via the CLI.

    ``subpools`` maps a path to a quota in MiB (None: inherit); ``shares`` are added
    to the standard SHARES as (pool path, group, permissions). ``users`` limits the
    USERS created (each costs a password hash).
    """
    root_pools = ROOT_POOLS if root_pools is None else root_pools
    cmds: list[tuple[list[str], str | None]] = [(["init"], None)]
    for name, quota in root_pools.items():
        cmds.append((["pool", "create", name, "--quota-mib", str(quota)], None))
    for path, quota in (subpools or {}).items():
        extra = [] if quota is None else ["--quota-mib", str(quota)]
        cmds.append((["pool", "create", path, *extra], None))
    for group in GROUPS:
        cmds.append((["group", "add", group], None))
    for user, groups in USERS.items():
        if users is not None and user not in users:
            continue
        cmds.append((["user", "add", user, "--password-stdin"], PASSWORD + "\n"))
        for group in groups:
            cmds.append((["member", "add", group, user], None))
    for pool, group, perms in [*SHARES, *(shares or [])]:
        if pool.split("/")[0] in root_pools:
            cmds.append((["share", pool, group, *perms], None))
    cmds.append((["group", "list", "--json"], None))
    cmds.append((["pool", "list", "--json"], None))
    out = cli_batch(catalog, store, cmds)
    gids = {g["name"]: g["gid"] for g in json.loads(out[-2])}
    pids = {p["path"]: p["pid"] for p in json.loads(out[-1])}
    return World(catalog, Path(store), pids, gids)


# -- the store on disk ----------------------------------------------------------------


# A mount's own bookkeeping, which changes as it works: its spare files, made ahead
# of creates, and its create journal.
MOUNT_BOOKKEEPING = {".spare", ".journal"}


def store_files(store: str | os.PathLike[str]) -> set[str]:
    """Every file below store/media (uploads in flight included), relative to store;
    not a mount's spare files and journal."""
    top = Path(store)
    found = set()
    for dirpath, dirs, files in os.walk(top / "media"):
        dirs[:] = [d for d in dirs if d not in MOUNT_BOOKKEEPING]
        for name in files:
            found.add(str((Path(dirpath) / name).relative_to(top)))
    return found


def backing_file(store: str | os.PathLike[str], mid: str) -> Path:
    return Path(store) / "media" / mid[:2] / mid


def pool_usage(catalog: str, store: str | os.PathLike[str], *refs: str) -> dict[str, int]:
    """used_bytes of pools (by path or pid), from ``velocityfs pool show --json``."""
    out = cli_batch(catalog, store, [(["pool", "show", ref, "--json"], None) for ref in refs])
    return {ref: json.loads(text)["used_bytes"] for ref, text in zip(refs, out, strict=True)}


def pool_list(catalog: str, store: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``velocityfs pool list --json`` by path."""
    (out,) = cli_batch(catalog, store, [(["pool", "list", "--json"], None)])
    return {p["path"]: p for p in json.loads(out)}


def chunks(total: int, size: int = MIB) -> Iterator[bytes]:
    """``total`` bytes of a deterministic pattern, generated chunk by chunk.

    Each chunk starts with its number, so a lost, repeated or misplaced chunk
    changes the content's hash.
    """
    block = (bytes(range(256)) * (size // 256 + 1))[:size]
    sent = 0
    n = 0
    while sent < total:
        piece = block[: min(size, total - sent)]
        head = n.to_bytes(8, "little")
        piece = head[: len(piece)] + piece[len(head) :]
        yield piece
        sent += len(piece)
        n += 1


# -- running servers ------------------------------------------------------------------


@dataclass
class Served:
    """A running shim (in a mount daemon, or standalone) with its world and a client."""

    world: World
    api: Api
    port: int
    mount: Any = None  # support.mount.Mount when the API runs inside the mount daemon
    keys: dict[str, str] = field(default_factory=dict)

    def key(self, user: str) -> str:
        """A (cached) authkey of a world user, from POST /u/auth."""
        if user not in self.keys:
            self.keys[user] = self.api.login(user)
        return self.keys[user]

    @property
    def pids(self) -> dict[str, str]:
        return self.world.pids

    @property
    def gids(self) -> dict[str, str]:
        return self.world.gids

    @property
    def store(self) -> Path:
        return self.world.store

    def usage(self, *refs: str) -> dict[str, int]:
        """used_bytes by ``velocityfs pool show --json`` (a CLI process: ~0.6 s)."""
        return pool_usage(self.world.catalog, self.world.store, *refs)

    def used(self, *paths: str) -> dict[str, int]:
        """used_bytes of pools by path, from the mount's user.velocity.used_bytes (fast)."""
        assert self.mount is not None, "no mount: use usage()"
        return {
            p: int(os.getxattr(self.mount / p, "user.velocity.used_bytes").decode()) for p in paths
        }

    def pool_list(self) -> dict[str, dict[str, Any]]:
        return pool_list(self.world.catalog, self.world.store)


def start_in_mount(mount: Any, catalog: str, store: Path, **world_kwargs: Any) -> Served:
    """Build the world, then ``velocityfs mount MNT --api 127.0.0.1:PORT``; wait for the API."""
    world = build_world(catalog, store, **world_kwargs)
    for attempt in range(3):
        port = free_port()
        try:
            m = mount("--api", f"127.0.0.1:{port}")
        except pytest.fail.Exception as exc:
            # Other processes on this host pick free ports too; lost the race: again.
            if "Address already in use" in str(exc) and attempt < 2:
                continue
            raise
        wait_port(port)
        return Served(world, Api(port), port, m)
    raise AssertionError("unreachable")


class StandaloneServer:
    """``velocityfs serve --listen 127.0.0.1:PORT`` as a subprocess, with its log."""

    READY = "velocityfs: serving"

    def __init__(self, catalog: str, store: str | os.PathLike[str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.cmd = [
            sys.executable, "-m", "velocityfs", "--catalog", catalog, "--store", str(store),
            "serve", "--listen", f"127.0.0.1:{self.port}",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 30.0) -> StandaloneServer:
        for attempt in range(3):
            try:
                return self._start(timeout)
            except AssertionError as exc:
                # Other processes on this host pick free ports too; lost the race: again.
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                self.port = free_port()
                self.cmd[-1] = f"127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> StandaloneServer:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self.READY not in self.log:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"velocityfs serve exited with {self.proc.returncode} before serving\n"
                    f"command: {' '.join(self.cmd)}\n--- log ---\n{self.log}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"no {self.READY!r} line from velocityfs serve within {timeout:.0f} s\n"
                    f"command: {' '.join(self.cmd)}\n--- log ---\n{self.log}"
                )
            time.sleep(0.05)
        wait_port(self.port)
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the way systemd stops it), SIGKILL if that is not enough; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


# -- fixtures (import the *_fixture names into a test module to use them) -------------


@pytest.fixture(name="api_mount")
def api_mount_fixture(mount: Any, catalog_url: str, store_dir: Path) -> Iterator[Any]:
    """Factory: ``api_mount(**world_kwargs)`` builds a world and mounts it with the API."""
    started: list[Served] = []

    def start(**world_kwargs: Any) -> Served:
        served = start_in_mount(mount, catalog_url, store_dir, **world_kwargs)
        started.append(served)
        return served

    yield start
    for served in started:
        served.api.close()


@pytest.fixture(name="standalone")
def standalone_fixture(catalog_url: str, store_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """Factory: ``standalone()`` starts ``velocityfs serve`` on the test's catalog and store."""
    servers: list[StandaloneServer] = []

    def start() -> StandaloneServer:
        log_path = tmp_path / f"serve-{len(servers) + 1}.log"
        server = StandaloneServer(catalog_url, store_dir, log_path)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
