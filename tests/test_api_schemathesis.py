"""No input gets a 5xx, and the served OpenAPI description says what the server does.

Schemathesis runs against a real ``velocityfs serve`` on 127.0.0.1 with every
one of its checks and phases (examples, coverage, fuzzing, stateful), positive
and negative data, for a bounded number of examples per operation. Its
dictionaries put real authkeys and ids of real pools, media and groups into
the requests most of the time, and a hook gives most of the other requests a
live authkey too, so they reach past the authkey check into the service and
the catalog: pools and media are created, listed and removed, and odd ids
(NUL, which PostgreSQL refuses) meet the catalog.

Two allowances, each for something a schema cannot say:

- ``positive_data_acceptance`` also accepts 406 and 413: a well-formed quota or
  size may be refused by the quota rule (the seed document's 406 and 413);
- a generated pool or file name longer than 255 bytes in UTF-8 (but not 255
  characters) is no valid data, as JSON Schema counts characters only:
  ``positive_names_fit`` keeps such names out of the positive cases.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import Status, events, from_schema
from support.api import Api, build_world, standalone_fixture  # noqa: F401

# Examples per operation and phase: ~25 s per backend here (each is a real request).
MAX_EXAMPLES = 30
NAME_FIELDS = ("name", "filename")
# The live authkeys of the run (set by the test): see ``with_live_authkey``.
LIVE_KEYS: list[str] = []


@schemathesis.hook("before_call")
def with_live_authkey(context: Any, case: Any, kwargs: Any) -> None:
    """Three requests in four carry a live authkey, whatever was generated for it, so
    that their other fields (negative ones too) reach the service and the catalog:
    schemathesis's dictionaries do not reach its coverage phase, whose requests would
    otherwise all end at the authkey check. (Schemathesis revalidates an edited case.)"""
    if not LIVE_KEYS:
        return
    pick = zlib.crc32(repr((case.method, case.path, case.body, case.path_parameters)).encode())
    if pick % 4 == 0:
        return
    key = LIVE_KEYS[pick % len(LIVE_KEYS)]
    if isinstance(case.body, dict) and "authkey" in case.body:
        case.body["authkey"] = key
    if case.path_parameters and "authkey" in case.path_parameters:
        case.path_parameters["authkey"] = key


@schemathesis.hook("filter_case")
def positive_names_fit(context: Any, case: Any) -> bool:
    """Positive cases only with names that fit 255 bytes (see the module docstring)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    values = [case.path_parameters.get("filename")] if case.path_parameters else []
    if isinstance(case.body, dict):
        values += [case.body.get(field) for field in NAME_FIELDS]
    return all(
        not isinstance(v, str) or len(v.encode("utf-8", "surrogatepass")) <= 255 for v in values
    )


def run_schemathesis(port: int, dictionaries: dict[str, list[str]]) -> tuple[list[str], int]:
    """Every phase and check against the server on ``port``; the problems found (failed
    checks, errors) and the number of scenarios run."""
    bound = {"probability": 0.85}
    config = schemathesis.Config.from_dict(
        {
            "seed": 20240611,
            "base-url": f"http://127.0.0.1:{port}",
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES},
            "phases": {"stateful": {"max-steps": 10}},
            "checks": {
                "enabled": True,
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "401", "403", "404", "406", "409", "413"]
                },
            },
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
                "body.name": {"dictionary": "users", "probability": 0.2},
            },
        }
    )
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json", config=config)
    problems: list[str] = []
    scenarios = 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            scenarios += 1
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        problems.append(
                            f"{event.recorder.label}: {check.name}: {failure.title}\n"
                            f"{failure.message}\n{check.failure_info.code_sample}"
                        )
            if event.status == Status.ERROR:
                problems.append(f"{event.recorder.label}: error")
        elif isinstance(event, events.NonFatalError):
            problems.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            problems.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            problems += [f"after the run: {f.title}: {f.message}" for f in event.failures]
    return problems, scenarios


@pytest.mark.timeout(240)
def test_schemathesis_finds_nothing(standalone, catalog_url, store_dir):
    # vera may view tenants (and its media) and do everything in tenants/fuzz: the fuzzer
    # acts there, meets 403 above it and 404 (not hers) in isos.
    world = build_world(
        catalog_url,
        store_dir,
        users=["vera"],
        subpools={"tenants/fuzz": 200, "tenants/fuzz/a": 50, "tenants/fuzz/b": None},
        shares=[("tenants/fuzz", "viewers", ["--all"])],
    )
    server = standalone()
    api = Api(server.port)
    try:
        keys = [api.login("vera") for _ in range(8)]
        pids = world.pids
        fuzz = [pids["tenants/fuzz"], pids["tenants/fuzz/a"], pids["tenants/fuzz/b"]]
        media = [api.create_media(keys[0], p, f"m{i}.img", 1)["mid"] for i, p in enumerate(fuzz)]
        dictionaries = {
            "keys": keys,
            "pools": [*fuzz, pids["tenants"], pids["isos"], pids["hidden"]],
            "media": media,
            "groups": [world.gids["viewers"], world.gids["acme"], "viewers"],
            "users": ["vera"],
        }
        LIVE_KEYS[:] = keys
        problems, scenarios = run_schemathesis(server.port, dictionaries)
    finally:
        LIVE_KEYS.clear()
        api.close()
    assert not problems, f"{len(problems)} problem(s):\n\n" + "\n\n".join(problems[:20])
    assert scenarios >= 10, f"only {scenarios} scenarios ran"
    assert server.stop() == 0
    assert "Traceback" not in server.log, server.log
