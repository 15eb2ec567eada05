"""``velocityfs serve``: the shim on its own against the catalog, without a mount.

Set up with the CLI as an operator would, then: the served OpenAPI document,
login, GET /p, media creation and upload (the backing files land in the store),
quota refusals, removal, and a clean exit on SIGTERM.
"""

from __future__ import annotations

import json
import os

from jsonschema import Draft202012Validator
from support.api import (
    MIB,
    Api,
    backing_file,
    cli_batch,
    standalone_fixture,  # noqa: F401
    store_files,
)

PASSWORD = "op's s3cret passphrase"
OPS_PERMISSIONS = ["view", "create", "remove", "media.view", "media.create", "media.remove"]

# The endpoints and statuses of docs/pool-management-api.md, plus the shim's /u/auth;
# the served document must describe at least these.
SEED_STATUSES = {
    ("/u/auth", "post"): {200, 400, 403},
    ("/u/auth", "patch"): {200, 403},
    ("/u/auth", "delete"): {200, 403},
    ("/p", "get"): {200, 404},
    ("/p", "put"): {200, 403, 406, 409},
    ("/p", "delete"): {200, 403, 404},
    ("/p/media", "get"): {200, 403, 404},
    ("/p/media", "put"): {200, 403, 409, 413},
    ("/p/media", "delete"): {200, 403, 404},
    ("/p/media/{authkey}/{pid}/{filename}", "put"): {200, 403, 409, 413},
}


def check_document(doc: dict) -> None:
    """The served OpenAPI document describes the API and its schemas are valid."""
    assert doc["openapi"].startswith("3.1")
    for (path, method), statuses in SEED_STATUSES.items():
        op = doc["paths"].get(path, {}).get(method)
        assert op is not None, f"{method.upper()} {path} is not documented"
        documented = {int(code) for code in op["responses"]}
        assert statuses <= documented, f"{method.upper()} {path}: {statuses - documented}"
        for code, response in op["responses"].items():
            schema = response["content"]["application/json"]["schema"]
            Draft202012Validator.check_schema(schema)
            if int(code) >= 400:
                assert schema["required"] == ["error"], f"{method} {path} {code}"
        body = op["requestBody"]["content"]
        for media_type in body.values():
            Draft202012Validator.check_schema(media_type["schema"])
        if path != "/p/media/{authkey}/{pid}/{filename}":
            assert "application/json" in body
            if path != "/u/auth" or method != "post":
                assert "authkey" in body["application/json"]["schema"]["properties"]


def test_standalone_serve(cli, standalone, catalog_url, store_dir):
    cli_batch(
        catalog_url,
        store_dir,
        [
            (["init"], None),
            (["pool", "create", "tenants", "--quota-mib", "64"], None),
            (["group", "add", "ops"], None),
        ],
    )
    cli("user", "add", "op", "--password-stdin", input=PASSWORD + "\n", check=True)
    *_, groups, shown = cli_batch(
        catalog_url,
        store_dir,
        [
            (["member", "add", "ops", "op"], None),
            (["share", "tenants", "ops", *OPS_PERMISSIONS], None),
            (["group", "list", "--json"], None),
            (["pool", "show", "tenants", "--json"], None),
        ],
    )
    gid = {g["name"]: g["gid"] for g in json.loads(groups)}["ops"]
    tenants = json.loads(shown)["pid"]

    server = standalone()
    api = Api(server.port)
    try:
        check_document(api.openapi.doc)

        api.login("op", "wrong", status=403)
        key = api.login("op", PASSWORD)
        listed = api.pools(key, gid)
        assert listed["gid"] == gid
        (pool,) = listed["pools"]
        assert (pool["pid"], pool["name"], pool["quota_mib"], pool["used_mib"]) == (
            tenants,
            "tenants",
            64,
            0,
        )
        assert pool["permissions"] == sorted(f"velocity.pool.{p}" for p in OPS_PERMISSIONS)
        api.pools(key, "no-such-group", status=404)

        # Media creation: a sparse backing file in the store, charged to the pool.
        disk = api.create_media(key, tenants, "disk.img", 8)
        assert disk["filename"] == "disk.img" and disk["pid"] == tenants
        path = backing_file(store_dir, disk["mid"])
        assert os.path.getsize(path) == 8 * MIB
        api.create_media(key, tenants, "disk.img", 1, status=409)
        api.create_media(key, tenants, "big.img", 57, status=413)

        # An upload, streamed into the store.
        content = os.urandom(MIB + 123)
        iso = api.upload(key, tenants, "seed.iso", content)
        assert backing_file(store_dir, iso["mid"]).read_bytes() == content
        api.upload(key, tenants, "huge.iso", bytes(56 * MIB), status=413)
        media = {m["filename"]: m for m in api.media(key, tenants)["media"]}
        assert sorted(media) == ["disk.img", "seed.iso"]
        assert media["disk.img"]["size_mib"] == 8
        assert media["seed.iso"]["size_bytes"] == MIB + 123
        shown = json.loads(cli("pool", "show", "tenants", "--json", check=True).stdout)
        assert shown["used_bytes"] == 9 * MIB + 123

        # Pools below it; the quota rule holds here as in the mount.
        sub = api.create_pool(key, tenants, "sub", 32)["pid"]
        api.create_pool(key, tenants, "sub", 1, status=409)
        api.create_pool(key, sub, "deeper", 33, status=406)

        # Shares are read from the catalog on every request: a change shows at once.
        cli("share", "tenants", "ops", "--all", check=True)
        (pool,) = api.pools(key, gid)["pools"]
        assert "velocity.pool.media.read" in pool["permissions"]

        # Removal takes the backing files.
        assert api.delete_media(key, disk["mid"]) == {}
        assert not path.exists()
        assert api.delete_pool(key, sub) == {}
        api.delete_pool(key, sub, status=404)
        assert store_files(store_dir) == {
            str(backing_file(store_dir, iso["mid"]).relative_to(store_dir))
        }

        renewed = api.call("PATCH", "/u/auth", {"authkey": key})
        assert renewed["authkey"] == key
        assert api.call("DELETE", "/u/auth", {"authkey": key}) == {}
        api.pools(key, gid, status=403)
    finally:
        api.close()

    # SIGTERM (how systemd stops it) ends it cleanly.
    assert server.stop() == 0, server.log
    assert "Traceback" not in server.log, server.log
    assert "velocityfs: serving" in server.log
    # A clean stop leaves nothing for fsck to report: no directory of its uploads either.
    checked = cli("fsck")
    assert (checked.returncode, checked.stdout) == (0, "0 repaired, 0 remaining\n"), (
        checked.stdout + checked.stderr
    )
