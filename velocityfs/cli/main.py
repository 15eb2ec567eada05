"""The ``velocityfs`` command: administration, the mount daemon and the API server.

Every subcommand translates its arguments into service calls and the
service's errors into one line on stderr and exit status 1.
"""

import sys
from typing import Any

import click

from velocityfs.cli import config_cmd, daemon, ops, storage
from velocityfs.cli.context import Context, pass_ctx, service_errors
from velocityfs.cli.output import emit_json, emit_table, mib
from velocityfs.config import DEFAULT_CONFIG, DEFAULT_STORE
from velocityfs.service.accounts import PERMISSIONS
from velocityfs.service.pools import mib_to_bytes
from velocityfs.service.velocity import Velocity


@click.group()
@click.option(
    "--config",
    envvar="VELOCITYFS_CONFIG",
    type=click.Path(dir_okay=False),
    help=f"Configuration file (default: {DEFAULT_CONFIG} if it exists).",
)
@click.option(
    "--catalog",
    envvar="VELOCITYFS_CATALOG",
    help="Catalog URL: sqlite:///PATH or postgresql+psycopg://... "
    "(default: sqlite in the store top).",
)
@click.option(
    "--store",
    envvar="VELOCITYFS_STORE",
    help=f"Store top directory, the DEFAULT volume (default: {DEFAULT_STORE}).",
)
@click.pass_context
def main(ctx: click.Context, config: str | None, catalog: str | None, store: str | None) -> None:
    """velocityfs: VM storage pools with hierarchical quotas, as a filesystem and an API."""
    ctx.obj = Context(config, catalog, store)


@main.command()
@click.option(
    "--lease-s",
    type=float,
    help="Set the catalog's lease length in seconds (a new catalog's is 30; "
    "see 'velocityfs lease set').",
)
@pass_ctx
@service_errors
def init(ctx: Context, lease_s: float | None) -> None:
    """Create or upgrade the catalog and the store directory (safe to repeat)."""
    v = ctx.velocity(initialised=False)
    markings = v.init(lease_s=lease_s)
    click.echo(f"initialised catalog {v.db.engine.url!r} and store {v.backing.top}")
    for marking in markings:
        if marking.refused is None:
            click.echo(f"marked volume '{marking.volume}' ({marking.media} media on its disk)")
        else:
            click.echo(
                f"warning: volume '{marking.volume}' left offline: {marking.refused}", err=True
            )


# the lease ----------------------------------------------------------------


@main.group()
def lease() -> None:
    """The lease length, one for every process on the catalog."""


@lease.command("show")
@pass_ctx
@service_errors
def lease_show(ctx: Context) -> None:
    """Print the lease length in seconds."""
    click.echo(f"{ctx.velocity().ledger.lease_ns / 1e9:g}")


@lease.command("set")
@click.argument("seconds", type=float)
@pass_ctx
@service_errors
def lease_set(ctx: Context, seconds: float) -> None:
    """Set the lease length: a process that has not renewed its lease for SECONDS
    is dead, and its grants are reclaimed. Each process takes it at its next renewal."""
    ctx.velocity().ledger.set_lease(seconds)
    click.echo(f"lease {seconds:g} s")


# pools --------------------------------------------------------------------


@main.group()
def pool() -> None:
    """Create, list and change pools."""


def _parse_quota(value: str | None) -> int | None:
    if value is None or value.lower() in ("inherit", "none"):
        return None
    return mib_to_bytes(value)


