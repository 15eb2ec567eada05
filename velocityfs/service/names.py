"""The naming rule shared by pools, media, users and groups."""

from velocityfs.errors import InvalidName, NameTooLong

MAX_NAME_BYTES = 255


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it can be a directory entry, else raise InvalidName.

    The rule is the kernel's (no ``/``, no NUL, at most 255 bytes, not ``.``
    or ``..``), so every name the API accepts can also appear in the mount.
    """
    if not isinstance(name, str) or name == "":
        raise InvalidName(f"{what} must not be empty")
    if name in (".", ".."):
        raise InvalidName(f"{what} must not be '.' or '..'")
    if "/" in name or "\0" in name:
        raise InvalidName(f"{what} must not contain '/' or NUL")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidName(f"{what} is not valid UTF-8") from exc
    if len(encoded) > MAX_NAME_BYTES:
        raise NameTooLong(f"{what} is longer than {MAX_NAME_BYTES} bytes")
    return name
