"""The shim's /u/auth endpoint and the authkey check every other endpoint makes.

POST /u/auth turns a name and password into an authkey with an expiry, PATCH
renews it, DELETE drops it. Every pool and media endpoint refuses a missing,
unknown, dropped or expired authkey with 403 and changes nothing; the authkey
is accepted in the JSON body and as ``Authorization: Bearer``.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import create_engine, text
from support.api import (
    MIB,
    PASSWORD,
    UPLOAD_TEMPLATE,
    api_mount_fixture,  # noqa: F401
    store_files,
    upload_target,
)

JSON = {"content-type": "application/json"}
NOT_OBJECTS = [b"{", b"not json", b'{"name": "alice",}', b"[]", b'["alice"]', b'"x"', b"42"]


def expire(catalog: str, authkey: str) -> None:
    """Let an authkey's hour pass: set its expiry in the catalog to a moment ago."""
    engine = create_engine(catalog)
    try:
        with engine.begin() as conn:
            done = conn.execute(
                text("UPDATE authkeys SET expires_ns = :t WHERE key_hash = :h"),
                {
                    "t": time.time_ns() - 1_000_000_000,
                    "h": hashlib.sha256(authkey.encode()).hexdigest(),
                },
            ).rowcount
    finally:
        engine.dispose()
    assert done == 1, "the authkey row was not found in the catalog"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_login_renew_drop(api_mount):
    s = api_mount(users=["alice"])
    api = s.api

    # POST: a fresh authkey that expires in an hour; every login gets its own key.
    before = time.time()
    issued = api.call("POST", "/u/auth", {"name": "alice", "password": PASSWORD})
    key, expires = issued["authkey"], issued["expires"]
    assert len(key) >= 32
    assert before + 3600 - 5 <= expires <= time.time() + 3600 + 5
    other = api.login("alice")
    assert other != key

    # Wrong password, unknown user: 403, and no hint which of the two it was.
    wrong = api.call("POST", "/u/auth", {"name": "alice", "password": "wrong"}, status=403)
    unknown = api.call("POST", "/u/auth", {"name": "mallory", "password": PASSWORD}, status=403)
    assert wrong["error"] == unknown["error"]
    api.call("POST", "/u/auth", {"name": "alice", "password": PASSWORD.upper()}, status=403)

    # Missing or malformed fields, bad JSON, a body that is not an object: 400.
    for body in [
        {},
        {"name": "alice"},
        {"password": PASSWORD},
        {"name": "alice", "password": 12345},
        {"name": "", "password": PASSWORD},
        {"name": ["alice"], "password": PASSWORD},
        {"name": "alice", "password": None},
    ]:
        api.call("POST", "/u/auth", body, status=400)
    for raw in [*NOT_OBJECTS, b"null", b""]:
        api.call("POST", "/u/auth", content=raw, headers=JSON, status=400)

    # PATCH renews: the same key with a later expiry (whole seconds, hence the pause).
    time.sleep(1.1)
    renewed = api.call("PATCH", "/u/auth", {"authkey": key})
    assert renewed["authkey"] == key
    assert renewed["expires"] > expires
    by_header = api.call("PATCH", "/u/auth", headers=bearer(key))
    assert by_header["authkey"] == key and by_header["expires"] >= renewed["expires"]
    api.pools(key, s.gids["acme"])

    api.call("PATCH", "/u/auth", {}, status=403)
    api.call("PATCH", "/u/auth", {"authkey": ""}, status=403)
    api.call("PATCH", "/u/auth", {"authkey": 42}, status=403)
    api.call("PATCH", "/u/auth", {"authkey": secrets.token_urlsafe(32)}, status=403)
    api.call("PATCH", "/u/auth", headers=bearer(secrets.token_urlsafe(32)), status=403)
    for raw in NOT_OBJECTS:
        api.call("PATCH", "/u/auth", content=raw, headers=JSON, status=400)

    # DELETE drops exactly this key.
    api.call("DELETE", "/u/auth", {}, status=403)
    api.call("DELETE", "/u/auth", {"authkey": secrets.token_urlsafe(32)}, status=403)
    for raw in NOT_OBJECTS:
        api.call("DELETE", "/u/auth", content=raw, headers=JSON, status=400)
    assert api.call("DELETE", "/u/auth", {"authkey": key}) == {}
    api.pools(key, s.gids["acme"], status=403)
    api.call("GET", "/p", {"gid": s.gids["acme"]}, headers=bearer(key), status=403)
    api.call("PATCH", "/u/auth", {"authkey": key}, status=403)
    api.call("DELETE", "/u/auth", {"authkey": key}, status=403)
    api.pools(other, s.gids["acme"])

    # Dropped by Bearer too.
    assert api.call("DELETE", "/u/auth", headers=bearer(other)) == {}
    api.pools(other, s.gids["acme"], status=403)


