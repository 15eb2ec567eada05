"""Space on a backing file: fallocate(2) with its modes (Python's os module has no such
call), and whether its volume can hold a file of a given size at all.

``os.posix_fallocate`` only allocates (mode 0) and, where the filesystem cannot,
glibc falls back to writing zeros; the mount has to pass each mode through as asked.
"""

import ctypes
import errno
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


def volume_holds(path: str, size: int) -> bool:
    """Whether the filesystem of the backing file ``path`` holds files of ``size`` bytes.

    Its largest file size is the kernel's to say (ext4: 16 TiB with 4 KiB blocks;
    ``pathconf``'s FILESIZEBITS answers 64 there). lseek(2) past it fails with
    EINVAL, which a truncate or fallocate to that size would answer with EFBIG, and
    lseek changes nothing, so a growth the volume cannot take is refused before
    any room is reserved for it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.lseek(fd, size, os.SEEK_SET)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
    return True
