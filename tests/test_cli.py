"""The admin CLI end to end: real ``velocityfs`` subprocesses on a real catalog.

Every refusal must reach the operator as exactly one line ``velocityfs: error: ...``
on stderr, nothing on stdout and exit status 1, and must change nothing. Refusals
that change nothing are run a few at a time in parallel (each call is a fresh Python
process). Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from velocityfs.cli.main import main as velocityfs_main
from velocityfs.errors import AuthenticationFailed
from velocityfs.service.accounts import PERMISSIONS
from velocityfs.service.velocity import Velocity

MIB = 1 << 20
Cli = Callable[..., subprocess.CompletedProcess[str]]
# (argv, stdin, a fragment the error line must contain)
Refusal = tuple[Sequence[str], str | None, str]


@pytest.fixture
def v(catalog_url: str, store_dir: Path, cli: Cli) -> Iterator[Velocity]:
    """An initialised catalog (through the CLI), and the service on it for checks."""
    ok(cli, "init")
    vel = Velocity(catalog_url, store_dir)
    yield vel
    vel.close()


def ok(cli: Cli, *args: str, input: str | None = None) -> str:
    res = cli(*args, input=input)
    assert res.returncode == 0, f"velocityfs {' '.join(args)}: {res.returncode}\n{res.stderr}"
    return res.stdout


def ok_json(cli: Cli, *args: str) -> Any:
    return json.loads(ok(cli, *args, "--json"))


def check_refused(res: subprocess.CompletedProcess[str], fragment: str) -> str:
    cmd = " ".join(map(str, res.args[7:]))  # past: python -m velocityfs --catalog C --store S
    assert res.returncode == 1, f"{cmd}: exit {res.returncode}\n{res.stdout}{res.stderr}"
    assert res.stdout == "", f"{cmd}: stdout {res.stdout!r}"
    lines = res.stderr.splitlines()
    assert len(lines) == 1, f"{cmd}: stderr is not one line: {res.stderr!r}"
    assert lines[0].startswith("velocityfs: error: "), f"{cmd}: {lines[0]!r}"
    assert fragment in lines[0], f"{cmd}: {fragment!r} not in {lines[0]!r}"
    return lines[0]


def oks(cli: Cli, *commands: Sequence[str], stdin: dict[int, str] | None = None) -> list[str]:
    """Run commands that must succeed and do not depend on each other, in parallel.

    ``stdin`` maps a command's index to the text it reads from stdin.
    """
    feed = stdin or {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(
            pool.map(lambda i: ok(cli, *commands[i], input=feed.get(i)), range(len(commands)))
        )


def refused(cli: Cli, refusals: Sequence[Refusal]) -> list[str]:
    """Run commands that must be refused, in parallel; return their error lines."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda r: cli(*r[0], input=r[1]), refusals))
    return [check_refused(res, r[2]) for res, r in zip(results, refusals, strict=True)]


def table(output: str) -> tuple[list[str], dict[str, list[str]]]:
    """The header cells and the rows of a table, keyed by their first cell."""
    header, *rows = output.splitlines()
    return re.split(r"\s{2,}", header.strip()), {r.split()[0]: r.split() for r in rows}


def test_init_is_required_and_harmless_to_repeat(cli: Cli, store_dir: Path) -> None:
    refused(cli, [(["pool", "list"], None, "velocityfs init")])
    assert "initialised catalog" in ok(cli, "init")
    assert (store_dir / "media").is_dir()
    ok(cli, "pool", "create", "tenants", "--quota-mib", "100")
    assert "initialised catalog" in ok(cli, "init")
    pools = ok_json(cli, "pool", "list")
    assert [(p["path"], p["quota_bytes"]) for p in pools] == [("tenants", 100 * MIB)]


