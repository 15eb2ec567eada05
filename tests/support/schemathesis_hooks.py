"""Schemathesis hooks of tests/test_api_schemathesis.py, loaded by the ``st run`` it starts
(its configuration names this module). The authkeys come in the environment:
VELOCITYFS_FUZZ_KEYS the live ones, VELOCITYFS_FUZZ_DROP_KEYS those DELETE /u/auth may drop.

- ``with_live_authkey``: three requests in four carry a live authkey, whatever was
  generated for it (in the body, as Bearer, in the upload's path; a request generated
  with none gets it in its body, if it has one), so that their other fields (negative
  ones too) reach past the authkey check into the service and the catalog.
  Schemathesis's dictionaries do not reach its coverage phase, whose requests would
  otherwise all end at that check. (Schemathesis revalidates an edited case.)
  DELETE /u/auth never gets a live key: it gets one of its own to drop instead, as a
  dropped live key would turn the rest of the run into 403s.
- ``positive_names_fit``: a generated pool or file name longer than 255 bytes in UTF-8
  (but not 255 characters) is no valid data, as JSON Schema counts characters only:
  such names are kept out of the positive cases.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import schemathesis


def _keys(variable: str) -> list[str]:
    return [key for key in os.environ.get(variable, "").split(",") if key]


LIVE_KEYS = _keys("VELOCITYFS_FUZZ_KEYS")
DROP_KEYS = _keys("VELOCITYFS_FUZZ_DROP_KEYS")
NAME_FIELDS = ("name", "filename")


@schemathesis.hook("before_call")
def with_live_authkey(context: Any, case: Any, kwargs: Any) -> None:
    dropping = (case.method.upper(), case.path) == ("DELETE", "/u/auth")
    keys = DROP_KEYS if dropping else LIVE_KEYS
    if not keys:
        return
    pick = zlib.crc32(repr((case.method, case.path, case.body, case.path_parameters)).encode())
    key = keys[pick % len(keys)]
    body = case.body if isinstance(case.body, dict) else None
    headers = case.headers if case.headers is not None else {}
    if dropping:
        # Whatever it was given (a link passes a live key on, too): never a live key.
        if body is not None and body.get("authkey") in LIVE_KEYS:
            body["authkey"] = key
        if any(live in headers.get("Authorization", "") for live in LIVE_KEYS):
            headers["Authorization"] = f"Bearer {key}"
    if pick % 4 == 0:
        return
    if case.path_parameters and "authkey" in case.path_parameters:
        case.path_parameters["authkey"] = key
    elif (case.method.upper(), case.path) == ("POST", "/u/auth"):
        return
    elif body is not None and "authkey" in body:
        body["authkey"] = key
    elif "Authorization" in headers:
        case.headers = {**headers, "Authorization": f"Bearer {key}"}
    elif body is not None:
        # In the body, where the document's links look for it.
        body["authkey"] = key
    else:
        case.headers = {**headers, "Authorization": f"Bearer {key}"}


@schemathesis.hook("filter_case")
def positive_names_fit(context: Any, case: Any) -> bool:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    values = [case.path_parameters.get("filename")] if case.path_parameters else []
    if isinstance(case.body, dict):
        values += [case.body.get(field) for field in NAME_FIELDS]
    return all(
        not isinstance(v, str) or len(v.encode("utf-8", "surrogatepass")) <= 255 for v in values
    )
