"""The OpenAPI 3 description served at /openapi.json; tests check responses against it.

It describes exactly what the server accepts (``tests/test_api_schemathesis.py``
holds the two to each other), but for two rules JSON Schema cannot say: a name
(``name``, ``filename``) is at most 255 bytes in UTF-8, not only 255 characters;
and a request without an authkey, in its body or as ``Authorization: Bearer``, is
refused with 403 (so the body's ``authkey`` is optional, and ``{}`` in ``security``
says the header is).

Its links say which response fields the next requests take (the pid of a new pool,
the mid of new media, a fresh authkey): schemathesis's stateful phase follows them.
"""

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
# A MiB amount in a request: a JSON number, or a string of decimal digits (app.mib_field).
MAX_MIB = 10**12 - 1
MIB_PATTERN = "^[0-9]{1,12}([.][0-9]+)?$"
_NUMBER_OR_STRING = {
    "oneOf": [
        {"type": "number", "minimum": 0, "maximum": MAX_MIB},
        {"type": "string", "pattern": MIB_PATTERN},
    ]
}
_MIB = {"type": "number", "minimum": 0}
# Text the server takes: not empty, no NUL.
_TEXT = {"type": "string", "minLength": 1, "pattern": "^[^\\x00]*$"}
_ID = _TEXT
# The naming rule of pools and media (service.names.check_name): a directory entry.
_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": 255,
    "pattern": "^[^/\\x00]*$",
    "not": {"enum": [".", ".."]},
    "description": "at most 255 bytes in UTF-8; no '/' or NUL; not '.' or '..'",
}
# A segment of the upload's path (a '/' in it, even %2F, ends the segment).
_SEGMENT = {"type": "string", "minLength": 1, "pattern": "^[^/]*$"}


def _body(
    properties: dict[str, Any], required: list[str], *, optional: bool = False
) -> dict[str, Any]:
    return {
        "required": not optional,
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": required, "properties": properties}
            }
        },
    }


def _json(description: str, schema: dict[str, Any], **links: dict[str, Any]) -> dict[str, Any]:
    response = {"description": description, "content": {"application/json": {"schema": schema}}}
    if links:
        response["links"] = links
    return response


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "A field is missing or malformed",
        403: "Missing, unknown or expired authkey, or the caller lacks the permission "
        "on a pool it has some permission on",
        404: "Not found, or not the caller's to see",
        406: "The quota exceeds the quota of a parent pool",
        408: "No bytes of the body arrived for upload_idle_s: the upload was aborted",
        409: "The name is already taken",
        413: "The JSON body is longer than api_max_body_bytes, or the media exceeds a "
        "quota of the pool or an ancestor",
        503: "The catalog is unreachable, or the media's volume is offline: try again",
    }
    return {str(c): _json(text[c], _ERROR) for c in (*codes, 503)}


def _link(operation: str, body: dict[str, str] | None = None, **path: str) -> dict[str, Any]:
    """A link to ``operation``: its body fields (merged into the body generated for it)
    and path parameters, as runtime expressions on this request and response."""
    link: dict[str, Any] = {"operationId": operation}
    if body:
        link["requestBody"] = body
    if path:
        link["parameters"] = {f"path.{name}": value for name, value in path.items()}
    return link


