"""Atomic file and folder replacement for state that must survive a crash (versions, checkpoints,
adapters).

Owns the write-tmp / flush / fsync / ``os.replace`` / fsync-the-directory sequence, so a reader sees
either the old file or the new one, never a torn one. Tmp names start with ``.`` and contain
``.tmp``: readers that glob for real files ignore them. Imports only the standard library; never
sglang, never other package modules.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, IO


def tmp_path_for(path: Path) -> Path:
    """The tmp sibling a write of ``path`` goes through (same folder, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Makes a rename inside ``folder`` durable (POSIX: the directory entry is data too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Calls ``write(f)`` on a tmp file, fsyncs it and renames it over ``path``.

    Side effect: creates ``path.parent`` if missing. Returns only after the rename is durable. On
    an exception the tmp file is removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``atomic_write`` of a bytes value."""
    def write(f: IO[bytes]) -> None:
        f.write(data)

    atomic_write(path, write)


def fsync_tree(folder: Path) -> None:
    """fsyncs every file in ``folder`` (not recursive) and the folder itself."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def replace_folder(tmp: Path, folder: Path) -> None:
    """Moves the finished folder ``tmp`` to ``folder``, replacing an existing one.

    POSIX cannot rename a folder over a non-empty one, so an existing ``folder`` is first renamed
    aside (``.NAME.old.PID``) and removed after the swap. A crash between the two renames leaves
    the old folder aside and none in place; never a half-written one under ``folder``. Adapter
    folders are named per version, so replacing an existing one is the rare case.
    """
    aside = folder.with_name(f".{folder.name}.old.{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside)
    has_old = folder.exists()
    if has_old:
        os.replace(folder, aside)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    if has_old:
        shutil.rmtree(aside)
