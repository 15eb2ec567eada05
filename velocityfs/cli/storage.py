"""Volume and media commands: where bytes live, and moving them between volumes."""

import contextlib
import os
from typing import Any

import click

from velocityfs.cli.context import Context, pass_ctx, service_errors
from velocityfs.cli.output import emit_json, emit_table, mib
from velocityfs.errors import NotFound
from velocityfs.service.velocity import Velocity
from velocityfs.service.views import Creator, MediaView
from velocityfs.service.volumes import VolumeInfo


@click.group()
def volume() -> None:
    """Backing volumes: DEFAULT is the store top, NAME lives at TOP/vol/NAME."""


@volume.command("add")
@click.argument("name")
@pass_ctx
@service_errors
def volume_add(ctx: Context, name: str) -> None:
    """Register volume NAME (mount its disk at TOP/vol/NAME first)."""
    info = ctx.velocity().volumes.add(name)
    click.echo(f"added volume '{info.name}' at {info.path}")


@volume.command("mark")
@click.argument("name")
@pass_ctx
@service_errors
def volume_mark(ctx: Context, name: str) -> None:
    """Write volume NAME's marker on the disk mounted at TOP/vol/NAME (a volume made
    before markers; refused unless every media of NAME is on that disk)."""
    count = ctx.velocity().volumes.mark(name)
    click.echo(f"marked volume '{name}' ({count} media on its disk)")


@volume.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@service_errors
def volume_list(ctx: Context, as_json: bool) -> None:
    """Volumes with their state, path, media count, bytes used and free space on their
    disk (none for an offline volume: its disk is not there)."""
    infos = ctx.velocity().volumes.all()
    if as_json:
        emit_json([info.__dict__ for info in infos])
        return
    emit_volumes(infos)


def emit_volumes(infos: list[VolumeInfo]) -> None:
    """The volume table, then one warning line for each offline volume."""
    emit_table(
        ["VOLUME", "STATE", "MEDIA", "USED MiB", "FREE MiB", "PATH"],
        [
            [
                i.name,
                "online" if i.online else "offline",
                i.media,
                mib(i.used_bytes),
                "-" if i.free_bytes is None else mib(i.free_bytes),
                i.path,
            ]
            for i in infos
        ],
    )
    for i in infos:
        if not i.online:
            click.echo(f"warning: volume '{i.name}' is offline: {i.offline_reason}", err=True)


@volume.command("rm")
@click.argument("name")
@pass_ctx
@service_errors
def volume_rm(ctx: Context, name: str) -> None:
    """Forget volume NAME (refused while media lives there)."""
    ctx.velocity().volumes.remove(name)
    click.echo(f"removed volume '{name}'")


@volume.group("policy")
def policy() -> None:
    """The volume policy that places new media."""


@policy.command("check")
@click.option("--pool", "pool_path", required=True, help="Pool path, e.g. tenants/acme.")
@click.option("--name", required=True, help="File name of the new media.")
@click.option("--user", help="Creating user.")
@click.option("--group", "groups", multiple=True, help="A group of the creator (repeatable).")
@pass_ctx
@service_errors
def policy_check(
    ctx: Context, pool_path: str, name: str, user: str | None, groups: tuple[str, ...]
) -> None:
    """Explain which rule new media would hit, and the volume it would go to."""
    v = ctx.velocity()
    if v.policy.error:
        click.echo(f"warning: {v.policy.error}", err=True)
    decision = v.explain_placement(pool_path.strip("/"), name, Creator(user, frozenset(groups)))
    click.echo(f"{decision.volume}  ({decision.reason})")


@click.group()
def media() -> None:
    """Inspect media and move them between volumes."""


def resolve_media(v: Velocity, ref: str) -> MediaView:
    """MEDIA is a media id, or a path in a mount (read through its user.velocity.mid)."""
    if os.path.exists(ref):
        path = ref
        try:
            ref = os.getxattr(path, "user.velocity.mid").decode()
        except OSError as exc:
            raise NotFound(f"{path} is not media in a velocityfs mount") from exc
        _commit_pool(os.path.dirname(os.path.abspath(path)))
    return v.media.get(ref)


def _commit_pool(directory: str) -> None:
    """fsync on the media's pool: its mount commits the closes it batches first, so the
    size shown is the one just written (if that fails, the catalog read says why)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def media_dict(v: Velocity, m: MediaView) -> dict[str, Any]:
    return {
        "mid": m.id,
        "name": m.name,
        "pool": v.pools.path(m.pool_id),
        "pid": m.pool_id,
        "size_bytes": m.size,
        "volume": m.volume,
        "backing_path": m.backing_path,
        "default_path": m.open_path,
    }


@media.command("show")
@click.argument("ref", metavar="MEDIA")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@service_errors
def media_show(ctx: Context, ref: str, as_json: bool) -> None:
    """Where a media lives: pool, size, volume and backing path (MEDIA: mid or mount path)."""
    v = ctx.velocity()
    info = media_dict(v, resolve_media(v, ref))
    if as_json:
        emit_json(info)
    else:
        for key, value in info.items():
            click.echo(f"{key:>13}: {value}")


@media.command("list")
@click.argument("pool_ref", metavar="POOL")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@service_errors
def media_list(ctx: Context, pool_ref: str, as_json: bool) -> None:
    """Media in a pool, with size and volume."""
    v = ctx.velocity()
    listed = v.media.in_pool(v.pool_by_ref(pool_ref).id)
    if as_json:
        emit_json([media_dict(v, m) for m in listed])
    else:
        emit_table(
            ["NAME", "SIZE MiB", "VOLUME", "MID"],
            [[m.name, mib(m.size), m.volume, m.id] for m in listed],
        )


@media.command("set-volume")
@click.argument("ref", metavar="MEDIA")
@click.argument("target", metavar="VOLUME")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds to wait for writers to close the media before refusing.",
)
@pass_ctx
@service_errors
def media_set_volume(ctx: Context, ref: str, target: str, wait_s: float) -> None:
    """Move a media's bytes to VOLUME (copy, fsync, switch, remove the old copy).

    Waits for writers to close it (then refuses), and refuses when VOLUME's disk
    lacks room.
    """
    v = ctx.velocity()
    m = resolve_media(v, ref)
    with click.progressbar(length=m.size, label=f"{m.name} -> {target}", file=None) as bar:
        source = v.volumes.move(m.id, target, progress=bar.update, wait_s=wait_s)
    click.echo(f"moved {m.id} from {source} to {target}: {v.media.get(m.id).backing_path}")
