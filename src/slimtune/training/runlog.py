"""What a run writes besides weights: metrics.jsonl, loss.png, summary.json, config.yaml.

Every file is written under a temporary name and renamed into place, except
metrics.jsonl, which grows a line at a time and is cut back to the checkpoint's
step when a run resumes (so a resumed run's log reads like an uninterrupted one).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from slimtune.atomic import write_text_atomic
from slimtune.errors import SlimtuneError


class Sink(Protocol):
    """Somewhere else a record goes (tensorboard.py's TensorBoardLog)."""

    def append(self, record: dict[str, Any]) -> None: ...


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per logged step (and per evaluation).

    Every record also goes to each of `sinks` (`--report-to tensorboard`). An objective
    logs extra scalars by putting them in its records: `{"step": 3, "rewards/margin": …}`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sinks: list[Sink] = []

    def append(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk: one line naming the file (--resume cuts it back)
            raise SlimtuneError(f"cannot write {self.path} ({exc.strerror or exc})") from None
        for sink in self.sinks:
            sink.append(record)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                break
        return out

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps <= step (resuming from that step's checkpoint)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """RUN/loss.png: training loss per step and evaluation loss where evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".loss.tmp-", suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
