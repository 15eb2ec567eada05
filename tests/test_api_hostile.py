"""Hostile input to the HTTP API, against a real ``velocityfs serve`` on 127.0.0.1.

- JSON bodies are bounded: one longer than ``api_max_body_bytes`` (1 MiB by
  default) gets 413 before the server reads it (a long Content-Length at once, a
  chunked body as it passes the limit), and JSON nested deeper than 400 levels
  gets 400, never a 500.
- No authkey reaches the log, however the path is spelled: the log names the
  route's template. No endpoint takes a query string (an ``?authkey=`` least of
  all): 400.
- A login for an unknown user costs an argon2 verification, as a wrong password
  does (counted with a hasher that records its calls; the times are benchmarks'
  business, not the suite's).
- What a caller may not see does not exist for it: another tenant's pool, media
  or group answers exactly as an id that does not exist (404, the same message),
  on every endpoint; 403 stays for a pool the caller has some permission on.
- Odd text (NUL, lone surrogates) and numbers (1e308 MiB) get a 4xx, never a 500.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from argon2 import PasswordHasher, extract_parameters
from support.admin import write_config
from support.api import (
    MIB,
    PASSWORD,
    UPLOAD_TEMPLATE,
    Api,
    RawResponse,
    build_world,
    free_port,
    raw_request,
    read_response,
    standalone_fixture,  # noqa: F401
    store_files,
    upload_target,
)

from velocityfs.api.server import serve_api
from velocityfs.service.accounts import AccountService
from velocityfs.service.velocity import Velocity
from velocityfs.threads import Offload, threads_for

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
JSON = {"content-type": "application/json"}
# Every endpoint that takes a JSON body.
JSON_ENDPOINTS = [
    ("POST", "/u/auth"),
    ("PATCH", "/u/auth"),
    ("DELETE", "/u/auth"),
    ("GET", "/p"),
    ("PUT", "/p"),
    ("DELETE", "/p"),
    ("GET", "/p/media"),
    ("PUT", "/p/media"),
    ("DELETE", "/p/media"),
]
# A server that waits for a body it should have refused makes the client wait this long.
EARLY_S = 10.0


def serve(standalone: Any, catalog_url: str, store_dir: Any, **world: Any) -> tuple[Any, Any, Api]:
    """A world (support.api.build_world) and ``velocityfs serve`` on it, with a client."""
    built = build_world(catalog_url, store_dir, **world)
    server = standalone()
    return built, server, Api(server.port)


def open_request(port: int, method: str, target: str, headers: dict[str, str]) -> socket.socket:
    """A connection that has sent a request's head and nothing of its body yet."""
    hdrs = {"Host": f"127.0.0.1:{port}", "Connection": "close", **headers}
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    sock = socket.create_connection(("127.0.0.1", port), timeout=EARLY_S)
    sock.sendall(head.encode("latin-1") + b"\r\n")
    return sock


def early_answer(sock: socket.socket) -> RawResponse:
    """The answer to a request whose body the client has not finished: a server that
    waits for the whole body never gives one (read_response fails after EARLY_S)."""
    try:
        return read_response(sock, timeout=EARLY_S)
    except TimeoutError as exc:
        raise AssertionError(f"no answer within {EARLY_S:.0f} s: the server waits") from exc


def ask(api: Api, method: str, target: str, template: str, body: Any, status: int) -> Any:
    """A JSON request to ``target`` (a path with a query string), checked like Api.call
    against ``template``'s entry in the OpenAPI document."""
    res = api.client.request(method, target, json=body)
    return api.check(res, template, method, status)


def login_body(size: int = 0, **extra: Any) -> bytes:
    """A valid login body for alice, padded with spaces to ``size`` bytes."""
    body = json.dumps({"name": "alice", "password": PASSWORD, **extra}).encode()
    assert len(body) <= size or not size
    return body + b" " * (size - len(body)) if size else body


def nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    """JSON that nests ``depth`` levels below the body's object."""
    return opener * depth + closer * depth if opener == "[" else '{"a":' * depth + "1" + "}" * depth


# -- 1. bounded JSON bodies ---------------------------------------------------------


