"""The OpenAPI 3 description served at /openapi.json; tests check responses against it."""

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
_NUMBER_OR_STRING = {"oneOf": [{"type": "number", "minimum": 0}, {"type": "string"}]}
_MIB = {"type": "number", "minimum": 0}
_ID = {"type": "string"}


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": required, "properties": properties}
            }
        },
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "A field is missing or malformed",
        403: "Missing, unknown or expired authkey, or the caller lacks the permission",
        404: "Not found",
        406: "The quota exceeds the quota of a parent pool",
        409: "The name is already taken",
        413: "The media exceeds a quota of the pool or an ancestor",
    }
    return {str(c): _json(text[c], _ERROR) for c in codes}


_OBJ: dict[str, Any] = {"type": "object"}
_AUTH = {"authkey": {"type": "string"}}
_POOL = {
    "type": "object",
    "required": ["pid", "quota_mib", "permissions"],
    "properties": {
        "pid": _ID,
        "name": {"type": "string"},
        "parent": {"type": ["string", "null"]},
        "quota_mib": _MIB,
        "used_mib": _MIB,
        "permissions": {"type": "array", "items": {"type": "string"}},
    },
}
_MEDIA = {
    "type": "object",
    "required": ["mid", "filename", "size_mib"],
    "properties": {
        "mid": _ID,
        "filename": {"type": "string"},
        "size_mib": _MIB,
        "size_bytes": {"type": "integer", "minimum": 0},
        "volume": {"type": "string"},
        "backing_path": {"type": "string"},
    },
}
_CREATED = {
    "type": "object",
    "required": ["pid", "filename", "mid"],
    "properties": {"pid": _ID, "filename": {"type": "string"}, "mid": _ID},
}
_KEY = {
    "type": "object",
    "required": ["authkey", "expires"],
    "properties": {"authkey": {"type": "string"}, "expires": {"type": "integer"}},
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "velocityfs pool and media API",
        "version": "1.0",
        "description": "Velocity's pool management API. Request fields travel in a JSON "
        "body (also for GET and DELETE); the authkey may instead be sent as "
        "'Authorization: Bearer'. Numbers may be JSON numbers or numeric strings.",
    },
    "paths": {
        "/u/auth": {
            "post": {
                "summary": "Log in: name and password give an authkey",
                "requestBody": _body(
                    {"name": {"type": "string"}, "password": {"type": "string"}},
                    ["name", "password"],
                ),
                "responses": {"200": _json("Authkey issued", _KEY), **_errors(400, 403)},
            },
            "patch": {
                "summary": "Renew an authkey",
                "requestBody": _body(_AUTH, ["authkey"]),
                "responses": {"200": _json("Authkey renewed", _KEY), **_errors(400, 403)},
            },
            "delete": {
                "summary": "Drop an authkey",
                "requestBody": _body(_AUTH, ["authkey"]),
                "responses": {"200": _json("Dropped", _OBJ), **_errors(400, 403)},
            },
        },
        "/p": {
            "get": {
                "summary": "Pools shared with a group that carry velocity.pool.view",
                "requestBody": _body({**_AUTH, "gid": _ID}, ["authkey", "gid"]),
                "responses": {
                    "200": _json(
                        "The group's pools",
                        {
                            "type": "object",
                            "required": ["gid", "pools"],
                            "properties": {"gid": _ID, "pools": {"type": "array", "items": _POOL}},
                        },
                    ),
                    **_errors(400, 403, 404),
                },
            },
            "put": {
                "summary": "Create a pool (needs velocity.pool.create on the parent)",
                "requestBody": _body(
                    {
                        **_AUTH,
                        "parentpool": _ID,
                        "name": {"type": "string"},
                        "quota_mib": _NUMBER_OR_STRING,
                    },
                    ["authkey", "parentpool", "name", "quota_mib"],
                ),
                "responses": {
                    "200": _json(
                        "Pool created",
                        {"type": "object", "required": ["pid"], "properties": {"pid": _ID}},
                    ),
                    **_errors(400, 403, 404, 406, 409),
                },
            },
            "delete": {
                "summary": "Remove a pool, its subpools and all their media",
                "requestBody": _body({**_AUTH, "pid": _ID}, ["authkey", "pid"]),
                "responses": {"200": _json("Pool removed", _OBJ), **_errors(400, 403, 404)},
            },
        },
        "/p/media": {
            "get": {
                "summary": "Media in a pool (needs velocity.pool.media.view)",
                "requestBody": _body({**_AUTH, "pid": _ID}, ["authkey", "pid"]),
                "responses": {
                    "200": _json(
                        "The pool's media",
                        {
                            "type": "object",
                            "required": ["pid", "media"],
                            "properties": {"pid": _ID, "media": {"type": "array", "items": _MEDIA}},
                        },
                    ),
                    **_errors(400, 403, 404),
                },
            },
            "put": {
                "summary": "Create sparse media of size_mib (needs velocity.pool.media.create)",
                "requestBody": _body(
                    {
                        **_AUTH,
                        "pid": _ID,
                        "filename": {"type": "string"},
                        "size_mib": _NUMBER_OR_STRING,
                    },
                    ["authkey", "pid", "filename", "size_mib"],
                ),
                "responses": {
                    "200": _json("Media created", _CREATED),
                    **_errors(400, 403, 404, 409, 413),
                },
            },
            "delete": {
                "summary": "Remove media (needs velocity.pool.media.remove)",
                "requestBody": _body({**_AUTH, "mid": _ID}, ["authkey", "mid"]),
                "responses": {"200": _json("Media removed", _OBJ), **_errors(400, 403, 404)},
            },
        },
        "/p/media/{authkey}/{pid}/{filename}": {
            "put": {
                "summary": "Upload media: the raw body becomes the file",
                "parameters": [
                    {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                    for n in ("authkey", "pid", "filename")
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/octet-stream": {"schema": {"type": "string"}}},
                },
                "responses": {
                    "200": _json("Media uploaded", _CREATED),
                    **_errors(400, 403, 404, 409, 413),
                },
            },
        },
    },
}
