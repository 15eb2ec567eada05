"""What every subcommand shares: the lazily opened service and error reporting."""

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from velocityfs.errors import VelocityError
from velocityfs.service.velocity import Velocity

DEFAULT_STORE = "/var/lib/velocityfs"


def default_catalog(store: str) -> str:
    return f"sqlite:///{Path(store).resolve() / 'catalog.sqlite'}"


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
    """Lazily opened service, so ``--help`` never touches the catalog."""

    def __init__(self, catalog: str | None, store: str) -> None:
        self.store = store
        self.catalog = catalog or default_catalog(store)
        self._velocity: Velocity | None = None

    def velocity(self, *, initialised: bool = True) -> Velocity:
        if self._velocity is None:
            self._velocity = Velocity(self.catalog, self.store)
            if initialised:
                self._velocity.require_initialised()
        return self._velocity


pass_ctx = click.make_pass_decorator(Context)
