"""What every subcommand shares: the lazily opened service and error reporting."""

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from velocityfs.config import Settings, load
from velocityfs.errors import VelocityError
from velocityfs.service.velocity import Velocity


def service_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a service refusal into ``velocityfs: error: ...`` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VelocityError as exc:
            click.echo(f"velocityfs: error: {exc}", err=True)
            sys.exit(1)

    return wrapper


class Context:
    """The settings (file, then flags) and a lazily opened service.

    Nothing touches the configuration or the catalog until a command needs
    it, so ``--help`` and ``config check`` work on a broken setup.
    """

    def __init__(self, config: str | None, catalog: str | None, store: str | None) -> None:
        self.config_path = config
        self._flags = {"catalog": catalog, "store": store}
        self._settings: Settings | None = None
        self._velocity: Velocity | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            settings = load(self.config_path)
            for key, value in self._flags.items():
                if value is not None:
                    setattr(settings, key, value)
            self._settings = settings
        return self._settings

    def velocity(self, *, initialised: bool = True) -> Velocity:
        if self._velocity is None:
            settings = self.settings
            self._velocity = Velocity(
                settings.catalog_url,
                settings.store,
                authkey_lifetime_s=settings.authkey_lifetime_s,
                volume_policy=settings.volume_policy,
            )
            if initialised:
                self._velocity.require_initialised()
        return self._velocity


pass_ctx = click.make_pass_decorator(Context)
