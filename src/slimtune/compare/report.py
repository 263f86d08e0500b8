"""The comparison report: DIR/report.json, DIR/report.md and its PNG charts.

The header states the model, the data and the hardware; the table gives each config at its
best learning rate, quality figures as mean (min–max) over seeds; every sentence under
"What the numbers show" is computed from those numbers (findings.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimtune.compare.findings import METRICS, findings, fmt, primary_metric

CHARTS = {
    "quality.png": "Exact match on each held-out split (bars: mean, whiskers: min–max over seeds)",
    "quality_vs_params.png": "Held-out loss against trainable parameters",
    "learning_curves.png": "Learning curves: validation loss per method",
    "lr_sweep.png": "Learning-rate sweep",
    "rank_sweep.png": "LoRA rank sweep (full fine-tuning as the ceiling)",
    "memory.png": "Peak training memory",
    "train_speed.png": "Training throughput",
    "latency.png": "Inference latency per generated token",
}


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _cell(run: dict[str, Any], key: str) -> str:
    return "–" if run.get(key) is None else fmt(run[key], key)


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    hard = any("hard_exact_match" in r for r in report["runs"])
    head = ["run", "lr", "trainable params", "adapter file", "peak train memory", "train tokens/s",
            "validation loss", "held-out loss", "exact match"]  # fmt: skip
    head += ["exact match, new wordings"] if hard else []
    head += ["best step", "ms/token", "ms/token merged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in report["runs"]:
        memory = run.get("peak_train_memory_mb")
        cells = [
            run["label"], _num(run.get("lr"), "g"),
            f"{run['trainable_params']:,} ({100 * run['trainable_params'] / run['total_params']:.2f}%)",
            _size(run.get("adapter_bytes")),
            "–" if memory is None else f"{memory['mean']:,.0f} MB",
            _num(run.get("train_tokens_per_s"), ",.0f"),
            _cell(run, "val_loss"), _cell(run, "heldout_loss"), _cell(run, "exact_match"),
        ]  # fmt: skip
        cells += [_cell(run, "hard_exact_match")] if hard else []
        cells += [_cell(run, "plateau_step"), _num(run.get("ms_per_token"), ".1f"),
                  _num(run.get("merged_ms_per_token"), ".1f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(report: dict[str, Any]) -> str:
    """Validation loss of every config at every lr of the sweep (the first seed)."""
    sweep = report.get("sweep", {})
    lrs = sorted({p["lr"] for points in sweep.values() for p in points})
    if len(lrs) < 2:
        return ""
    lines = [
        "| run | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|" + "---|" * (len(lrs) + 1),
    ]
    for label, points in sweep.items():
        by_lr = {p["lr"]: p for p in points}
        cells = []
        for lr in lrs:
            p = by_lr.get(lr)
            text = (
                ""
                if p is None or p["val_loss"] is None
                else f"{p['val_loss']:.3f} @ {p['plateau_step']}"
            )
            cells.append(
                f"**{text}**" if p and lr == report["best_lr"].get(label) and text else text
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(report: dict[str, Any]) -> list[str]:
    """Model, data, hardware and how each run trained: the facts a reader needs first."""
    s, h = report["settings"], report.get("header", {})
    hw, rows = h.get("hardware", {}), h.get("rows", {})
    where = h.get("device", "cpu")
    machine = f"{hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} CPU cores"
    if hw.get("gpu"):
        machine = f"{hw['gpu']} ({hw.get('gpu_memory_gb', '?')} GB) on {machine}"
    load = h.get("load_average_runs") or {}
    threads = f"; training with {h.get('train_threads', '?')} thread(s) per run, {s['jobs']} run(s) at a time"
    if where == "cpu" and load:
        timing = h.get("load_average_timing") or 0
        threads += (f", load average {load['mean']:.1f} during the runs and {timing:.1f} during "
                    "the timings")  # fmt: skip
        if max(load["mean"], timing) > (hw.get("cpu_count") or 1):
            threads += " (above the core count: other work shared the machine)"
    data = f"training data `{s['data']}` ({rows.get('train', '?')} rows train, {rows.get('validation') or 0} carved out for validation)"
    held = f"held-out `{s['eval_data']}` ({rows.get('heldout', '?')} rows)"
    if s.get("hard_eval_data"):
        held += f" and `{s['hard_eval_data']}` ({rows.get('hard_heldout', '?')} rows, wordings never trained on)"
    stop = (f"until the validation loss has not improved for {s['patience']} evaluation(s) in a row "
            f"(every {s['eval_every']} steps; at most {s['max_steps']} steps)") if s.get("patience") \
        else f"{s['max_steps']} steps"  # fmt: skip
    sweep = (f"the best of the learning rates {', '.join(f'{f:.2g}×' for f in s['lr_factors'])} each "
             "method's default (lowest validation loss, first seed)") if s.get("lr_factors") \
        else "each method's default learning rate"  # fmt: skip
    seeds = f"{s['seeds']} seeds ({s['seed']}…{s['seed'] + s['seeds'] - 1})" if s.get("seeds", 1) > 1 \
        else f"one seed ({s['seed']})"  # fmt: skip
    return [
        f"- **Model**: `{h.get('model', s['model'])}` ({h.get('model_params', 0):,} parameters).",
        f"- **Data**: {data}; {held}.",
        f"- **Hardware**: `{where}`: {machine}; torch {hw.get('torch', '?')}{threads}.",
        f"- **Training**: every method trains {stop} with batches of {s['batch_size']} rows "
        f"(max length {s['max_length']}), at {sweep}, over {seeds}. LoRA, QLoRA and DoRA adapt "
        f"every linear layer at rank {s['rank']} with alpha = 2r (the rank sweep changes only r).",
        f"- **Figures**: quality as mean (min–max) over the seeds; a difference whose ranges "
        "overlap is called no measurable difference. `base` is the model before training. "
        f"Wall time: {h.get('wall_time_s', 0) / 60:.0f} min ({h.get('cpu_s', 0) / 60:.0f} CPU-minutes "
        "in the runs).",
    ]


def markdown(report: dict[str, Any], charts: list[str]) -> str:
    s = report["settings"]
    seeds = "mean (min–max) over seeds" if s.get("seeds", 1) > 1 else "one seed"
    lines = ["# slimtune: methods compared", "", *header(report), "",
             table(report), "", "## What the numbers show", "",
             f"Quality below is decided on {METRICS[primary_metric(report)]} ({seeds}); the sweep "
             "picks each learning rate by validation loss.", "",
             *[f"- {sentence}" for sentence in findings(report)], ""]  # fmt: skip
    sweep = sweep_table(report)
    if sweep:
        lines += ["## Learning-rate sweep", "", "Best validation loss @ the step it was reached, "
                  "first seed; bold: the lr used.", "", sweep, ""]  # fmt: skip
    lines += [
        "## How it was measured", "",
        "Latency is the time per generated token (greedy, KV cache, batch 1, "
        f"{s['latency_tokens']} tokens), the fastest of 5 rounds in which all models take turns "
        "in one process (merged models in a second pass beside the base model); the rank-sweep "
        "runs are not timed. Training tokens/s is one forward+backward on the same batch, the "
        "models taking turns in one process (fastest of 3 rounds). Memory on the CPU is the "
        "process's resident memory sampled during training (weights included); on a GPU, "
        "PyTorch's peak allocation. Exact match: the greedy answer starts with the reference.", "",
        "## Charts", "",
    ]  # fmt: skip
    for name in charts:
        lines += [f"### {CHARTS[name]}", "", f"![{CHARTS[name]}]({name})", ""]
    lines += ["Regenerate with `make compare` (raw numbers: [report.json](report.json)).", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    from slimtune.atomic import write_json, write_text_atomic
    from slimtune.compare.charts import draw_charts

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    charts = draw_charts(report, out)
    write_text_atomic(out / "report.md", markdown(report, charts))


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
