"""The commands the app starts: `slimtune train|eval|export|compare` as child processes.

    page ─► Jobs.start("train", [["train", "--model", …]]) ─► python -m slimtune train …
                                                               (cwd = the root)
A child that crashes or runs out of memory ends with an exit code and a last line; the
server keeps running. One job of each kind at a time: a second training run (or compare,
which trains) is refused while one runs, and the page says so. Stop sends SIGINT, as
Ctrl-C would: the run keeps its last checkpoint and `--resume` continues it.
"""

from __future__ import annotations

import collections
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from slimtune.errors import SlimtuneError

SLOTS = {"train": "train", "compare": "train", "eval": "eval", "export": "export"}
ERROR_LINE = re.compile(r"^slimtune( \w+)?: (error|interrupted|internal error)")


def command_line(args: list[str]) -> str:
    """The shell line a user would type for `args`."""
    return "slimtune " + shlex.join(args)


@dataclass
class Job:
    """One or more `slimtune` commands run one after another in child processes."""

    kind: str
    commands: list[list[str]]
    cwd: Path
    target: Path | None = None  # the run or output directory it writes
    lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    returncode: int | None = None
    stopped: bool = False
    started: float = field(default_factory=time.time)
    _process: subprocess.Popen | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_all, daemon=True)
        self._thread.start()

    def _run_all(self) -> None:
        code = 0
        for args in self.commands:
            if self.stopped:
                break
            self.lines.append("$ " + command_line(args))
            code = self._run(args)
            if code != 0:
                break
        self.returncode = code if not self.stopped else (code or 130)

    def _run(self, args: list[str]) -> int:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "slimtune", *args], cwd=self.cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        assert self._process.stdout is not None
        buffer = b""
        while chunk := self._process.stdout.read1(4096):
            buffer += chunk
            *done, buffer = re.split(rb"[\r\n]", buffer)
            self.lines.extend(line.decode(errors="replace") for line in done if line.strip())
        if buffer.strip():
            self.lines.append(buffer.decode(errors="replace"))
        return self._process.wait()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> str:
        """running, finished, stopped or failed."""
        if self.running:
            return "running"
        if self.stopped:
            return "stopped"
        return "finished" if self.returncode == 0 else "failed"

    def message(self) -> str:
        """The one line that explains the end: the command's own error line, else the last one."""
        errors = [line for line in self.lines if ERROR_LINE.match(line)]
        if errors:
            return errors[-1]
        if self.returncode not in (None, 0):
            last = self.lines[-1] if self.lines else ""
            return f"the command ended with exit code {self.returncode}: {last}"
        return self.lines[-1] if self.lines else ""

    def stop(self, wait: float = 20.0) -> None:
        """SIGINT (as Ctrl-C), then SIGTERM if the child does not end within `wait` seconds."""
        self.stopped = True
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            process.terminate()


class Jobs:
    """The jobs of one server: at most one running per slot (training, eval, export)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs: dict[str, Job] = {}  # slot -> its latest job
        self.lock = threading.Lock()

    def start(self, kind: str, commands: list[list[str]], target: Path | None = None) -> Job:
        slot = SLOTS[kind]
        with self.lock:
            current = self.jobs.get(slot)
            if current is not None and current.running:
                what = f" ({current.kind} of {current.target.name})" if current.target else ""
                raise SlimtuneError(
                    f"refused, not queued: a {slot} job is already running{what}; one at a "
                    "time — wait for it or stop it, then start again"
                )
            job = Job(kind, commands, self.root, target)
            self.jobs[slot] = job
            job.start()
            return job

    def for_target(self, target: Path) -> Job | None:
        """The latest job writing `target`, if this server started one."""
        found = [job for job in self.jobs.values() if job.target == target]
        return found[-1] if found else None

    def stop_all(self) -> None:
        for job in list(self.jobs.values()):
            job.stop(wait=5.0)
