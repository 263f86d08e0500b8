"""The comparison report: DIR/report.json, DIR/report.md and its PNG charts.

Every sentence under "What the numbers show" is computed from the measured rows:
a claim of the source notes is stated as supported, not supported, or not measured,
with the numbers that decide it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slimtune.compare.charts import rank_sweep_points

CHARTS = {
    "quality_vs_params.png": "Held-out loss against trainable parameters",
    "memory.png": "Peak training memory",
    "train_speed.png": "Training throughput",
    "latency.png": "Inference latency per generated token",
    "rank_sweep.png": "LoRA rank sweep (full fine-tuning as the ceiling)",
}
NOISE = 0.05  # latency differences below 5% are called measurement noise
NAMES = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "ia3": "IA³"}


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {run["label"]: run for run in report["runs"]}


def _fmt(value: Any, spec: str, empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def table(report: dict[str, Any]) -> str:
    head = ("| run | trainable params | % of model | adapter file | peak train memory | "
            "train tokens/s | held-out loss | exact match | ms/token | ms/token merged | "
            "extra context tokens |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for run in report["runs"]:
        trainable, total = run["trainable_params"], run["total_params"]
        match = run.get("exact_match")
        cells = [
            run["label"],
            f"{trainable:,}",
            f"{100 * trainable / total:.3f}%",
            _size(run.get("adapter_bytes")),
            _fmt(run.get("peak_train_memory_mb"), ",.0f") + (" MB" if run.get("peak_train_memory_mb") else ""),
            _fmt(run.get("train_tokens_per_s"), ",.0f"),
            _fmt(run.get("heldout_loss"), ".3f"),
            "–" if match is None else f"{100 * match:.1f}%",
            _fmt(run.get("ms_per_token"), ".1f"),
            _fmt(run.get("merged_ms_per_token"), ".1f"),
            str(run.get("extra_context_tokens", 0)),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def findings(report: dict[str, Any]) -> list[str]:
    """Sentences about the notes' claims, each decided by the measured numbers."""
    rows, said = _rows(report), []
    base = rows.get("base")
    if base and "adapter" in rows:
        r = _ratio(rows["adapter"]["ms_per_token"], base["ms_per_token"]) - 1
        verdict = "add" if r > NOISE else "did not measurably add"
        said.append(
            f"**Bottleneck adapters {verdict} inference latency**: {rows['adapter']['ms_per_token']:.1f} "
            f"ms per token against {base['ms_per_token']:.1f} ms for the base model ({r:+.0%}); "
            "they cannot be merged into the weights."
        )
    for label in ("lora", "qlora", "dora", "ia3"):
        run = rows.get(label)
        if not base or not run or run.get("merged_ms_per_token") is None:
            continue
        reference = run.get("base_ms_per_token_merged_pass", base["ms_per_token"])
        unmerged = _ratio(run["ms_per_token"], base["ms_per_token"]) - 1
        merged = _ratio(run["merged_ms_per_token"], reference) - 1
        verdict = "adds no latency" if abs(merged) <= NOISE else f"still differs by {merged:+.0%}"
        said.append(
            f"**Merged {NAMES[label]} {verdict}** "
            f"(|Δ| ≤ {NOISE:.0%} counts as noise): {run['merged_ms_per_token']:.1f} ms per token "
            f"merged against {reference:.1f} ms for the base model timed alongside; unmerged "
            f"{run['ms_per_token']:.1f} ms against {base['ms_per_token']:.1f} ms ({unmerged:+.0%})."
        )
    said += _prompt_findings(rows) + _qlora_findings(rows) + _quality_findings(rows, report)
    return said


def _prompt_findings(rows: dict[str, dict[str, Any]]) -> list[str]:
    prompt, lora, base = rows.get("prompt"), rows.get("lora"), rows.get("base")
    if not prompt:
        return []
    said = []
    if lora:
        share = _ratio(prompt["trainable_params"], lora["trainable_params"])
        speed = _ratio(prompt["train_tokens_per_s"], lora["train_tokens_per_s"])
        said.append(
            f"**Prompt tuning backpropagates through the whole model**: it trains "
            f"{prompt['trainable_params']:,} parameters ({share:.1%} of LoRA's) yet trains at "
            f"{prompt['train_tokens_per_s']:,.0f} tokens/s against LoRA's "
            f"{lora['train_tokens_per_s']:,.0f} ({speed:.2f}×) and peaks at "
            f"{prompt['peak_train_memory_mb']:,.0f} MB against {lora['peak_train_memory_mb']:,.0f} MB: "
            "the gradient must pass back through every layer to reach the input embeddings, so "
            "few trainable parameters do not make training cheap."
        )
    if base:
        said.append(
            f"Prompt tuning adds {prompt['extra_context_tokens']} tokens of context to every "
            f"input (generation: {prompt['ms_per_token']:.1f} ms per token, base "
            f"{base['ms_per_token']:.1f} ms)."
        )
    return said