@pool.command("create")
@click.argument("path")
@click.option("--quota-mib", help="Quota in MiB (a subpool inherits its parent's by default).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@service_errors
def pool_create(ctx: Context, path: str, quota_mib: str | None, as_json: bool) -> None:
    """Create pool PATH (e.g. tenants or tenants/acme); the parent must exist."""
    v = ctx.velocity()
    parent_path, _, name = path.strip("/").rpartition("/")
    parent_id = v.pool_by_ref(parent_path).id if parent_path else None
    created = v.pools.create(parent_id, name, _parse_quota(quota_mib))
    if as_json:
        emit_json({"pid": created.id, "path": path.strip("/")})
    else:
        click.echo(created.id)


def _pool_dict(v: Velocity, path: str, pool_id: str) -> dict[str, Any]:
    p = v.pools.get(pool_id)
    return {
        "pid": p.id,
        "path": path,
        "parent": p.parent_id,
        "quota_bytes": p.quota_bytes,
        "used_bytes": p.used_bytes,
        "avail_bytes": v.pools.available(p.id),
    }


@pool.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@service_errors
def pool_list(ctx: Context, as_json: bool) -> None:
    """The pool tree with used and quota (MiB)."""
    v = ctx.velocity()
    rows = v.tree()
    if as_json:
        emit_json(
            [
                {
                    "pid": r.pool.id,
                    "path": r.path,
                    "parent": r.pool.parent_id,
                    "quota_bytes": r.pool.quota_bytes,
                    "used_bytes": r.pool.used_bytes,
                }
                for r in rows
            ]
        )
        return
    emit_table(
        ["POOL", "USED MiB", "QUOTA MiB", "PID"],
        [
            [
                "  " * r.depth + r.pool.name,
                mib(r.pool.used_bytes),
                mib(r.pool.quota_bytes),
                r.pool.id,
            ]
            for r in rows
        ],
    )


@pool.command("show")
@click.argument("pool_ref", metavar="POOL")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@service_errors
def pool_show(ctx: Context, pool_ref: str, as_json: bool) -> None:
    """One pool (by path or pid): usage, quota, room left, media and shares."""
    v = ctx.velocity()
    p = v.pool_by_ref(pool_ref)
    info = _pool_dict(v, v.pools.path(p.id), p.id)
    info["media"] = v.pools.media_count(p.id)
    groups = dict(v.accounts.groups())
    info["shares"] = {
        groups.get(s.group_id, s.group_id): s.permissions for s in v.accounts.shares_of_pool(p.id)
    }
    if as_json:
        emit_json(info)
        return
    for key in ("pid", "path", "parent", "media"):
        click.echo(f"{key:>10}: {info[key]}")
    click.echo(f"{'quota':>10}: {mib(info['quota_bytes'])} MiB")
    click.echo(f"{'used':>10}: {mib(info['used_bytes'])} MiB")
    click.echo(f"{'available':>10}: {mib(info['avail_bytes'])} MiB")
    for group, perms in info["shares"].items():
        click.echo(f"{'share':>10}: {group}: {' '.join(perms)}")


@pool.command("set-quota")
@click.argument("pool_ref", metavar="POOL")
@click.argument("quota_mib", metavar="MIB|inherit")
@pass_ctx
@service_errors
def pool_set_quota(ctx: Context, pool_ref: str, quota_mib: str) -> None:
    """Set a pool's quota in MiB, or 'inherit' for a subpool."""
    v = ctx.velocity()
    p = v.pool_by_ref(pool_ref)
    v.pools.set_quota(p.id, _parse_quota(quota_mib))
    click.echo(f"{v.pools.path(p.id)}: quota {quota_mib} MiB")


@pool.command("rm")
@click.argument("pool_ref", metavar="POOL")
@click.option("-r", "--recursive", is_flag=True, help="Also remove subpools and all media.")
@pass_ctx
@service_errors
def pool_rm(ctx: Context, pool_ref: str, recursive: bool) -> None:
    """Remove a pool (refused when not empty, unless --recursive)."""
    v = ctx.velocity()
    p = v.pool_by_ref(pool_ref)
    v.pools.remove(p.id, recursive=recursive)
    click.echo(f"removed pool {p.id}")


# accounts -----------------------------------------------------------------


def _password(password: str | None, password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if password is not None:
        return password
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


@main.group()
def user() -> None:
    """Manage API users."""


@user.command("add")
@click.argument("name")
@click.option("--password", help="Password (prefer --password-stdin or the prompt).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@pass_ctx
@service_errors
def user_add(ctx: Context, name: str, password: str | None, password_stdin: bool) -> None:
    """Add a user."""
    click.echo(ctx.velocity().accounts.add_user(name, _password(password, password_stdin)))


@user.command("passwd")
@click.argument("name")
@click.option("--password")
@click.option("--password-stdin", is_flag=True)
@pass_ctx
@service_errors
def user_passwd(ctx: Context, name: str, password: str | None, password_stdin: bool) -> None:
    """Change a user's password (drops the user's authkeys)."""
    ctx.velocity().accounts.set_password(name, _password(password, password_stdin))
    click.echo(f"password of '{name}' changed")


@user.command("rm")
@click.argument("name")
@pass_ctx
@service_errors
def user_rm(ctx: Context, name: str) -> None:
    """Remove a user."""
    ctx.velocity().accounts.remove_user(name)
    click.echo(f"removed user '{name}'")


@user.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@service_errors
def user_list(ctx: Context, as_json: bool) -> None:
    """List users."""
    users = ctx.velocity().accounts.users()
    if as_json:
        emit_json([{"uid": uid, "name": name} for uid, name in users])
    else:
        emit_table(["USER", "UID"], [[name, uid] for uid, name in users])


@main.group()
def group() -> None:
    """Manage groups (pools are shared with groups)."""


@group.command("add")
@click.argument("name")
@pass_ctx
@service_errors
def group_add(ctx: Context, name: str) -> None:
    """Add a group."""
    click.echo(ctx.velocity().accounts.add_group(name))


@group.command("rm")
@click.argument("name")
@pass_ctx
@service_errors
def group_rm(ctx: Context, name: str) -> None:
    """Remove a group and its shares."""
    ctx.velocity().accounts.remove_group(name)
    click.echo(f"removed group '{name}'")


@group.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@service_errors
def group_list(ctx: Context, as_json: bool) -> None:
    """List groups with their members."""
    acc = ctx.velocity().accounts
    rows = [(gid, name, acc.members(name)) for gid, name in acc.groups()]
    if as_json:
        emit_json([{"gid": gid, "name": name, "members": m} for gid, name, m in rows])
    else:
        emit_table(["GROUP", "GID", "MEMBERS"], [[n, g, ",".join(m)] for g, n, m in rows])


@main.group()
def member() -> None:
    """Add users to groups and remove them."""


@member.command("add")
@click.argument("group_name", metavar="GROUP")
@click.argument("user_name", metavar="USER")
@pass_ctx
@service_errors
def member_add(ctx: Context, group_name: str, user_name: str) -> None:
    """Put USER in GROUP."""
    ctx.velocity().accounts.add_member(group_name, user_name)
    click.echo(f"'{user_name}' is now in '{group_name}'")


@member.command("rm")
@click.argument("group_name", metavar="GROUP")
@click.argument("user_name", metavar="USER")
@pass_ctx
@service_errors
def member_rm(ctx: Context, group_name: str, user_name: str) -> None:
    """Take USER out of GROUP."""
    ctx.velocity().accounts.remove_member(group_name, user_name)
    click.echo(f"'{user_name}' is no longer in '{group_name}'")


@main.command()
@click.argument("pool_ref", metavar="POOL")
@click.argument("group_name", metavar="GROUP")
@click.argument("permissions", nargs=-1)
@click.option("--all", "all_perms", is_flag=True, help="Every permission.")
@pass_ctx
@service_errors
def share(
    ctx: Context, pool_ref: str, group_name: str, permissions: tuple[str, ...], all_perms: bool
) -> None:
    """Share POOL (and its subpools) with GROUP, granting PERMISSIONS.

    Permissions may be given in full (velocity.pool.view) or without the
    'velocity.pool.' prefix (view, media.create). No permissions removes the share.
    """
    v = ctx.velocity()
    wanted = (
        list(PERMISSIONS)
        if all_perms
        else [p if p.startswith("velocity.") else f"velocity.pool.{p}" for p in permissions]
    )
    result = v.accounts.share(v.pool_by_ref(pool_ref).id, group_name, wanted)
    click.echo(f"{pool_ref} -> {group_name}: {' '.join(result.permissions) or '(unshared)'}")


main.add_command(daemon.mount)
main.add_command(daemon.demo)
main.add_command(daemon.serve)
main.add_command(storage.volume)
main.add_command(storage.media)
main.add_command(config_cmd.config_group)
main.add_command(ops.fsck)
main.add_command(ops.status)

if __name__ == "__main__":
    main()
