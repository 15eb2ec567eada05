"""A real ext4 disk for a volume: an image file on a loop device, mounted and unmounted
on demand, so a test can take a volume's disk away the way an operator (or a failed
boot) does.

Needs root, losetup and mkfs.ext4; a missing tool fails the test (it never skips).
``cleanup`` always unmounts and detaches, whatever the test left.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

from support.admin import mountinfo_has

TOOLS = ("losetup", "mkfs.ext4", "mount", "umount")


def _run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, f"{' '.join(argv)} failed ({res.returncode}): {res.stderr}"
    return res.stdout.strip()


class LoopDisk:
    """An ext4 image attached to a loop device, mounted at ``mountpoint`` when asked."""

    def __init__(self, image: Path, mountpoint: Path, size_mib: int = 64) -> None:
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        assert not missing, f"loop-disk tests need {', '.join(missing)} on PATH"
        self.image = image
        self.mountpoint = mountpoint
        with open(image, "wb") as f:
            f.truncate(size_mib << 20)
        _run("mkfs.ext4", "-q", "-F", str(image))
        self.device = _run("losetup", "--find", "--show", str(image))

    @property
    def mounted(self) -> bool:
        return mountinfo_has(self.mountpoint)

    def mount(self) -> Path:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        _run("mount", self.device, str(self.mountpoint))
        return self.mountpoint

    def unmount(self, timeout: float = 10.0) -> None:
        """Unmount (retrying while a daemon still has the disk busy for a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            res = subprocess.run(
                ["umount", str(self.mountpoint)], capture_output=True, text=True, check=False
            )
            if res.returncode == 0 and not self.mounted:
                return
            assert time.monotonic() < deadline, f"cannot unmount {self.mountpoint}: {res.stderr}"
            time.sleep(0.1)

    def cleanup(self) -> None:
        """Unmount (lazily if need be) and detach the loop device."""
        try:
            for argv in (["umount", str(self.mountpoint)], ["umount", "-l", str(self.mountpoint)]):
                if not self.mounted:
                    break
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    subprocess.run(argv, capture_output=True, timeout=30, check=False)
        finally:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    ["losetup", "-d", self.device], capture_output=True, timeout=30, check=False
                )
