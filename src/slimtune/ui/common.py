"""What every tab shares: the server's context, error display, live run views, uploads.

Errors reach the page as one line in the tab's status box, never as a traceback:
a SlimtuneError is shown as the command line would print it; anything else is a bug,
logged with its traceback on the server's terminal and summarised in one line.
"""

from __future__ import annotations

import functools
import html
import inspect
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.ui.chat import ModelCache
from slimtune.ui.jobs import Job, Jobs
from slimtune.ui.paths import Root

SCAN_TTL_S = 3.0


@dataclass
class Context:
    """One server: its root, its child jobs, its loaded chat models."""

    root: Root
    max_upload_mb: int = 100
    jobs: Jobs = field(init=False)
    models: ModelCache = field(default_factory=ModelCache)
    _scan: tuple[float, dict] = (0.0, {})

    def __post_init__(self) -> None:
        self.jobs = Jobs(self.root.path)

    def scan(self, fresh: bool = False) -> dict[str, list[str]]:
        """What the root holds (cached for a few seconds)."""
        when, found = self._scan
        if fresh or time.monotonic() - when > SCAN_TTL_S:
            found = self.root.scan()
            self._scan = (time.monotonic(), found)
        return found


def note(text: str, kind: str = "info") -> str:
    """A status line as HTML (escaped)."""
    return f'<div class="st-status st-{kind}">{html.escape(text)}</div>'


def error_note(exc: BaseException) -> str:
    if isinstance(exc, SlimtuneError):
        return note(f"error: {exc}", "error")
    traceback.print_exception(exc, file=sys.stderr)
    first = (str(exc).splitlines() or [""])[0][:300]
    return note(
        f"internal error ({type(exc).__name__}: {first}); the server log has details", "error"
    )


def guarded(status):
    """Decorate a handler returning (or yielding) {component: value}: errors go to `status`."""

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:
                    yield {status: error_note(exc)}

            return gen

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                return {status: error_note(exc)}

        return call

    return wrap


def job_note(job: Job) -> str:
    state = job.status()
    kind = {"failed": "error", "stopped": "warn"}.get(state, "info")
    text = job.message() if state != "running" else (job.lines[-1] if job.lines else "starting")
    return note(f"{job.kind} {state}: {text}", kind)


def wait_for(job: Job, status, every: float = 0.5):
    """Yield the job's status line until it ends (the last yield is its final state)."""
    while job.running:
        yield {status: job_note(job)}
        time.sleep(every)
    yield {status: job_note(job)}


def upload_dir() -> Path:
    """Where Gradio keeps uploaded files (only files from there are taken as uploads)."""
    base = os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")
    return Path(base).resolve()


def take_upload(ctx: Context, uploaded: str, suffixes: tuple[str, ...]) -> Path:
    """Copy an uploaded data file into ROOT/uploads/ (size and type checked, rows checked)."""
    from slimtune.training.readers import read_source

    source = Path(uploaded).resolve()
    if not source.is_relative_to(upload_dir()) or not source.is_file():
        raise SlimtuneError("upload refused: not a file the server received")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(uploaded).name).lstrip(".") or "upload"
    if not name.endswith(suffixes):
        raise SlimtuneError(f"upload {name}: give a {' or '.join(suffixes)} file")
    size = source.stat().st_size
    if size > ctx.max_upload_mb * 2**20:
        raise SlimtuneError(f"upload {name}: {size / 2**20:.1f} MB is over {ctx.max_upload_mb} MB")
    folder = ctx.root.path / "uploads"
    folder.mkdir(exist_ok=True)
    target, n = folder / name, 1
    while target.exists():
        target, n = folder / f"{Path(name).stem}-{n}{Path(name).suffix}", n + 1
    tmp = folder / f".part-{target.name}"  # keeps the suffix the readers go by
    shutil.copyfile(source, tmp)
    try:
        if target.suffix != ".txt":
            read_source(tmp)
        os.replace(tmp, target)
    except SlimtuneError as exc:
        raise SlimtuneError(str(exc).replace(str(tmp), f"upload {name}")) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def run_view(ctx: Context, run_text: str | None):
    """(progress line, chart SVG, last output lines) of a run directory."""
    from slimtune.ui.runs import loss_chart, progress, progress_line

    if not run_text:
        return "no run yet: start one, or open one in the Runs tab", loss_chart([]), ""
    run = ctx.root.resolve(run_text, "run")
    job = ctx.jobs.for_target(run)
    info = progress(run, job)
    lines = "\n".join(list(job.lines)[-15:]) if job else ""
    if job is not None and job.status() == "failed":
        lines = job.message() + "\n\n" + lines
    return progress_line(info), loss_chart(info["records"]), lines


def base_of(ctx: Context, adapter_text: str | None) -> str | None:
    """The model an adapter was trained on, as its run recorded it (None when unknown)."""
    from slimtune.ui.runs import read_config

    if not adapter_text:
        return None
    try:
        run = ctx.root.resolve(adapter_text, "adapter").parent
        model = read_config(run).get("model")
        return ctx.root.relative(Path(ctx.root.model(str(model)))) if model else None
    except (SlimtuneError, OSError):
        return None