@SQLITE_ONLY
def test_a_json_body_over_the_limit_gets_413_before_it_is_read(standalone, catalog_url, store_dir):
    _world, server, api = serve(standalone, catalog_url, store_dir, users=["alice"])
    limit = MIB
    try:
        # At the limit: read and served. One byte more: 413, on every JSON endpoint.
        api.call("POST", "/u/auth", content=login_body(limit), headers=JSON)
        api.call("POST", "/u/auth", content=login_body(limit + 1), headers=JSON, status=413)
        for method, path in JSON_ENDPOINTS:
            # A client that sends a 64 MiB Content-Length but nothing of the body gets
            # its 413 at once: the server reads nothing before refusing.
            with open_request(
                server.port, method, path, {"Content-Length": str(64 * MIB), **JSON}
            ) as sock:
                api.check(early_answer(sock), path, method, 413)
        # A chunked body (no length) is refused as soon as it passes the limit,
        # while the client still has not sent its end.
        with open_request(
            server.port, "POST", "/u/auth", {"Transfer-Encoding": "chunked", **JSON}
        ) as sock:
            piece = b" " * (64 * 1024)
            for _ in range(limit // len(piece) + 2):
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            answer = early_answer(sock)
        assert api.check(answer, "/u/auth", "POST", 413)["error"] == (
            f"the body is longer than {limit} bytes"
        )
        # A client that sends all of a too long body (as most do, answer after the body)
        # gets its 413 too: the server reads the rest and drops it.
        api.call("PUT", "/p", content=b"[" * (2 * MIB), headers=JSON, status=413)
        # The server goes on serving.
        assert api.login("alice")
    finally:
        api.close()
    assert server.stop() == 0
    assert "Traceback" not in server.log, server.log


@SQLITE_ONLY
def test_api_max_body_bytes_sets_the_limit(
    standalone, catalog_url, store_dir, tmp_path, monkeypatch
):
    config = write_config(tmp_path / "velocityfs.toml", api_max_body_bytes=4096)
    monkeypatch.setenv("VELOCITYFS_CONFIG", str(config))
    _world, server, api = serve(standalone, catalog_url, store_dir, users=["alice"])
    try:
        api.call("POST", "/u/auth", content=login_body(4096), headers=JSON)
        refused = api.call("POST", "/u/auth", content=login_body(4097), headers=JSON, status=413)
        assert refused == {"error": "the body is longer than 4096 bytes"}
    finally:
        api.close()


@SQLITE_ONLY
def test_json_nested_too_deep_gets_400(standalone, catalog_url, store_dir):
    _world, server, api = serve(standalone, catalog_url, store_dir, users=["alice"])
    deep = "the body nests deeper than 400 levels"
    try:
        # The body's object is level 1: 399 levels below it are allowed, 400 are not.
        for opener, closer in (("[", "]"), ("{", "}")):
            ok = login_body(deep=0).replace(b"0}", f"{nested(399, opener, closer)}}}".encode())
            assert api.call("POST", "/u/auth", content=ok, headers=JSON)["authkey"]
            for depth in (400, 1000, 4000):
                body = login_body(deep=0).replace(
                    b"0}", f"{nested(depth, opener, closer)}}}".encode()
                )
                refused = api.call("POST", "/u/auth", content=body, headers=JSON, status=400)
                assert refused == {"error": deep}, depth
        # At most 10,000 values (counted as the bytes '[', '{', ':' and ','): deeper
        # nesting, or a long list, is refused before it is parsed.
        many = "the body holds more than 10000 values"
        for value in (nested(100_000), "[" + "1," * 10_000 + "1]"):
            body = login_body(deep=0).replace(b"0}", f"{value}}}".encode())
            assert api.call("POST", "/u/auth", content=body, headers=JSON, status=400) == {
                "error": many
            }
        enough = login_body(deep=0).replace(b"0}", ("[" + "1," * 9_000 + "1]}").encode())
        assert api.call("POST", "/u/auth", content=enough, headers=JSON)["authkey"]
        # Deep, but not valid JSON (never closed): 400 too.
        for method, path in JSON_ENDPOINTS:
            api.call(method, path, content=b"[" * 5000, headers=JSON, status=400)
            api.call(method, path, content=b'{"a":' * 5000, headers=JSON, status=400)
    finally:
        api.close()
    assert server.stop() == 0
    assert "Traceback" not in server.log, server.log


# -- 2. no authkey in the log; none in a query string ------------------------------------


@SQLITE_ONLY
def test_no_authkey_in_the_log_however_the_path_is_spelled(standalone, catalog_url, store_dir):
    world, server, api = serve(standalone, catalog_url, store_dir, users=["alice"])
    tenants = world.pids["tenants"]
    try:
        key = api.login("alice")
        spellings = {
            f"/p/media/{key}/{tenants}/a.img": 200,
            f"//p/media/{key}/{tenants}/b.img": 404,
            f"/p//media/{key}/{tenants}/c.img": 404,
            f"/P/media/{key}/{tenants}/d.img": 404,
            f"/p/media//{key}/{tenants}/e.img": 404,
            f"/%70/media/{key}/{tenants}/f.img": 200,  # the server decodes the path
            f"/p/%6dedia/{key}/{tenants}/g.img": 200,
            f"/p/media/{key}": 404,
            f"/p/media/{key}/": 404,
            f"/p/media/{key}/{tenants}/h.img?authkey={key}": 400,
        }
        got = {t: raw_request(server.port, "PUT", t, b"x").status for t in spellings}
        body = json.dumps({"gid": world.gids["acme"]}).encode()
        got["GET /p?authkey"] = raw_request(server.port, "GET", f"/p?authkey={key}", body).status
        wrong_method = raw_request(server.port, "GET", f"/p/media/{key}/{tenants}/a.img")
        got["GET upload"] = wrong_method.status
    finally:
        api.close()
    assert server.stop() == 0
    log = server.log
    assert key not in log, log
    lines = [line for line in log.splitlines() if line.startswith("INFO velocityfs.api: ")]
    assert len(lines) >= len(spellings) + 3, log
    assert "INFO velocityfs.api: PUT /p/media/{authkey}/{pid}/{filename:path} 200 " in log
    assert "INFO velocityfs.api: PUT (unmatched) 404 " in log
    assert "INFO velocityfs.api: GET /p 400 " in log
    assert "INFO velocityfs.api: GET /p/media/{authkey}/{pid}/{filename:path} 405 " in log
    # And each was answered as it should be.
    assert got == {**spellings, "GET /p?authkey": 400, "GET upload": 405}
    assert wrong_method.headers["allow"] == "PUT"
    assert "Traceback" not in log, log


@SQLITE_ONLY
def test_no_endpoint_takes_a_query_string(standalone, catalog_url, store_dir):
    world, server, api = serve(standalone, catalog_url, store_dir, users=["alice"])
    tenants, acme = world.pids["tenants"], world.gids["acme"]
    try:
        key = api.login("alice")
        before = (api.media(key, tenants), store_files(store_dir))
        # The authkey in the query string, the rest in the body: refused, not served.
        for method, path, body in [
            ("GET", "/p", {"gid": acme}),
            ("PUT", "/p", {"parentpool": tenants, "name": "q", "quota_mib": 1}),
            ("GET", "/p/media", {"pid": tenants}),
            ("PUT", "/p/media", {"pid": tenants, "filename": "q.img", "size_mib": 1}),
            ("PATCH", "/u/auth", {}),
        ]:
            refused = ask(api, method, f"{path}?authkey={key}", path, body, 400)
            assert "query string" in refused["error"], refused
            # Any parameter, even beside a complete body.
            ask(api, method, f"{path}?x=1", path, {**body, "authkey": key}, 400)
        login = {"name": "alice", "password": PASSWORD}
        ask(api, "POST", "/u/auth?name=alice", "/u/auth", login, 400)
        api.raw(
            "PUT",
            f"{upload_target(key, tenants, 'q.iso')}?x=1",
            UPLOAD_TEMPLATE,
            body=b"q",
            status=400,
        )
        assert (api.media(key, tenants), store_files(store_dir)) == before
        # A bare '?' is no parameter.
        body = json.dumps({"authkey": key, "gid": acme}).encode()
        assert api.raw("GET", "/p?", "/p", body=body, headers=JSON, status=200)["gid"] == acme
    finally:
        api.close()


# -- 3. constant-cost login ------------------------------------------------------------


class CountingHasher(PasswordHasher):
    """argon2's hasher, recording every hash it verifies a password against."""

    def __init__(self) -> None:
        super().__init__()
        self.verified: list[str] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> Any:
        self.verified.append(hash.decode() if isinstance(hash, bytes) else hash)
        return super().verify(hash, password)


@contextlib.contextmanager
def api_in_this_process(velocity: Velocity) -> Iterator[int]:
    """The API served by Hypercorn on 127.0.0.1 from a trio loop in a thread of this
    process (so the test can hand it objects); yields the port."""
    port = free_port()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        with trio.CancelScope() as scope:
            box["scope"], box["token"] = scope, trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                offload = Offload(threads_for(velocity.db.is_sqlite))
                holder = velocity.ledger.register_holder()
                serve = functools.partial(
                    serve_api, velocity, offload, lambda: holder, f"127.0.0.1:{port}"
                )
                await nursery.start(serve)
                started.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported by the test
            box["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30), "the API did not start within 30 s"
    if "error" in box:
        raise AssertionError(f"the API did not start: {box['error']!r}")
    try:
        yield port
    finally:
        trio.from_thread.run_sync(box["scope"].cancel, trio_token=box["token"])
        thread.join(30)
        assert "error" not in box, box["error"]


def test_a_login_for_an_unknown_user_verifies_a_hash_too(catalog_url, store_dir):
    build_world(catalog_url, store_dir, users=["alice"])
    velocity = Velocity(catalog_url, store_dir)
    hasher = CountingHasher()
    velocity.accounts = AccountService(velocity.db, velocity.chains, hasher=hasher)
    try:
        with api_in_this_process(velocity) as port, httpx.Client(timeout=60) as client:

            def login(name: str, password: str) -> httpx.Response:
                return client.post(
                    f"http://127.0.0.1:{port}/u/auth", json={"name": name, "password": password}
                )

            wrong = login("alice", "wrong")
            assert wrong.status_code == 403 and len(hasher.verified) == 1
            stored = hasher.verified[0]
            unknown = login("mallory", PASSWORD)
            assert unknown.status_code == 403 and unknown.json() == wrong.json()
            assert len(hasher.verified) == 2, "no argon2 verification for an unknown user"
            # ... against a hash of the same cost as a real user's (memory, time, lanes).
            assert extract_parameters(hasher.verified[1]) == extract_parameters(stored)
            # A name no user can have (the naming rule) costs the same, unasked.
            for name in ("a/b", "..", "x" * 300):
                assert login(name, PASSWORD).json() == wrong.json()
            assert len(hasher.verified) == 5
            assert [extract_parameters(h) for h in hasher.verified] == [
                extract_parameters(stored)
            ] * 5
            right = login("alice", PASSWORD)
            assert right.status_code == 200 and len(hasher.verified) == 6
    finally:
        velocity.close()


# -- 4. no existence oracle ---------------------------------------------------------------


def same_answer(unknown: Any, unknown_id: str, hidden: Any, hidden_id: str) -> None:
    """Two answers that must not tell an id that does not exist from one the caller
    may not see: the same status (404) and the same message, but for the id itself."""
    assert unknown["status"] == hidden["status"] == 404, (unknown, hidden)
    assert unknown["error"].replace(unknown_id, "ID") == hidden["error"].replace(hidden_id, "ID")
    assert unknown_id in unknown["error"] and hidden_id in hidden["error"]


def test_what_a_caller_may_not_see_does_not_exist(standalone, catalog_url, store_dir):
    world, server, api = serve(
        standalone,
        catalog_url,
        store_dir,
        users=["alice", "bob", "vera", "nobody"],
        subpools={"isos/sub": 50, "tenants/vm": 100},
    )
    pids, gids = world.pids, world.gids
    isos, sub, tenants, vm = pids["isos"], pids["isos/sub"], pids["tenants"], pids["tenants/vm"]
    try:
        alice, bob, vera, nobody = (api.login(u) for u in ("alice", "bob", "vera", "nobody"))
        bob_iso = api.create_media(bob, sub, "b.iso", 1)["mid"]
        alice_img = api.create_media(alice, vm, "a.img", 1)["mid"]
        hidden_files = store_files(store_dir)

        def answer(method: str, path: str, body: dict[str, Any], key: str) -> dict[str, Any]:
            res = api.client.request(method, path, json={**body, "authkey": key})
            return {"status": res.status_code, **api.check(res, path, method, res.status_code)}

        def upload(key: str, pid: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
            target = upload_target(key, pid, "x.img")
            res = api.client.put(target, content=b"x" * 100, headers=headers)
            return {"status": res.status_code, **api.check(res, UPLOAD_TEMPLATE, "PUT", 404)}

        # (caller, an id of another tenant's object it has no share on)
        strangers = [
            (alice, isos, sub, bob_iso, gids["globex"]),
            (bob, tenants, vm, alice_img, gids["acme"]),
            (nobody, tenants, isos, alice_img, gids["viewers"]),
        ]
        for key, pool, subpool, media, group in strangers:
            for hidden_pool in (pool, subpool):
                unknown_pool = str(uuid.uuid4())
                for method, path, body in [
                    ("PUT", "/p", {"name": "x", "quota_mib": 1}),
                    ("DELETE", "/p", {}),
                    ("GET", "/p/media", {}),
                    ("PUT", "/p/media", {"filename": "x.img", "size_mib": 1}),
                ]:
                    field = "parentpool" if method == "PUT" and path == "/p" else "pid"
                    same_answer(
                        answer(method, path, {**body, field: unknown_pool}, key),
                        unknown_pool,
                        answer(method, path, {**body, field: hidden_pool}, key),
                        hidden_pool,
                    )
                same_answer(
                    upload(key, unknown_pool), unknown_pool, upload(key, hidden_pool), hidden_pool
                )
                # refused before the body, even one that could never fit
                huge = {"Content-Length": str(1 << 40)}
                for pid in (unknown_pool, hidden_pool):
                    res = api.raw(
                        "PUT",
                        upload_target(key, pid, "y.img"),
                        UPLOAD_TEMPLATE,
                        headers=huge,
                        status=404,
                    )
                    assert res["error"] == f"no pool {pid}"
            unknown_media = str(uuid.uuid4())
            same_answer(
                answer("DELETE", "/p/media", {"mid": unknown_media}, key),
                unknown_media,
                answer("DELETE", "/p/media", {"mid": media}, key),
                media,
            )
            unknown_group = str(uuid.uuid4())
            same_answer(
                answer("GET", "/p", {"gid": unknown_group}, key),
                unknown_group,
                answer("GET", "/p", {"gid": group}, key),
                group,
            )
            for name in ("no-such-group", "globex" if key != bob else "acme"):
                assert answer("GET", "/p", {"gid": name}, key) == {
                    "status": 404,
                    "error": f"no group {name}",
                }

        # 403 stays where the caller has some permission on the pool, but not this one:
        # vera may view tenants (and its media), not change anything there.
        for method, path, body in [
            ("PUT", "/p", {"parentpool": vm, "name": "x", "quota_mib": 1}),
            ("DELETE", "/p", {"pid": vm}),
            ("PUT", "/p/media", {"pid": vm, "filename": "x.img", "size_mib": 1}),
            ("DELETE", "/p/media", {"mid": alice_img}),
        ]:
            assert answer(method, path, body, vera)["status"] == 403, (method, path)
        api.upload(vera, vm, "x.img", b"x", status=403)
        api.pools(vera, gids["acme"], status=404)  # not her group
        assert [m["mid"] for m in api.media(vera, vm)["media"]] == [alice_img]
        # alice's share of 'hidden' lacks view but grants create: she knows it exists.
        api.delete_pool(alice, pids["hidden"], status=403)
        api.create_media(alice, pids["hidden"], "blind.img", 1)

        # Nothing of the refused requests happened.
        assert [m["mid"] for m in api.media(bob, sub)["media"]] == [bob_iso]
        assert [m["mid"] for m in api.media(alice, vm)["media"]] == [alice_img]
        assert len(store_files(store_dir)) == len(hidden_files) + 1  # blind.img
    finally:
        api.close()
    assert server.stop() == 0
    assert "Traceback" not in server.log, server.log


# -- no 5xx from odd text or numbers ----------------------------------------------------------


def test_odd_text_and_numbers_get_4xx(standalone, catalog_url, store_dir):
    """NUL (which PostgreSQL refuses in any text), lone surrogates (which no catalog can
    store, nor a JSON answer carry), over-long ids and numbers beyond any quota: each a
    4xx, never a 500, and nothing changes. (The bounded schemathesis run of
    test_api_schemathesis.py may not meet these; here they are sent every time.)"""
    world, server, api = serve(standalone, catalog_url, store_dir, users=["alice"])
    tenants, acme = world.pids["tenants"], world.gids["acme"]
    long_id = "0" * 5000
    try:
        key = api.login("alice")
        mid = api.create_media(key, tenants, "keep.img", 1)["mid"]
        before = (api.media(key, tenants), store_files(store_dir))
        pool = {"authkey": key, "parentpool": tenants, "name": "p", "quota_mib": 1}
        media = {"authkey": key, "pid": tenants, "filename": "m.img", "size_mib": 1}
        cases: list[tuple[str, str, dict[str, Any], int]] = []
        for odd in ("a\0b", "\ud800", "\udfff x"):
            cases += [
                ("POST", "/u/auth", {"name": odd, "password": PASSWORD}, 400),
                ("POST", "/u/auth", {"name": "alice", "password": odd}, 400),
                ("PATCH", "/u/auth", {"authkey": odd}, 403),
                ("GET", "/p", {"authkey": key, "gid": odd}, 400),
                ("PUT", "/p", {**pool, "parentpool": odd}, 400),
                ("PUT", "/p", {**pool, "name": odd}, 400),
                ("DELETE", "/p", {"authkey": key, "pid": odd}, 400),
                ("GET", "/p/media", {"authkey": key, "pid": odd}, 400),
                ("PUT", "/p/media", {**media, "pid": odd}, 400),
                ("PUT", "/p/media", {**media, "filename": odd}, 400),
                ("DELETE", "/p/media", {"authkey": key, "mid": odd}, 400),
                ("GET", "/p", {"authkey": odd, "gid": acme}, 403),
            ]
        cases += [
            ("POST", "/u/auth", {"name": "x" * 5000, "password": PASSWORD}, 403),
            ("GET", "/p", {"authkey": key, "gid": long_id}, 404),
            ("PUT", "/p", {**pool, "parentpool": long_id}, 404),
            ("DELETE", "/p", {"authkey": key, "pid": long_id}, 404),
            ("GET", "/p/media", {"authkey": key, "pid": long_id}, 404),
            ("DELETE", "/p/media", {"authkey": key, "mid": long_id}, 404),
        ]
        for number in (1e308, 10**400, 10**12, "1e3", " 1", "1_0", "0x10", "1" * 5000):
            cases += [
                ("PUT", "/p", {**pool, "quota_mib": number}, 400),
                ("PUT", "/p/media", {**media, "size_mib": number}, 400),
            ]
        for method, path, body, status in cases:
            res = api.client.request(method, path, content=json.dumps(body), headers=JSON)
            api.check(res, path, method, status)
        for literal in (b"NaN", b"Infinity", b"-Infinity", b"1" * 5000):
            body = (
                json.dumps({**media, "size_mib": 0})
                .encode()
                .replace(b'"size_mib": 0', b'"size_mib": ' + literal)
            )
            api.call("PUT", "/p/media", content=body, headers=JSON, status=400)
        # The upload's path: NUL or an over-long id there names no pool, an odd name is 400.
        for pid in ("%00", "a%00b", long_id):
            api.raw("PUT", f"/p/media/{key}/{pid}/x.img", UPLOAD_TEMPLATE, body=b"x", status=404)
        api.raw("PUT", f"/p/media/a%00b/{tenants}/x.img", UPLOAD_TEMPLATE, body=b"x", status=403)
        api.raw("PUT", f"/p/media/{key}/{tenants}/a%00b", UPLOAD_TEMPLATE, body=b"x", status=400)
        # The Bearer header, in latin-1.
        bearer = {"Authorization": b"Bearer \xe9\xff"}
        res = api.client.request("GET", "/p", json={"gid": acme}, headers=bearer)
        api.check(res, "/p", "GET", 403)
        assert (api.media(key, tenants), store_files(store_dir)) == before
        assert api.delete_media(key, mid) == {}
    finally:
        api.close()
    assert server.stop() == 0
    assert "Traceback" not in server.log, server.log
