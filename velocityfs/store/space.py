"""fallocate(2) on a backing file, with its modes (Python's os module has no such call).

``os.posix_fallocate`` only allocates (mode 0) and, where the filesystem cannot,
glibc falls back to writing zeros; the mount has to pass each mode through as asked.
"""

import ctypes
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Allocate, zero or punch ``length`` bytes at ``offset``; OSError as the kernel says."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
