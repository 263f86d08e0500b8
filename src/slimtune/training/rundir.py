"""The run directory, and the rule that keeps a user's files safe.

    RUN/adapter/  RUN/checkpoints/  RUN/metrics.jsonl  RUN/loss.png  RUN/summary.json
    RUN/config.yaml

A run starts in a directory that is missing or empty; with `overwrite`, also in an earlier
run's directory (its config.yaml is one a run wrote), where only the run files above are
replaced, or in a directory that holds none of those names, where they are added beside the
files already there. Nothing else is ever deleted. A run that fails before its first
checkpoint removes what it wrote (and the directories it made); a later failure keeps the
checkpoints for `--resume`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.training.checkpoints import latest_checkpoint
from slimtune.training.run_lock import check_unlocked

RUN_FILES = ("adapter", "checkpoints", "metrics.jsonl", "loss.png", "summary.json", "config.yaml")
# keys every RUN/config.yaml has (TrainConfig's), and a user's own config.yaml hardly all of
MARKS = ("max_steps", "batch_size", "lr", "loss_chunk", "keep_checkpoints", "log_every")


def is_run_dir(out: Path) -> bool:
    """True when `out/config.yaml` is one that a run wrote."""
    import yaml

    try:
        config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and all(key in config for key in MARKS)


def check_run_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """Refuse an output that would lose a user's files; return the run directory."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SlimtuneError(f"output {out} exists and is not a directory")
    check_unlocked(out)  # another live process writing it is named; a dead one's lock goes
    if resume and overwrite:
        raise SlimtuneError("--resume continues a run and --overwrite replaces it: give one")
    if resume:
        if not (out / "checkpoints").is_dir():
            raise SlimtuneError(f"--resume: {out} holds no run (no {out / 'checkpoints'})")
        latest_checkpoint(out)
        return out
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise SlimtuneError(
            f"output directory {out} exists and is not empty: use --resume to continue it "
            "or --overwrite to replace it"
        )
    taken = [name for name in RUN_FILES if (out / name).exists()]
    if taken and not is_run_dir(out):
        raise SlimtuneError(
            f"output directory {out} holds {taken[0]}, which no slimtune run wrote: "
            "--overwrite replaces only a run's own files; choose another --out"
        )
    return out


def clear_run(out: Path) -> None:
    """Delete an earlier run's own files in `out` (check_run_dir said they are a run's)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def has_checkpoint(out: Path) -> bool:
    return any((out / "checkpoints").glob("step-*"))


@contextmanager
def removed_on_failure(out: Path, keep: bool) -> Iterator[None]:
    """Remove the run files (and the directories made for them) if the block fails, unless
    `keep` (a resumed run) or a checkpoint was written."""
    made = [p for p in (out.absolute(), *out.absolute().parents) if not os.path.lexists(p)]
    try:
        yield
    except BaseException:
        if not keep and not has_checkpoint(out):
            clear_run(out)
            for directory in made:  # deepest first; only those left empty
                try:
                    directory.rmdir()
                except OSError:
                    break
        raise
