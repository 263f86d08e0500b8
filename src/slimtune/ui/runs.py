"""Run directories as the page shows them: status, progress, ETA and the loss curve.

Everything comes from the files a run writes (config.yaml, metrics.jsonl, checkpoints/,
summary.json), so runs started from the command line show up and can be watched too:

    progress = step / max_steps
    ETA      = (max_steps - step) · (tokens / step) / tokens_per_s     (the latest rate)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from slimtune.ui.jobs import Job

RECENT_S = 60  # a metrics file written this recently belongs to a run still going


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """RUN/metrics.jsonl's records (a line cut by a kill ends the list)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def read_config(run: Path) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def checkpoint_steps(run: Path) -> list[int]:
    found = (p.name.removeprefix("step-") for p in (run / "checkpoints").glob("step-*"))
    return sorted(int(s) for s in found if s.isdigit())


def run_status(run: Path, job: Job | None) -> str:
    """running, finished, failed, stopped (resumable or not) or incomplete."""
    if job is not None and job.running:
        return "running"
    if (run / "summary.json").is_file():
        return "finished"
    metrics = run / "metrics.jsonl"
    if job is None and metrics.is_file() and time.time() - metrics.stat().st_mtime < RECENT_S:
        return "running (outside the app)"
    steps = checkpoint_steps(run)
    resumable = f"checkpoint at step {steps[-1]}, resumable" if steps else "no checkpoint yet"
    if job is not None and job.status() == "failed":
        return f"failed ({resumable})"
    return f"stopped ({resumable})"


def progress(run: Path, job: Job | None = None) -> dict[str, Any]:
    """Step, loss, eval loss, tokens/s, ETA and status of a run."""
    records = read_metrics(run)
    config = read_config(run)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    last = train[-1] if train else {}
    step, total = last.get("step", 0), config.get("max_steps")
    rate = last.get("tokens_per_s") or 0.0
    eta = None
    if step and total and rate and last.get("tokens"):
        eta = (total - step) * (last["tokens"] / step) / rate
    return {
        "run": run,
        "status": run_status(run, job),
        "method": config.get("method", ""),
        "model": config.get("model", ""),
        "step": step,
        "max_steps": total,
        "loss": last.get("loss"),
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_per_s": rate,
        "eta_s": eta,
        "records": records,
    }


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def progress_line(info: dict[str, Any]) -> str:
    """One line of text: status, step, losses, speed and time left."""
    total = info["max_steps"] or "?"
    eta = info["eta_s"]
    left = "–" if eta is None else f"{int(eta // 60)}:{int(eta % 60):02d}"
    return (
        f"**{info['status']}** · step {info['step']}/{total} · loss {_number(info['loss'])} · "
        f"eval loss {_number(info['eval_loss'])} · {info['tokens_per_s']:,.0f} tokens/s · "
        f"ETA {left}"
    )


def loss_chart(records: list[dict[str, Any]], width: int = 640, height: int = 260) -> str:
    """The loss curve as inline SVG: train loss (line) and eval loss (dots) against step."""
    train = [(r["step"], float(r["loss"])) for r in records if "loss" in r]
    evals = [(r["step"], float(r["eval_loss"])) for r in records if "eval_loss" in r]
    points = train + evals
    pad = 40
    frame = (
        f'<svg class="loss-chart" data-train-points="{len(train)}" data-eval-points="{len(evals)}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="loss curve">'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white" stroke="#ddd"/>'
    )
    if not points:
        note = "no loss logged yet"
        return frame + f'<text x="{pad}" y="{height // 2}" fill="#888">{note}</text></svg>'
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(losses), max(losses)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = pad + (step - x0) / (x1 - x0) * (width - 2 * pad)
        y = height - pad - (loss - y0) / (y1 - y0) * (height - 2 * pad)
        return round(x, 1), round(y, 1)

    parts = [frame]
    for value in (y0, y1):
        _, y = xy(x0, value)
        parts.append(f'<text x="2" y="{y + 4}" font-size="11" fill="#555">{value:.3f}</text>')
    parts.append(f'<text x="{pad}" y="{height - 8}" font-size="11" fill="#555">step {x0}</text>')
    parts.append(
        f'<text x="{width - pad - 50}" y="{height - 8}" font-size="11" fill="#555">step {x1}</text>'
    )
    if train:
        line = " ".join(f"{x},{y}" for x, y in (xy(s, v) for s, v in train))
        parts.append(f'<polyline points="{line}" fill="none" stroke="#2563eb" stroke-width="2"/>')
        parts += [f'<circle class="train-point" cx="{x}" cy="{y}" r="2.5" fill="#2563eb"/>'
                  for x, y in (xy(s, v) for s, v in train)]  # fmt: skip
    parts += [f'<circle class="eval-point" cx="{x}" cy="{y}" r="4" fill="#ea580c"/>'
              for x, y in (xy(s, v) for s, v in evals)]  # fmt: skip
    legend = '<tspan fill="#2563eb">— train loss</tspan>  <tspan fill="#ea580c">● eval loss</tspan>'
    parts.append(f'<text x="{width - 200}" y="16" font-size="12">{legend}</text></svg>')
    return "".join(parts)


def runs_table(root_path: Path, runs: list[str], jobs_for) -> list[list[str]]:
    """Rows of the Runs tab: run, status, method, model, step, loss."""
    rows = []
    for rel in runs:
        info = progress(root_path / rel, jobs_for(root_path / rel))
        model = str(info["model"])
        rows.append([
            rel, info["status"], str(info["method"]), Path(model).name or model,
            f"{info['step']}/{info['max_steps'] or '?'}", _number(info["loss"]),
        ])  # fmt: skip
    return rows