def test_every_endpoint_checks_the_authkey(api_mount, catalog_url):
    """Missing, unknown, dropped and expired authkeys get 403 everywhere; nothing changes."""
    s = api_mount(subpools={"tenants/vm": 100}, users=["alice"])
    api = s.api
    tenants, vm = s.pids["tenants"], s.pids["tenants/vm"]
    live = s.key("alice")
    mid = api.create_media(live, vm, "disk.img", 4)["mid"]

    dropped = api.login("alice")
    api.call("DELETE", "/u/auth", {"authkey": dropped})
    expired = api.login("alice")
    expire(catalog_url, expired)
    api.call("PATCH", "/u/auth", {"authkey": expired}, status=403)  # too late to renew
    unknown = secrets.token_urlsafe(32)

    requests = [
        ("GET", "/p", {"gid": s.gids["acme"]}),
        ("PUT", "/p", {"parentpool": tenants, "name": "new", "quota_mib": 1}),
        ("DELETE", "/p", {"pid": vm}),
        ("GET", "/p/media", {"pid": vm}),
        ("PUT", "/p/media", {"pid": vm, "filename": "new.img", "size_mib": 1}),
        ("DELETE", "/p/media", {"mid": mid}),
    ]
    media_before = api.media(live, vm)
    files_before = store_files(s.store)
    usage_before = s.used("tenants", "tenants/vm")

    for method, path, body in requests:
        api.call(method, path, body, status=403)  # no authkey at all
        api.call(method, path, {**body, "authkey": ""}, status=403)
        api.call(method, path, {**body, "authkey": None}, status=403)
        api.call(
            method, path, headers={"Authorization": "Basic YWxpY2U6cHc="}, content=b"", status=403
        )
        for bad in (unknown, dropped, expired):
            api.call(method, path, {**body, "authkey": bad}, status=403)
            api.call(method, path, body, headers=bearer(bad), status=403)
    for bad in (unknown, dropped, expired):
        api.upload(bad, vm, "up.img", b"x" * 1000, status=403)
        # refused before the body: even one that would not fit anywhere
        api.raw(
            "PUT",
            upload_target(bad, vm, "huge.img"),
            UPLOAD_TEMPLATE,
            headers={"Content-Length": str(1 << 40)},
            status=403,
        )

    assert api.media(live, vm) == media_before
    assert store_files(s.store) == files_before
    assert s.used("tenants", "tenants/vm") == usage_before
    assert sorted(p.name for p in (s.mount / "tenants").iterdir()) == ["vm"]
    assert sorted(p.name for p in (s.mount / "tenants" / "vm").iterdir()) == ["disk.img"]

    # The live key works on every endpoint, also as Bearer.
    auth = bearer(live)
    listed = api.call("GET", "/p", {"gid": s.gids["acme"]}, headers=auth)
    assert [p["pid"] for p in listed["pools"]] == [tenants, vm]
    sub = api.call("PUT", "/p", {"parentpool": vm, "name": "sub", "quota_mib": 10}, headers=auth)[
        "pid"
    ]
    made = api.call(
        "PUT", "/p/media", {"pid": sub, "filename": "b.img", "size_mib": 2}, headers=auth
    )
    got = api.call("GET", "/p/media", {"pid": sub}, headers=auth)
    assert [(m["mid"], m["size_mib"]) for m in got["media"]] == [(made["mid"], 2)]
    assert api.call("DELETE", "/p/media", {"mid": made["mid"]}, headers=auth) == {}
    assert api.call("DELETE", "/p", {"pid": sub}, headers=auth) == {}
    assert api.call("DELETE", "/p/media", {"mid": mid}, headers=auth) == {}
    assert s.used("tenants/vm")["tenants/vm"] == 0
    assert usage_before["tenants/vm"] == 4 * MIB
