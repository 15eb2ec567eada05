"""Human tables and ``--json`` output for the admin CLI."""

import json
from collections.abc import Sequence
from typing import Any

import click

MIB = 1 << 20


def mib(nbytes: int | None) -> str:
    """Bytes as MiB with two decimals; None reads as inherited."""
    if nbytes is None:
        return "inherit"
    return f"{nbytes / MIB:.2f}"


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def emit_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A left-aligned table sized to its widest cells."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
