"""Writes that a crash or a power loss cannot leave half done.

A file is written under a temporary name in its final folder, flushed to the disk
(fsync) and renamed over its final name: ``os.replace`` is atomic, so a reader sees the
old file or the whole new one.  The rename itself is an entry of the folder, which
survives a power loss only once the folder is fsynced too (`fsync_path` of the folder,
once for a batch of renames, or `replace_durably` for one).
"""
from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's bytes, or a folder's list of names, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` over ``dst`` atomically and make the rename durable (fsync of ``dst``'s folder)."""
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file in the same folder, fsynced, then renamed.

    One writer per path: the temporary name is derived from the final one.  The folder is
    not fsynced: call `fsync_path` on it (after a batch of writes) when the rename must
    survive a power loss.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
