"""``velocityfs config``: check the configuration file, print an example."""

import click

from velocityfs.cli.context import Context, pass_ctx
from velocityfs.config import DEFAULT_CONFIG, EXAMPLE, ConfigError, load


@click.group("config")
def config_group() -> None:
    """The configuration file."""


@config_group.command("check")
@pass_ctx
def config_check(ctx: Context) -> None:
    """Validate the configuration and say exactly what is wrong."""
    path = ctx.config_path or DEFAULT_CONFIG
    try:
        settings = load(
            ctx.config_path,
            strict=True,
            warn=lambda note: click.echo(f"{path}: warning: {note}", err=True),
        )
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"{exc.path}: {problem}", err=True)
        raise SystemExit(1) from exc
    click.echo(f"{path}: ok (catalog {settings.catalog_url}, store {settings.store})")


@config_group.command("example")
def config_example() -> None:
    """Print a commented example configuration."""
    click.echo(EXAMPLE, nl=False)