def test_pool_round_trip(cli: Cli, v: Velocity) -> None:
    made = ok_json(cli, "pool", "create", "tenants", "--quota-mib", "100")
    assert made["path"] == "tenants"
    tenants = made["pid"]
    acme, isos = (
        out.strip()
        for out in oks(
            cli,
            ["pool", "create", "tenants/acme", "--quota-mib", "40"],
            ["pool", "create", "isos", "--quota-mib", "2.5"],
        )
    )
    uuid.UUID(acme)  # plain output is the new pid
    web = ok(cli, "pool", "create", "/tenants/acme/web/", "--quota-mib", "10").strip()
    v.media.create(web, "disk.img", size=3 * MIB)  # there is no CLI for media bytes

    text_list, json_list, shown, text_show = oks(
        cli,
        ["pool", "list"],
        ["pool", "list", "--json"],
        ["pool", "show", "tenants/acme", "--json"],
        ["pool", "show", acme],  # by pid
    )
    header, rows = table(text_list)
    assert header == ["POOL", "USED MiB", "QUOTA MiB", "PID"]
    assert rows["tenants"] == ["tenants", "3.00", "100.00", tenants]
    assert rows["acme"] == ["acme", "3.00", "40.00", acme]
    assert rows["web"] == ["web", "3.00", "10.00", web]
    assert rows["isos"] == ["isos", "0.00", "2.50", isos]
    assert "\n    web " in text_list  # depth shows as indentation
    listed = {p["path"]: p for p in json.loads(json_list)}
    assert list(listed) == ["isos", "tenants", "tenants/acme", "tenants/acme/web"]
    assert listed["tenants/acme"] == {
        "pid": acme,
        "path": "tenants/acme",
        "parent": tenants,
        "quota_bytes": 40 * MIB,
        "used_bytes": 3 * MIB,
    }
    assert listed["isos"]["quota_bytes"] == int(2.5 * MIB)
    assert json.loads(shown) == {
        "pid": acme,
        "path": "tenants/acme",
        "parent": tenants,
        "quota_bytes": 40 * MIB,
        "used_bytes": 3 * MIB,
        "avail_bytes": 37 * MIB,
        "media": 0,
        "shares": {},
    }
    for line in ("path: tenants/acme", "quota: 40.00 MiB", "used: 3.00 MiB", "available: 37.00"):
        assert line in text_show, text_show

    oks(
        cli,
        ["pool", "set-quota", "tenants/acme", "50"],
        ["pool", "set-quota", web, "inherit"],
    )
    assert v.pools.get(acme).quota_bytes == 50 * MIB
    assert v.pools.get(web).quota_bytes is None
    assert v.pools.available(web) == 47 * MIB

    removed_isos, _ = oks(cli, ["pool", "rm", "isos"], ["pool", "rm", "-r", "tenants/acme"])
    assert isos in removed_isos
    assert [p["path"] for p in ok_json(cli, "pool", "list")] == ["tenants"]
    assert v.pools.get(tenants).used_bytes == 0
    assert v.media.all() == []


def test_pool_refusals(cli: Cli, v: Velocity) -> None:
    ok(cli, "pool", "create", "tenants", "--quota-mib", "100")
    ok(cli, "pool", "create", "tenants/acme", "--quota-mib", "40")
    web = ok(cli, "pool", "create", "tenants/acme/web").strip()
    v.media.create(web, "disk.img", size=3 * MIB)
    before = ok_json(cli, "pool", "list")
    refused(
        cli,
        [
            (["pool", "show", "nope"], None, "no pool 'nope'"),
            (["pool", "create", "nope/child", "--quota-mib", "1"], None, "no pool 'nope'"),
            (["pool", "create", "tenants", "--quota-mib", "5"], None, "exists"),
            (["pool", "create", "tenants/acme"], None, "already exists"),
            (["pool", "create", "isos"], None, "needs a quota"),
            (["pool", "create", "tenants/x", "--quota-mib", "abc"], None, "not a number"),
            (["pool", "create", "tenants/acme/web/x", "--quota-mib", "41"], None, "exceeds"),
            (["pool", "set-quota", "tenants/acme", "101"], None, "exceeds"),
            (["pool", "set-quota", "tenants", "39"], None, "subpool"),  # below acme's quota
            (["pool", "set-quota", "tenants/acme", "2"], None, "uses"),  # below its usage
            (["pool", "rm", "tenants"], None, "not empty"),
            (["pool", "rm", "tenants/acme/web"], None, "not empty"),  # media only
        ],
    )
    assert ok_json(cli, "pool", "list") == before