_OBJ: dict[str, Any] = {"type": "object"}
# The authkey: in the body, or as 'Authorization: Bearer' (then the body may go without).
_AUTH = {"authkey": {"type": "string", "minLength": 1}}
# Where a link finds the authkey: in the response that issued it, or the request that used it.
_ISSUED = "$response.body#/authkey"
_USED = "$request.body#/authkey"
_POOL = {
    "type": "object",
    "required": ["pid", "quota_mib", "permissions"],
    "properties": {
        "pid": _ID,
        "name": {"type": "string"},
        "parent": {"type": ["string", "null"]},
        "quota_mib": _MIB,
        "used_mib": _MIB,
        "avail_mib": _MIB,
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


def _key_links() -> dict[str, dict[str, Any]]:
    """What a fresh authkey opens."""
    key = {"authkey": _ISSUED}
    return {
        "renew": _link("renewAuthkey", key),
        "drop": _link("dropAuthkey", key),
        "listPools": _link("listPools", key),
        "createPool": _link("createPool", key),
        "listMedia": _link("listMedia", key),
        "createMedia": _link("createMedia", key),
    }


def _pool_links(pid: str) -> dict[str, dict[str, Any]]:
    """What a pool's pid (an expression) opens, with the authkey of the request."""
    return {
        "listMedia": _link("listMedia", {"authkey": _USED, "pid": pid}),
        "createMedia": _link("createMedia", {"authkey": _USED, "pid": pid}),
        "upload": _link("uploadMedia", authkey=_USED, pid=pid),
        "createSubpool": _link("createPool", {"authkey": _USED, "parentpool": pid}),
        "removePool": _link("removePool", {"authkey": _USED, "pid": pid}),
    }


def _media_links(authkey: str, mid: str) -> dict[str, dict[str, Any]]:
    return {"removeMedia": _link("removeMedia", {"authkey": authkey, "mid": mid})}


# Every operation but login and the upload takes the authkey in its body or as Bearer.
_BEARER_OR_BODY: list[dict[str, list[str]]] = [{"bearer": []}, {}]

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "velocityfs pool and media API",
        "version": "1.0",
        "description": "Velocity's pool management API. Request fields travel in a JSON "
        "body (also for GET and DELETE); the authkey may instead be sent as "
        "'Authorization: Bearer' (a request with neither gets 403). No endpoint takes "
        "query string parameters (400). "
        "Numbers may be JSON numbers or numeric strings. A JSON body may be at most "
        "api_max_body_bytes long (1 MiB; 413), nest at most 400 levels deep and hold at "
        "most 10000 values, counted as the bytes '[', '{', ':' and ',' (400).",
    },
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The authkey, instead of the body's 'authkey' field",
            }
        }
    },
    "security": _BEARER_OR_BODY,
    "paths": {
        "/u/auth": {
            "post": {
                "operationId": "login",
                "summary": "Log in: name and password give an authkey",
                "security": [],
                "requestBody": _body(
                    {"name": _TEXT, "password": _TEXT},
                    ["name", "password"],
                ),
                "responses": {
                    "200": _json("Authkey issued", _KEY, **_key_links()),
                    **_errors(400, 403, 413),
                },
            },
            "patch": {
                "operationId": "renewAuthkey",
                "summary": "Renew an authkey",
                # The Bearer header alone will do.
                "requestBody": _body(_AUTH, [], optional=True),
                "responses": {
                    "200": _json(
                        "Authkey renewed", _KEY, drop=_link("dropAuthkey", {"authkey": _ISSUED})
                    ),
                    **_errors(400, 403, 413),
                },
            },
            "delete": {
                "operationId": "dropAuthkey",
                "summary": "Drop an authkey",
                "requestBody": _body(_AUTH, [], optional=True),
                "responses": {"200": _json("Dropped", _OBJ), **_errors(400, 403, 413)},
            },
        },
        "/p": {
            "get": {
                "operationId": "listPools",
                "summary": "Every pool the group may view (velocity.pool.view), subpools included",
                "requestBody": _body({**_AUTH, "gid": _ID}, ["gid"]),
                "responses": {
                    "200": _json(
                        "The group's pools",
                        {
                            "type": "object",
                            "required": ["gid", "pools"],
                            "properties": {"gid": _ID, "pools": {"type": "array", "items": _POOL}},
                        },
                        **_pool_links("$response.body#/pools/0/pid"),
                    ),
                    **_errors(400, 403, 404, 413),
                },
            },
            "put": {
                "operationId": "createPool",
                "summary": "Create a pool (needs velocity.pool.create on the parent)",
                "requestBody": _body(
                    {
                        **_AUTH,
                        "parentpool": _ID,
                        "name": _NAME,
                        "quota_mib": _NUMBER_OR_STRING,
                    },
                    ["parentpool", "name", "quota_mib"],
                ),
                "responses": {
                    "200": _json(
                        "Pool created",
                        {"type": "object", "required": ["pid"], "properties": {"pid": _ID}},
                        **_pool_links("$response.body#/pid"),
                    ),
                    **_errors(400, 403, 404, 406, 409, 413),
                },
            },
            "delete": {
                "operationId": "removePool",
                "summary": "Remove a pool, its subpools and all their media",
                "requestBody": _body({**_AUTH, "pid": _ID}, ["pid"]),
                "responses": {
                    "200": _json("Pool removed", _OBJ),
                    **_errors(400, 403, 404, 413),
                },
            },
        },
        "/p/media": {
            "get": {
                "operationId": "listMedia",
                "summary": "Media in a pool (needs velocity.pool.media.view)",
                "requestBody": _body({**_AUTH, "pid": _ID}, ["pid"]),
                "responses": {
                    "200": _json(
                        "The pool's media",
                        {
                            "type": "object",
                            "required": ["pid", "media"],
                            "properties": {"pid": _ID, "media": {"type": "array", "items": _MEDIA}},
                        },
                        **_media_links(_USED, "$response.body#/media/0/mid"),
                    ),
                    **_errors(400, 403, 404, 413),
                },
            },
            "put": {
                "operationId": "createMedia",
                "summary": "Create sparse media of size_mib (needs velocity.pool.media.create)",
                "requestBody": _body(
                    {
                        **_AUTH,
                        "pid": _ID,
                        "filename": _NAME,
                        "size_mib": _NUMBER_OR_STRING,
                    },
                    ["pid", "filename", "size_mib"],
                ),
                "responses": {
                    "200": _json(
                        "Media created",
                        _CREATED,
                        **_media_links(_USED, "$response.body#/mid"),
                    ),
                    **_errors(400, 403, 404, 409, 413),
                },
            },
            "delete": {
                "operationId": "removeMedia",
                "summary": "Remove media (needs velocity.pool.media.remove)",
                "requestBody": _body({**_AUTH, "mid": _ID}, ["mid"]),
                "responses": {
                    "200": _json("Media removed", _OBJ),
                    **_errors(400, 403, 404, 413),
                },
            },
        },
        "/p/media/{authkey}/{pid}/{filename}": {
            "put": {
                "operationId": "uploadMedia",
                "summary": "Upload media: the raw body becomes the file",
                # The authkey is in the path (a Bearer header is not looked at).
                "security": [],
                "parameters": [
                    {"name": n, "in": "path", "required": True, "schema": schema}
                    for n, schema in (("authkey", _SEGMENT), ("pid", _SEGMENT), ("filename", _NAME))
                ],
                # No body is an empty file.
                "requestBody": {
                    "required": False,
                    "content": {"application/octet-stream": {"schema": {"type": "string"}}},
                },
                "responses": {
                    "200": _json(
                        "Media uploaded",
                        _CREATED,
                        **_media_links("$request.path.authkey", "$response.body#/mid"),
                    ),
                    **_errors(400, 403, 404, 408, 409, 413),
                },
            },
        },
    },
}
