"""One writer per run directory: RUN/.slimtune.lock names the process that writes it.

    slimtune train --out RUN   ->  RUN/.slimtune.lock: "<pid>\n", flock(LOCK_EX) held
                                   until the run ends; then the file is removed

    a second `slimtune train --out RUN` (or --resume) while the first lives
                               ->  SlimtuneError naming the first one's PID
    a lock left by a process that died (SIGKILL, a crash, a power cut)
                               ->  taken over: the kernel released its flock with the process,
                                   so a dead holder never leaves a run stuck, and a PID reused
                                   by an unrelated process cannot fake a live one

`compare --jobs` and the web UI rely on this: each run directory has one writer.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimtune.errors import SlimtuneError

LOCK_NAME = ".slimtune.lock"


def _pid_in(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 32).decode("ascii", "replace").strip()
    return text if text.isdigit() else "unknown"


def _refuse(out: Path, fd: int) -> SlimtuneError:
    return SlimtuneError(
        f"run directory {out} is being written by process {_pid_in(fd)} "
        f"(its lock is {out / LOCK_NAME}); wait for it to finish or stop it, or choose another --out"
    )


def check_unlocked(out: Path) -> None:
    """Refuse a run directory that a live process is writing; remove a dead process's lock."""
    path = Path(out) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(Path(out), fd) from None
        path.unlink(missing_ok=True)  # stale: its process is gone
    finally:
        os.close(fd)


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold RUN's lock for the block (the directory is made if needed); refuse a live holder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(out, fd) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
