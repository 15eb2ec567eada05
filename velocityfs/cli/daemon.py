"""Commands that run the mount daemon, and the demo store of ``./scripts/run``."""

import contextlib
import logging

import click

from velocityfs.cli.context import Context, pass_ctx, service_errors
from velocityfs.config import ALWAYS_CHECKED
from velocityfs.errors import Conflict, InvalidValue
from velocityfs.mounts import mount_at
from velocityfs.service.accounts import PERMISSIONS
from velocityfs.service.pools import MIB

DEMO_USER = "demo"
DEMO_POOLS = (
    ("tenants", 10 * 1024),
    ("tenants/acme", 4 * 1024),
    ("tenants/globex", 8 * 1024),
    ("isos", 2 * 1024),
)


def setup_logging(level: str) -> None:
    """Plain lines on stderr: journald stamps time and unit itself."""
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


@click.command()
@click.argument("mountpoint", required=False, type=click.Path(file_okay=False, exists=True))
@click.option(
    "--allow-other/--no-allow-other",
    default=None,
    help="Let other users (a hypervisor) open media, as their modes and owners allow.",
)
@click.option(
    "--default-permissions/--no-default-permissions",
    default=None,
    hidden=True,  # deprecated: always on; --no-default-permissions is refused
)
@click.option(
    "--attr-timeout", type=float, help="Seconds the kernel may cache names and attributes."
)
@click.option(
    "--api",
    "api_bind",
    metavar="HOST:PORT",
    help="Also serve the HTTP API in this process (e.g. 127.0.0.1:8080): one failure "
    "domain for the API and the mount. Without it (and without api_in_mount in the "
    "configuration) the API is velocityfs serve's, in a process of its own.",
)
@click.option("--log-level")
@pass_ctx
@service_errors
def mount(
    ctx: Context,
    mountpoint: str | None,
    allow_other: bool | None,
    default_permissions: bool | None,
    attr_timeout: float | None,
    api_bind: str | None,
    log_level: str | None,
) -> None:
    """Mount the store at MOUNTPOINT in the foreground; Ctrl-C or SIGTERM unmounts.

    Unset options come from the configuration file.
    """
    from velocityfs.daemon import run_mount

    if default_permissions is False:
        raise InvalidValue(f"--no-default-permissions is gone: {ALWAYS_CHECKED}")
    settings = ctx.settings
    mountpoint = mountpoint or settings.mountpoint
    if not mountpoint:
        raise click.UsageError("no MOUNTPOINT given and none in the configuration")
    refuse_stacking(mountpoint)
    setup_logging(log_level or settings.log_level)
    if default_permissions:
        logging.getLogger(__name__).warning(
            "--default-permissions is deprecated: %s (leave the flag out)", ALWAYS_CHECKED
        )
    run_mount(
        ctx.velocity(),
        mountpoint,
        allow_other=settings.allow_other if allow_other is None else allow_other,
        attr_timeout=settings.attr_timeout_s if attr_timeout is None else attr_timeout,
        api_bind=api_bind or (settings.api_listen if settings.api_in_mount else None) or None,
        catalog_timeout_s=settings.catalog_timeout_s,
        upload_idle_s=settings.upload_idle_s,
        max_body_bytes=settings.api_max_body_bytes,
        metrics_on_api=settings.metrics,
        metrics_listen=settings.metrics_listen,
    )


def refuse_stacking(mountpoint: str) -> None:
    """A second daemon mounted over a live mount would hide the first, whose open files
    (a running VM's disks) go on through it unseen: say so and mount nothing."""
    mounted = mount_at(mountpoint)
    if mounted is not None:
        served = "" if mounted.pid is None else f" served by pid {mounted.pid}"
        raise Conflict(
            f"{mounted.mountpoint} is already a velocityfs mount{served}: "
            f"unmount it first (umount {mounted.mountpoint})"
        )


@click.command()
@click.option("--listen", "bind", metavar="HOST:PORT", help="Address to serve the API on.")
@click.option("--log-level")
@pass_ctx
@service_errors
def serve(ctx: Context, bind: str | None, log_level: str | None) -> None:
    """Serve the HTTP API alone against the catalog (no mount in this process)."""
    from velocityfs.daemon import run_serve

    setup_logging(log_level or ctx.settings.log_level)
    run_serve(
        ctx.velocity(),
        bind or ctx.settings.api_listen or "127.0.0.1:8080",
        ctx.settings.catalog_timeout_s,
        ctx.settings.upload_idle_s,
        ctx.settings.api_max_body_bytes,
        metrics_on_api=ctx.settings.metrics,
        metrics_listen=ctx.settings.metrics_listen,
    )


@click.command()
@pass_ctx
@service_errors
def demo(ctx: Context) -> None:
    """Create demo pools with quotas and a demo API user (skips what exists).

    User 'demo' (password 'demo') is in group 'demo', which may do everything
    in 'tenants'.
    """
    v = ctx.velocity()
    for path, quota_mib in DEMO_POOLS:
        parent_path, _, name = path.rpartition("/")
        parent_id = v.pool_by_ref(parent_path).id if parent_path else None
        with contextlib.suppress(Conflict):
            v.pools.create(parent_id, name, quota_mib * MIB)
    with contextlib.suppress(Conflict):
        v.accounts.add_user(DEMO_USER, DEMO_USER)
    with contextlib.suppress(Conflict):
        v.accounts.add_group(DEMO_USER)
    with contextlib.suppress(Conflict):
        v.accounts.add_member(DEMO_USER, DEMO_USER)
    v.accounts.share(v.pool_by_ref("tenants").id, DEMO_USER, list(PERMISSIONS))
    click.echo(
        f"API user '{DEMO_USER}' (password '{DEMO_USER}'), group gid "
        f"{v.accounts.group_id(DEMO_USER)}, may do everything in 'tenants'"
    )
    for row in v.tree():
        quota = "inherit" if row.pool.quota_bytes is None else f"{row.pool.quota_bytes // MIB}"
        click.echo(f"{'  ' * row.depth}{row.pool.name}  {row.pool.used_bytes // MIB}/{quota} MiB")