def test_users_groups_members_and_shares(cli: Cli, v: Velocity) -> None:
    ok(cli, "pool", "create", "tenants", "--quota-mib", "100")
    acme, uid, _, gid = (
        out.strip()
        for out in oks(
            cli,
            ["pool", "create", "tenants/acme"],
            ["user", "add", "alice", "--password-stdin"],
            ["user", "add", "bob", "--password", "pw"],
            ["group", "add", "ops"],
            stdin={1: "s3cret pass\n"},
        )
    )
    assert v.accounts.group_id("ops") == gid
    assert v.accounts.login("alice", "s3cret pass").user_id == uid
    ok(cli, "user", "passwd", "alice", "--password-stdin", input="n3w pass\n")
    with pytest.raises(AuthenticationFailed):
        v.accounts.login("alice", "s3cret pass")
    assert v.accounts.login("alice", "n3w pass").user_id == uid
    ok(cli, "member", "add", "ops", "alice")
    refused(
        cli,
        [
            (["user", "add", "alice", "--password-stdin"], "other\n", "exists"),
            (["user", "add", "carol", "--password-stdin"], "\n", "empty"),
            (["user", "passwd", "nobody", "--password-stdin"], "pw\n", "no user"),
            (["group", "add", "ops"], None, "exists"),
            (["group", "rm", "root"], None, "root group"),
            (["member", "add", "ops", "alice"], None, "already"),
            (["member", "add", "ops", "nobody"], None, "no user"),
            (["member", "rm", "ops", "bob"], None, "not in group"),
            (["share", "tenants", "ops", "view", "fly"], None, "velocity.pool.fly"),
            (["share", "nope", "ops", "view"], None, "no pool"),
        ],
    )
    users, groups = (
        json.loads(out) for out in oks(cli, ["user", "list", "--json"], ["group", "list", "--json"])
    )
    assert {u["name"]: u["uid"] for u in users}["alice"] == uid
    assert sorted(u["name"] for u in users) == ["alice", "bob"]
    assert sorted((g["name"], g["members"]) for g in groups) == [
        ("ops", ["alice"]),
        ("root", []),
    ]

    # Short permission names get the velocity.pool. prefix; full names pass unchanged.
    out = ok(cli, "share", "tenants", "ops", "view", "media.read", "velocity.pool.create")
    assert out.strip() == (
        "tenants -> ops: velocity.pool.create velocity.pool.media.read velocity.pool.view"
    )
    expected = {"velocity.pool.view", "velocity.pool.media.read", "velocity.pool.create"}
    assert v.accounts.permissions_on(uid, acme) == expected  # a share covers the subtree
    ok(cli, "share", "tenants/acme", "ops", "--all")
    shown = [
        json.loads(out)["shares"]
        for out in oks(cli, ["pool", "show", "tenants", "--json"], ["pool", "show", acme, "--json"])
    ]
    assert shown == [{"ops": sorted(expected)}, {"ops": sorted(PERMISSIONS)}]
    assert v.accounts.permissions_on(uid, acme) == set(PERMISSIONS)
    assert "(unshared)" in ok(cli, "share", "tenants/acme", "ops")
    assert v.accounts.permissions_on(uid, acme) == expected

    ok(cli, "member", "rm", "ops", "alice")
    assert v.accounts.members("ops") == []
    assert v.accounts.permissions_on(uid, acme) == set()
    oks(cli, ["group", "rm", "ops"], ["user", "rm", "alice"])
    assert [name for _, name in v.accounts.users()] == ["bob"]
    assert [name for _, name in v.accounts.groups()] == ["root"]
    assert v.accounts.shares_of_pool(v.pools.resolve("tenants").id) == []
    refused(
        cli,
        [
            (["user", "rm", "alice"], None, "no user"),
            (["group", "rm", "ops"], None, "no group"),
            (["member", "add", "ops", "bob"], None, "no group"),
        ],
    )


def test_shell_completion_with_the_readmes_line(tmp_path: Path) -> None:
    """``eval "$(_VELOCITYFS_COMPLETE=bash_source velocityfs)"`` in bash: click's script,
    which completes commands and subcommands (asking velocityfs, which needs no catalog)."""
    script = subprocess.run(
        [sys.executable, "-m", "velocityfs"],
        env={**os.environ, "_VELOCITYFS_COMPLETE": "bash_source"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "complete -o nosort -F _velocityfs_completion velocityfs" in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    command = bin_dir / "velocityfs"  # as installed: velocityfs on the PATH
    command.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m velocityfs "$@"\n')
    command.chmod(0o755)

    def complete(*words: str) -> list[str]:
        line = " ".join(shlex.quote(w) for w in ("velocityfs", *words))
        probe = (
            'eval "$(_VELOCITYFS_COMPLETE=bash_source velocityfs)"\n'
            f"COMP_WORDS=({line})\nCOMP_CWORD={len(words)}\n"
            "_velocityfs_completion velocityfs\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        res = subprocess.run(
            ["bash", "-c", probe],
            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return res.stdout.split()

    assert sorted(complete("")) == sorted(velocityfs_main.commands)
    assert sorted(complete("pool", "")) == ["create", "list", "rm", "set-quota", "show"]
    assert complete("volume", "l") == ["list"]
