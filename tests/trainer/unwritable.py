"""Make a folder unwritable for real, from outside the process that writes into it: a checkpoint storage outage.

Tests run as root here, and root ignores permission bits, so `chmod 0o555` would stop nothing. What stops root
is the immutable attribute (`chattr +i`, ext2/3/4, XFS, btrfs, tmpfs on recent kernels): no entry can be
created, renamed or removed in the folder (EPERM); files inside its subfolders stay writable, so a save whose
step folder already exists fails at the commit's rename. Not root: chmod 0o555 does the same (EACCES).
`mechanism()` probes which works on the file system holding `where`, and says why when neither does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _chattr(path: Path, flag: str) -> bool:
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    return subprocess.run([chattr, flag, str(path)], capture_output=True, check=False).returncode == 0


def mechanism(where: Path) -> tuple[str | None, str]:
    """("chattr" | "chmod", "") when a folder under `where` can be made unwritable, else (None, why not)."""
    if os.geteuid() != 0:
        return "chmod", ""
    probe = Path(tempfile.mkdtemp(dir=where, prefix="immutable-probe-"))
    try:
        if not _chattr(probe, "+i"):
            return None, "root ignores chmod, and chattr +i is unavailable or unsupported on this file system"
        try:
            (probe / "x").mkdir()
        except PermissionError:
            return "chattr", ""
        return None, "chattr +i did not stop root from creating entries"
    finally:
        _chattr(probe, "-i")
        shutil.rmtree(probe, ignore_errors=True)


def lock(path: Path, how: str) -> None:
    if how == "chattr":
        assert _chattr(path, "+i"), f"chattr +i {path} failed"
    else:
        path.chmod(0o555)


def unlock(path: Path, how: str) -> None:
    if how == "chattr":
        assert _chattr(path, "-i"), f"chattr -i {path} failed"
    else:
        path.chmod(0o755)


@contextmanager
def unwritable(path: Path, how: str) -> Iterator[None]:
    lock(path, how)
    try:
        yield
    finally:
        unlock(path, how)