def _qlora_findings(rows: dict[str, dict[str, Any]]) -> list[str]:
    qlora, lora = rows.get("qlora"), rows.get("lora")
    if not qlora or not lora:
        return []
    memory = _ratio(qlora["peak_train_memory_mb"], lora["peak_train_memory_mb"])
    speed = _ratio(qlora["train_tokens_per_s"], lora["train_tokens_per_s"])
    if memory < 1 and speed < 1:
        verdict = "QLoRA trades speed for memory"
    elif memory < 1:
        verdict = "QLoRA saved memory without costing speed here"
    else:
        verdict = "QLoRA did not save memory here"
    return [
        f"**{verdict}**: peak training memory {qlora['peak_train_memory_mb']:,.0f} MB against "
        f"{lora['peak_train_memory_mb']:,.0f} MB for LoRA ({memory - 1:+.0%}), "
        f"{qlora['train_tokens_per_s']:,.0f} against {lora['train_tokens_per_s']:,.0f} training "
        f"tokens/s ({speed:.2f}×); held-out loss {qlora['heldout_loss']:.3f} against "
        f"{lora['heldout_loss']:.3f}."
    ]


def _quality_findings(rows: dict[str, dict[str, Any]], report: dict[str, Any]) -> list[str]:
    said = []
    full = rows.get("full")
    sweep = rank_sweep_points(report)
    if len(sweep) >= 2 and full:
        parts = ", ".join(f"r={r}: {loss:.3f}" for r, loss, _ in sweep)
        gaps = [loss - full["heldout_loss"] for _, loss, _ in sweep]
        trend = "shrinks" if gaps[-1] < gaps[0] else "does not shrink"
        said.append(
            f"**Rank sweep** (held-out loss): {parts}; full fine-tuning {full['heldout_loss']:.3f}. "
            f"The gap to full fine-tuning {trend} from r={sweep[0][0]} to r={sweep[-1][0]} "
            f"({gaps[0]:+.3f} → {gaps[-1]:+.3f})."
        )
    trained = [r for r in rows.values() if r["method"] != "base"]
    if trained:
        best = min(trained, key=lambda r: r["heldout_loss"])
        base = rows.get("base")
        start = f" (base model {base['heldout_loss']:.3f})" if base else ""
        said.append(
            f"Lowest held-out loss: **{best['label']}**, {best['heldout_loss']:.3f}{start}."
        )
    return said


def write_report(report: dict[str, Any], out: Path) -> None:
    from slimtune.atomic import write_json, write_text_atomic
    from slimtune.compare.charts import draw_charts

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    charts = draw_charts(report, out)
    write_text_atomic(out / "report.md", markdown(report, charts))


def _device(report: dict[str, Any]) -> str:
    """Where the runs ran, with the threads and the machine's load (timings are only as good)."""
    runs, timing = report["runs"], report.get("timing", {})
    text = f"`{runs[0].get('device', 'cpu')}`"
    loads = [r["load_average"] for r in runs if r.get("load_average") is not None]
    if runs[0].get("device") == "cpu" and loads:
        cpus, jobs = os.cpu_count() or 1, report["settings"].get("jobs", 1)
        text += (f" (training runs {jobs} at a time with {runs[0].get('threads')} thread(s) each; "
                 f"timings with {timing.get('threads', '?')} thread(s); load average "
                 f"{sum(loads) / len(loads):.1f} during the runs and "
                 f"{timing.get('load_average', float('nan')):.1f} during the timings, on {cpus} "
                 "CPUs: a load above the CPU count means other work shared the machine)")  # fmt: skip
    return text


def markdown(report: dict[str, Any], charts: list[str]) -> str:
    s = report["settings"]
    device = _device(report)
    lrs = ", ".join(f"{m} {lr:g}" for m, lr in s["lr"].items())
    lines = [
        "# slimtune: methods compared",
        "",
        f"Model `{s['model']}`, training data `{s['data']}`, held-out data `{s['eval_data']}`. "
        f"Every method trains {s['max_steps']} steps of {s['batch_size']} rows (max length "
        f"{s['max_length']}) with seed {s['seed']} on {device}; LoRA, QLoRA and DoRA adapt every linear "
        f"layer (all-linear) at rank {s['rank']} (the sweep changes only the rank). Peak learning rates: {lrs}. `base` is the model before training.",
        "",
        "Latency is the time per generated token (greedy, KV cache, batch 1, "
        f"{s['latency_tokens']} tokens), the fastest of 5 rounds in which all models take "
        "turns in one process (merged models in a second pass beside the base model); the "
        "rank-sweep runs are not timed. Training tokens/s is one forward+backward on the same "
        f"batch of {s['batch_size']} training rows, the models taking turns in the same process "
        "(fastest of 3 rounds; report.json also keeps each run's own average as "
        "run_tokens_per_s). Memory on the CPU is the process's resident memory "
        "sampled during training (weights included); on a GPU, PyTorch's peak allocation.",
        "",
        table(report),
        "",
        "## What the numbers show",
        "",
        *[f"- {sentence}" for sentence in findings(report)],
        "",
        "## Charts",
        "",
    ]
    for name in charts:
        lines += [f"### {CHARTS[name]}", "", f"![{CHARTS[name]}]({name})", ""]
    lines += ["Regenerate with `make compare` (raw numbers: [report.json](report.json)).", ""]
    return "\n".join(lines)


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
