"""A request's JSON body and fields, bounded: what any client, with or without an
authkey, can make the API read, hold and parse.

A body is read only up to ``api_max_body_bytes`` (413 past it), nests at most
MAX_JSON_DEPTH levels and holds at most MAX_JSON_VALUES values (400): a body
needs a handful of short fields, and what the process carrying the VM disks
parses must stay bounded in memory and in time on the loop.
"""

from __future__ import annotations

import json
import json.scanner
import re
from typing import Any

from starlette.requests import Request

from velocityfs import errors
from velocityfs.api.openapi import MAX_MIB, MIB_PATTERN
from velocityfs.service.pools import mib_to_bytes


class BadRequest(errors.VelocityError):
    """A missing or malformed field (400)."""


class BodyTooLarge(errors.VelocityError):
    """A JSON request body is longer than ``api_max_body_bytes`` (413)."""


# JSON request bodies nest at most this deep (the body's object is level 1), and hold at
# most so many values, counted generously as the bytes '[', '{', ':' and ',' (in strings
# too): a request needs a handful, and each costs time to make and to free.
MAX_JSON_DEPTH = 400
MAX_JSON_VALUES = 10_000
# Bodies up to this size are parsed on the loop, a few milliseconds at worst. Longer ones
# (never needed by this API) on a thread, one at a time, by json's pure-Python scanner,
# which lets the loop run every few milliseconds: the C one holds the GIL throughout,
# 10-30 ms for 1 MiB of long numbers.
INLINE_JSON_BYTES = 64 << 10


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body if it is at most ``limit`` bytes, else BodyTooLarge (413) before
    more than ``limit`` bytes are read: at once for a longer Content-Length, as soon as
    a chunked body passes it. (``AccessLog`` reads and drops what the client still sends.)
    """
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and (len(length) > 18 or int(length) > limit):
        raise BodyTooLarge(f"the body is longer than {limit} bytes")
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > limit:
            raise BodyTooLarge(f"the body is longer than {limit} bytes")
    return bytes(received)


def parse_object(body: bytes, *, yielding: bool = False) -> dict[str, Any]:
    """A body's JSON object ({} for an empty body), nested at most MAX_JSON_DEPTH deep,
    with at most MAX_JSON_VALUES values.

    ``yielding``: with json's pure-Python scanner, which gives up the GIL as any
    Python code does (for a thread beside the loop; see INLINE_JSON_BYTES).
    """
    if not body.strip():
        return {}
    values = sum(body.count(c) for c in (b"[", b"{", b":", b","))
    if values > MAX_JSON_VALUES:
        raise BadRequest(f"the body holds more than {MAX_JSON_VALUES} values")
    try:
        if yielding:
            decoder = json.JSONDecoder()
            scanner = getattr(json.scanner, "py_make_scanner")  # noqa: B009 (not in typeshed)
            decoder.scan_once = scanner(decoder)  # type: ignore[attr-defined]
            parsed = decoder.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
        else:
            parsed = json.loads(body)
    except RecursionError as exc:  # deeper than Python's own limit
        raise BadRequest(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from exc
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadRequest("the body is not valid JSON") from exc
    if not isinstance(parsed, dict):
        raise BadRequest("the body must be a JSON object")
    # Every level opens with '[' or '{': a body with fewer of them cannot be too deep.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and too_deep(parsed):
        raise BadRequest(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return parsed


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON nests more than ``limit`` levels (walked without recursion)."""
    level: list[Any] = [value]
    for _depth in range(limit):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def text_field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{name}' is required and must be a non-empty string")
    if "\0" in value or not is_utf8(value):
        raise BadRequest(f"'{name}' must be text without NUL (or lone surrogates)")
    return value


def is_utf8(text: str) -> bool:
    """Whether ``text`` can be stored and answered (a JSON "\\ud800" cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def authkey_of(data: dict[str, Any]) -> str:
    value = data.get("authkey")
    if not isinstance(value, str) or not value:
        raise errors.AuthenticationFailed("an authkey is required")
    return value


def mib_field(data: dict[str, Any], name: str) -> int:
    """A MiB amount given as a JSON number or a string of decimal digits, at most MAX_MIB
    (what the OpenAPI description says, exactly)."""
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadRequest(f"'{name}' is required and must be a number of MiB")
    if isinstance(value, str) and not re.fullmatch(MIB_PATTERN, value):
        raise BadRequest(f"'{name}' must be a number of MiB (as a string: decimal digits)")
    try:
        too_large = float(value) > MAX_MIB
    except OverflowError:  # an integer beyond any float
        too_large = True
    if too_large:
        raise BadRequest(f"'{name}' must be at most {MAX_MIB} MiB")
    try:
        return mib_to_bytes(value)
    except errors.InvalidValue as exc:
        raise BadRequest(str(exc)) from exc
