"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM.

    first signal    the loop finishes the step it is in, writes a checkpoint, and the run
                    ends with `stopped at step N; continue with --resume` (exit 128 + signal)
    second signal   KeyboardInterrupt at once, wherever the loop is; checkpoints are written
                    under a temporary name and renamed, so the last complete one stays valid

Handlers are installed only in the main thread (Python delivers signals there) and only
while the steps run; the previous handlers come back afterwards.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from slimtune.errors import SlimtuneError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """Set by the first signal; the loop reads it after each step."""

    signum: int | None = None


class Stopped(SlimtuneError):
    """The run stopped on a signal after writing a checkpoint; exit code 128 + signal."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"stopped at step {step}; continue with --resume")
        self.exit_code = 128 + signum


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGINT/SIGTERM set the yielded request; a second one interrupts."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame) -> None:
        if request.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now
        request.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
            "(again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def signalled(request: StopRequest | None) -> int | None:
    """The signal that asked this run to stop, agreed by every process of a distributed run."""
    from slimtune.training import distributed

    mine = request.signum if request is not None else None
    if distributed.all_sum(1.0 if mine is not None else 0.0) == 0:
        return None
    return mine or signal.SIGTERM
