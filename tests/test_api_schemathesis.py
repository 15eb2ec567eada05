"""No input gets a 5xx, and the served OpenAPI description says what the server does.

``st run`` (the schemathesis CLI) runs against a real ``velocityfs serve`` on
127.0.0.1 with every one of its checks and phases (examples, coverage, fuzzing,
stateful along the document's links), positive and negative data, for a bounded
number of examples per operation, and fails on every warning it shows by default
as well as on every failed check: a schema-valid request refused (ST202), a
schema-violating one accepted (ST201), too many 400s for valid data (validation
mismatch) or 404s (missing test data) and the like. Only the opt-in
``low_valid_rate`` stays off: it counts 409s (a name generated twice), which
say nothing about the document.

Its dictionaries put real authkeys, ids of real pools, media and groups, the
password and small sizes into the requests most of the time, and the hooks of
``support/schemathesis_hooks.py`` give most of the other requests a live authkey
too, so they reach past the authkey check into the service and the catalog:
pools and media are created, listed and removed, and odd ids (NUL, which
PostgreSQL refuses) meet the catalog. DELETE /p removes only pools made for it.

Two allowances, each for something a schema cannot say:

- ``positive_data_acceptance`` also accepts 406 and 413: a well-formed quota or
  size may be refused by the quota rule (the seed document's 406 and 413);
- a generated pool or file name longer than 255 bytes in UTF-8 (but not 255
  characters) is no valid data, as JSON Schema counts characters only: a hook
  keeps such names out of the positive cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.api import PASSWORD, Api, build_world, standalone_fixture  # noqa: F401

# Examples per operation and phase, and steps per stateful scenario (each a real request):
# 61 s (SQLite) and 89 s (PostgreSQL) measured with a load average of 8 on 2 cores.
MAX_EXAMPLES = 20
MAX_STEPS = 6
# Pools made for DELETE /p to remove (the others stay, for the other operations).
DOOMED = [f"tenants/fuzz/d{i}" for i in range(6)]
HOOKS = "support.schemathesis_hooks"
TESTS = Path(__file__).parent


def toml_value(value: Any) -> str:
    """``value`` (dicts, lists, strings, numbers, booleans) as TOML: JSON's strings and
    numbers are TOML's, its objects become inline tables."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def st_config(port: int, dictionaries: dict[str, list[Any]]) -> dict[str, Any]:
    """Every phase and check, failing on the warnings; the dictionaries bound to fields."""
    bound = {"probability": 0.85}
    return {
        "seed": 20240611,
        "base-url": f"http://127.0.0.1:{port}",
        "hooks": HOOKS,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES},
        "phases": {"stateful": {"max-steps": MAX_STEPS}},
        "checks": {
            "enabled": True,
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "401", "403", "404", "406", "409", "413"]
            },
        },
        "warnings": {"fail-on": True},
        "request-timeout": 30,
        "dictionaries": {name: {"values": values} for name, values in dictionaries.items()},
        "parameters": {
            "body.authkey": {"dictionary": "keys", **bound},
            "path.authkey": {"dictionary": "keys", **bound},
            "body.pid": {"dictionary": "pools", **bound},
            "path.pid": {"dictionary": "pools", **bound},
            "body.parentpool": {"dictionary": "pools", **bound},
            "body.mid": {"dictionary": "media", **bound},
            "body.gid": {"dictionary": "groups", **bound},
            "body.quota_mib": {"dictionary": "sizes", "probability": 0.5},
            "body.size_mib": {"dictionary": "sizes", "probability": 0.5},
            "body.name": {"dictionary": "users", "probability": 0.2},
            "body.password": {"dictionary": "passwords", "probability": 0.2},
        },
        "operations": [
            {
                "include-name": "DELETE /p",
                "parameters": {"body.pid": {"dictionary": "doomed", **bound}},
            }
        ],
    }


@pytest.mark.timeout(300)
def test_schemathesis_finds_nothing(standalone, catalog_url, store_dir, tmp_path):
    # vera may view tenants (and its media) and do everything in tenants/fuzz: the fuzzer
    # acts there, meets 403 above it and 404 (not hers) in isos.
    world = build_world(
        catalog_url,
        store_dir,
        users=["vera"],
        subpools={
            "tenants/fuzz": 200,
            "tenants/fuzz/a": 50,
            "tenants/fuzz/b": None,
            **{path: 1 for path in DOOMED},
        },
        shares=[("tenants/fuzz", "viewers", ["--all"])],
    )
    server = standalone()
    api = Api(server.port)
    try:
        keys = [api.login("vera") for _ in range(4)]
        # For DELETE /u/auth to drop (the hooks keep the live keys from it).
        droppable = [api.login("vera") for _ in range(2)]
        pids = world.pids
        fuzz = [pids["tenants/fuzz"], pids["tenants/fuzz/a"], pids["tenants/fuzz/b"]]
        media = [api.create_media(keys[0], p, f"m{i}.img", 1)["mid"] for i, p in enumerate(fuzz)]
    finally:
        api.close()
    dictionaries = {
        "keys": keys,
        "pools": [*fuzz, pids["tenants"], pids["isos"], pids["hidden"]],
        "doomed": [pids[path] for path in DOOMED],
        "media": media,
        "groups": [world.gids["viewers"], world.gids["acme"], "viewers"],
        "sizes": [1, "2", 0.5],
        "users": ["vera"],
        "passwords": [PASSWORD],
    }
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "".join(
            f"{json.dumps(k)} = {toml_value(v)}\n"
            for k, v in st_config(server.port, dictionaries).items()
        )
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        VELOCITYFS_FUZZ_KEYS=",".join(keys),
        VELOCITYFS_FUZZ_DROP_KEYS=",".join(droppable),
    )
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from schemathesis.cli import schemathesis; schemathesis()",
            "--config-file",
            str(config),
            "--no-color",
            "run",
            f"http://127.0.0.1:{server.port}/openapi.json",
        ],  # fmt: skip
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, f"st run exited with {run.returncode}:\n{report[-20000:]}"
    # It tested what it should: every operation, every phase, the stateful one along links.
    assert "Tested: 10" in report, report
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in report, report
    assert server.stop() == 0
    assert "Traceback" not in server.log, server.log
