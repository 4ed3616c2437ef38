"""An exclusive, non-blocking lock on a file, which names its holder and dies with it.

    lock = LockFile(out / ".lock.rank-0", "--out 'out'")
    lock.acquire()          # LockHeld: "--out 'out' is in use by pid 4242 on host gpu-3 (since …)"
    ...
    lock.release()

The lock is ``flock(LOCK_EX | LOCK_NB)`` on the file (an advisory lock of the open file
description).  The kernel drops it when its process dies, SIGKILL included, so a lock left
behind by a dead process is no lock at all: the next `acquire` takes it over, without
guessing from a pid whether its holder is alive (pids are reused; a pid from another host
cannot be checked).  Over NFS, Linux maps flock to the server's byte-range locks, which a
crashed client's lease also releases.

The holder writes its pid, host and start time into the file after it has the lock, for
the message of whoever is refused.  `release` unlinks the file while still holding the
lock; an `acquire` that raced with it (opened the old file, locked it after the unlink)
sees that the path no longer leads to its file and starts again.  A file system without
locks (some FUSE mounts), or a system without ``fcntl``, gets a warning and no lock.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
import warnings
from pathlib import Path


class LockHeld(ValueError):
    """Another live process holds the lock.  A ValueError, so the command line reports it in one line."""


class LockFile:
    """An exclusive lock on ``path``; ``what`` names the guarded thing in the refusal ("--out 'x'")."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self.fd: int | None = None  # the open, locked file while held

    def acquire(self) -> "LockFile":
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            warnings.warn(f"{self.what}: no file locks on this system; concurrent runs are not prevented")
            return self
        for _ in range(100):  # each round loses only to a release that unlinked the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                raise LockHeld(f"{self.what} is in use by {holder}: wait for that run to end or stop it") from None
            except OSError as e:  # no locks on this file system
                os.close(fd)
                warnings.warn(f"{self.what}: cannot lock {self.path} ({e}); concurrent runs are not prevented")
                return self
            if _same_file(fd, self.path):
                self.fd = fd
                self._write_holder()
                return self
            os.close(fd)  # released (unlinked) between our open and our flock: try the new file
        raise RuntimeError(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while locked: nobody can hold the file we remove
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = None

    def _write_holder(self) -> None:
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data.encode() + b"\n", 0)
        os.fsync(self.fd)

    def _holder(self) -> str:
        """"pid 4242 on host gpu-3 (since …)" from the file; the holder writes it just after locking."""
        for _ in range(20):
            try:
                holder = json.loads(self.path.read_text())
                return f"pid {holder['pid']} on host {holder['host']} (since {holder['since']})"
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)  # not written yet
        return "another process (it has not written its pid yet)"

    def __enter__(self) -> "LockFile":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

