"""Seeds into figures: mean and spread (min–max) per config, and when two differ measurably.

    spread(values)  = {mean, min, max, n, values}
    same(a, b)      = the min–max ranges overlap: "no measurable difference"

With one seed there is no spread: two single values differ whenever they are not equal,
and the report says that only one seed was run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from slimtune.compare.settings import CompareSettings, configs

# figures measured by every seed's run (mean and spread in the report)
PER_SEED = ("val_loss", "heldout_loss", "exact_match", "hard_heldout_loss", "hard_exact_match",
            "plateau_step", "steps", "peak_train_memory_mb", "run_tokens_per_s")  # fmt: skip
# figures of the configuration itself, the same at every seed
FIXED = ("rank", "lr", "trainable_params", "total_params", "adapter_bytes",
         "extra_context_tokens")  # fmt: skip


def spread(values: list[float | None]) -> dict[str, Any] | None:
    """{mean, min, max, n, values} of the values that were measured; None if none was."""
    found = [float(v) for v in values if v is not None]
    if not found:
        return None
    return {"mean": sum(found) / len(found), "min": min(found), "max": max(found),
            "n": len(found), "values": found}  # fmt: skip


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """No measurable difference: the two min–max ranges overlap."""
    return a["min"] <= b["max"] and b["min"] <= a["max"]


def mean(figure: dict[str, Any] | None) -> float | None:
    return None if figure is None else figure["mean"]


def _row(config: dict[str, Any], mine: list[dict[str, Any]], latency: dict) -> dict[str, Any]:
    first = mine[0]
    row = {"label": config["label"], "method": config["method"]}
    row.update({key: first.get(key) for key in FIXED})
    row["seeds"] = [r["seed"] for r in mine]
    for key in PER_SEED:
        figure = spread([r.get(key) for r in mine])
        if figure is not None:
            row[key] = figure
    row["curves"] = [{"seed": r["seed"], "curve": r["curve"]} for r in mine if r.get("curve")]
    label = config["label"]
    if label in latency.get("train_tokens_per_s", {}):
        row["train_tokens_per_s"] = latency["train_tokens_per_s"][label]
    if label in latency.get("unmerged", {}):
        row["ms_per_token"] = latency["unmerged"][label]
    if label in latency.get("merged", {}) and label != "base":
        row["merged_ms_per_token"] = latency["merged"][label]
        row["base_ms_per_token_merged_pass"] = latency["merged"]["base"]
    return row


def _rows_in(path: str | None) -> int | None:
    if path is None or not Path(path).is_file():
        return None
    return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())


def build_report(
    settings: CompareSettings,
    results: list[dict[str, Any]],
    chosen: dict[str, float],
    latency: dict[str, Any],
) -> dict[str, Any]:
    """report.json: settings, header (model, data, hardware), the lr sweep, one row per config."""
    rows, sweep = [], {}
    for config in configs(settings):
        label = config["label"]
        at_best = [r for r in results if r["label"] == label
                   and (config["method"] == "base" or r["lr"] == chosen[label])]  # fmt: skip
        rows.append(_row(config, sorted(at_best, key=lambda r: r["seed"]), latency))
        if config["method"] != "base":
            tried = [r for r in results if r["label"] == label and r["seed"] == settings.seed]
            sweep[label] = [
                {key: r.get(key) for key in ("lr", "val_loss", "plateau_step", "steps", "curve")}
                for r in sorted(tried, key=lambda r: r["lr"])
            ]
    base = next(r for r in rows if r["method"] == "base")
    header = {
        "model": settings.model,
        "model_params": base["total_params"],
        "device": latency.get("device", "cpu"),
        "hardware": latency.get("hardware", {}),
        "rows": {
            "train": _rows_in(settings.data),
            "validation": _rows_in(settings.val_data),
            "heldout": _rows_in(settings.eval_data),
            "hard_heldout": _rows_in(settings.hard_eval_data),
        },  # fmt: skip
        "threads": latency.get("threads"),
        "load_average_timing": latency.get("load_average"),
        "load_average_runs": spread([r.get("load_average") for r in results]),
        "train_threads": results[0].get("threads"),
        "cpu_s": sum(r.get("cpu_s") or 0 for r in results),  # every run's CPU seconds
    }
    report_settings = dataclasses.asdict(settings)
    report_settings["lr"] = {m: settings.base_lr(m) for m in settings.methods}
    return {"settings": report_settings, "header": header, "best_lr": chosen, "sweep": sweep,
            "runs": rows}  # fmt: skip
