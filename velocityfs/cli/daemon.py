"""Commands that run the mount daemon, and the demo store of ``./scripts/run``."""

import logging

import click

from velocityfs.cli.context import Context, pass_ctx, service_errors
from velocityfs.errors import Conflict
from velocityfs.service.pools import MIB

DEMO_POOLS = (
    ("tenants", 10 * 1024),
    ("tenants/acme", 4 * 1024),
    ("tenants/globex", 8 * 1024),
    ("isos", 2 * 1024),
)


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, exists=True))
@click.option("--allow-other", is_flag=True, help="Let other users (a hypervisor) open media.")
@click.option(
    "--default-permissions", is_flag=True, help="Let the kernel enforce file modes and owners."
)
@click.option(
    "--attr-timeout",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds the kernel may cache names and attributes.",
)
@click.option(
    "--api",
    "api_bind",
    metavar="HOST:PORT",
    help="Also serve the HTTP API in this process (e.g. 127.0.0.1:8080).",
)
@click.option("--log-level", default="INFO", show_default=True)
@pass_ctx
@service_errors
def mount(
    ctx: Context,
    mountpoint: str,
    allow_other: bool,
    default_permissions: bool,
    attr_timeout: float,
    api_bind: str | None,
    log_level: str,
) -> None:
    """Mount the store at MOUNTPOINT in the foreground; Ctrl-C or SIGTERM unmounts."""
    from velocityfs.fs.daemon import run_mount

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    run_mount(
        ctx.velocity(),
        mountpoint,
        allow_other=allow_other,
        default_permissions=default_permissions,
        attr_timeout=attr_timeout,
        api_bind=api_bind,
    )


@click.command()
@click.option(
    "--listen",
    "bind",
    default="127.0.0.1:8080",
    show_default=True,
    metavar="HOST:PORT",
    help="Address to serve the API on.",
)
@click.option("--log-level", default="INFO", show_default=True)
@pass_ctx
@service_errors
def serve(ctx: Context, bind: str, log_level: str) -> None:
    """Serve the HTTP API alone against the catalog (no mount in this process)."""
    from velocityfs.api.server import run_standalone

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    run_standalone(ctx.velocity(), bind)


@click.command()
@pass_ctx
@service_errors
def demo(ctx: Context) -> None:
    """Create a few demo pools with quotas (skips those that exist)."""
    v = ctx.velocity()
    for path, quota_mib in DEMO_POOLS:
        parent_path, _, name = path.rpartition("/")
        parent_id = v.pool_by_ref(parent_path).id if parent_path else None
        try:
            v.pools.create(parent_id, name, quota_mib * MIB)
        except Conflict:
            continue
    for row in v.tree():
        quota = "inherit" if row.pool.quota_bytes is None else f"{row.pool.quota_bytes // MIB}"
        click.echo(f"{'  ' * row.depth}{row.pool.name}  {row.pool.used_bytes // MIB}/{quota} MiB")
