"""`--report-to tensorboard`: the run's metrics as TensorBoard scalars in RUN/tensorboard/.

Every numeric field of a metrics.jsonl record becomes a scalar at the record's step:

    loss, lr, grad_norm, tokens_per_s, tokens, memory_mb  ->  train/<name>
    eval_loss, eval_perplexity                            ->  eval/loss, eval/perplexity
    a name with a slash (rewards/accuracy)                ->  itself

so a new objective's metrics appear without touching this file. Written with
`torch.utils.tensorboard` (the `tensorboard` extra). On `--resume` the writer purges the
events after the checkpoint's step, as metrics.jsonl is cut back to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics field."""
    if "/" in key:
        return key
    if key.startswith("eval_"):
        return f"eval/{key.removeprefix('eval_')}"
    return f"train/{key}"


class TensorBoardLog:
    """A metrics sink writing TensorBoard event files (flushed after every record)."""

    def __init__(self, directory: Path, resumed_at: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SlimtuneError(
                "--report-to tensorboard needs the tensorboard package: "
                "pip install 'slimtune[tensorboard]'"
            ) from None
        purge = resumed_at + 1 if resumed_at else None  # drop events past the checkpoint
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge)

    def append(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def reporters(report_to: str, out: Path, resumed_at: int) -> list[TensorBoardLog]:
    """The sinks `--report-to` asks for ("none": none)."""
    return [TensorBoardLog(out / "tensorboard", resumed_at)] if report_to == "tensorboard" else []
