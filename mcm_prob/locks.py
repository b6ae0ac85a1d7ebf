"""One writer per result file: a run holds ``FILE.lock`` beside its output for as long as it
may write (an exclusive `flock`), and a second run on the same output is refused at once with
a message naming the holder (process id, host, start time, command line), written into the
lock file. The kernel drops the lock when the holding process ends, however it ends, so a
killed run never blocks the next one; the file itself is removed on release.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["OutputBusy", "lock_path", "writer_lock"]


class OutputBusy(RuntimeError):
    """Another live process is writing the same output file."""


def lock_path(out: str | Path) -> Path:
    """The lock file of the output `out`: ``out.lock`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(errors="replace")[:4096])
        return (
            f"process {int(info['pid'])} on {info['host']} since {info['since']} "
            f"({str(info['command'])[:200]})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def writer_lock(out: str | Path):
    """Hold the lock of `out` for the duration of the block; `OutputBusy` if another process
    holds it. The lock file is re-opened when it was replaced between open and lock, so that
    two writers can never hold locks on different files of the same name."""
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(
                f"{out} is being written by {_holder(path)}; wait for that run to end or "
                "choose another --out"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed it: lock the file that is there now
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv) or "python",
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
