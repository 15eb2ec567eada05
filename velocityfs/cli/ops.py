"""Operator commands: ``fsck`` and ``status``."""

import json
import socket
import sys
from collections.abc import Callable, Iterator

import click
from sqlalchemy import text

from velocityfs.cli.context import Context, pass_ctx, service_errors
from velocityfs.cli.output import emit_json, emit_table, mib
from velocityfs.cli.storage import emit_volumes
from velocityfs.mounts import velocityfs_mounts
from velocityfs.service.fsck import Fsck, Problem


@click.command()
@click.option("--repair", is_flag=True, help="Repair what can be repaired.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@service_errors
def fsck(ctx: Context, repair: bool, as_json: bool) -> None:
    """Compare catalog and backing files; one line per problem.

    Exits non-zero while problems remain (with --repair: those it could not repair).
    """
    checker = Fsck(ctx.velocity())
    with click.progressbar(
        length=checker.media_count(), label="checking media", file=sys.stderr
    ) as bar:
        problems = list(_walk(checker, bar.update, repair))
    repaired = sum(fixed for _, fixed in problems)
    remaining = len(problems) - repaired
    if as_json:
        emit_json(
            {
                "problems": [
                    {"kind": p.kind, "message": p.message, "repaired": fixed}
                    for p, fixed in problems
                ],
                "repaired": repaired,
                "remaining": remaining,
            }
        )
    else:
        for problem, fixed in problems:
            click.echo(f"{'REPAIRED' if fixed else 'PROBLEM'} {problem}")
        click.echo(f"{repaired} repaired, {remaining} remaining")
    if remaining:
        raise SystemExit(1)


def _walk(
    checker: Fsck, progress: Callable[[int], None], repair: bool
) -> Iterator[tuple[Problem, bool]]:
    """Repair as problems are found, so later checks (usage) see earlier repairs."""
    for problem in checker.run(progress):
        if repair and problem.repair is not None:
            problem.repair()
            yield problem, True
        else:
            yield problem, False


def catalog_mounts(holders: list[dict[str, object]]) -> list[str]:
    """This host's mounts of this catalog: those whose daemon is one of its holders here
    (another catalog's mounts on the host are that catalog's business)."""
    here = {h["pid"] for h in holders if h["host"] == socket.gethostname()}
    return [m.mountpoint for m in velocityfs_mounts() if m.pid in here]


@click.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@service_errors
def status(ctx: Context, as_json: bool) -> None:
    """This catalog's mounts on this host, its processes, volumes with free space, and the
    pool tree with usage and quota."""
    v = ctx.velocity()
    with v.db.engine.connect() as conn:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    holders = v.ledger.holders()
    volumes = v.volumes.all()
    tree = v.tree()
    mounts = catalog_mounts(holders)
    url = v.db.engine.url.render_as_string()
    info = {
        "mounts": mounts,
        "catalog": {"url": url, "revision": revision},
        "holders": holders,
        "volumes": [vol.__dict__ for vol in volumes],
        "pools": [
            {
                "path": row.path,
                "pid": row.pool.id,
                "used_bytes": row.pool.used_bytes,
                "quota_bytes": row.pool.quota_bytes,
            }
            for row in tree
        ],
    }
    if as_json:
        emit_json(json.loads(json.dumps(info)))
        return
    click.echo(f"catalog: {url} (schema {revision})")
    click.echo(f"mounts:  {', '.join(mounts) or 'none on this host'}")
    for holder in holders:
        click.echo(f"process: {holder['host']} pid {holder['pid']} ({holder['grants']} grants)")
    click.echo()
    emit_volumes(volumes)
    click.echo()
    emit_table(
        ["POOL", "USED MiB", "QUOTA MiB", "USE%"],
        [
            [
                "  " * r.depth + r.pool.name,
                mib(r.pool.used_bytes),
                mib(r.pool.quota_bytes),
                f"{100 * r.pool.used_bytes / r.pool.quota_bytes:.0f}%"
                if r.pool.quota_bytes
                else "-",
            ]
            for r in tree
        ],
    )
