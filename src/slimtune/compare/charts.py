"""The comparison report's PNG charts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)


def _bars(runs: list[dict[str, Any]], key: str, ylabel: str, title: str, path: Path) -> bool:
    points = [(r["label"], r[key]) for r in runs if r.get(key) is not None]
    if not points:
        return False
    fig, ax = _plt().subplots(figsize=(7, 3.6), dpi=100)
    labels, values = zip(*points, strict=True)
    ax.bar(labels, values, color="#4c72b0")
    for i, v in enumerate(values):
        ax.annotate(f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    _save(fig, path)
    return True


def quality_vs_params(runs: list[dict[str, Any]], path: Path) -> bool:
    trained = [r for r in runs if r["trainable_params"] > 0]
    if not trained:
        return False
    fig, ax = _plt().subplots(figsize=(7, 4), dpi=100)
    for r in trained:
        ax.scatter(r["trainable_params"], r["heldout_loss"], s=30)
        match = r.get("exact_match")
        note = f"{r['label']}" + ("" if match is None else f" ({100 * match:.0f}% EM)")
        ax.annotate(note, (r["trainable_params"], r["heldout_loss"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    base = next((r for r in runs if r["method"] == "base"), None)
    if base:
        ax.axhline(base["heldout_loss"], color="grey", linestyle=":", label="base model")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("held-out loss (lower is better)")
    ax.set_title("Quality against trainable parameters")
    _save(fig, path)
    return True


def latency(runs: list[dict[str, Any]], path: Path) -> bool:
    import numpy as np

    runs = [r for r in runs if r.get("ms_per_token") is not None]
    if not runs:
        return False
    fig, ax = _plt().subplots(figsize=(7, 3.6), dpi=100)
    labels = [r["label"] for r in runs]
    x = np.arange(len(runs))
    unmerged = [r["ms_per_token"] for r in runs]
    merged = [r.get("merged_ms_per_token") or 0 for r in runs]
    ax.bar(x - 0.2, unmerged, 0.4, label="as trained (unmerged)", color="#4c72b0")
    ax.bar(x + 0.2, merged, 0.4, label="merged", color="#55a868")
    base = next((r for r in runs if r["method"] == "base"), None)
    if base:
        ax.axhline(base["ms_per_token"], color="grey", linestyle=":", label="base model")
    ax.set_xticks(x, labels, rotation=30)
    ax.set_ylabel("ms per generated token")
    ax.set_title("Inference latency (batch 1, KV cache)")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def rank_sweep_points(report: dict[str, Any]) -> list[tuple[int, float, float | None]]:
    """(rank, held-out loss, exact match) of every LoRA run, by rank."""
    points = [
        (run["rank"], run["heldout_loss"], run.get("exact_match"))
        for run in report["runs"]
        if run["method"] == "lora" and run.get("rank")
    ]
    return sorted(points)


def rank_sweep(report: dict[str, Any], path: Path) -> bool:

    sweep = rank_sweep_points(report)
    if len(sweep) < 2:
        return False
    runs = {r["label"]: r for r in report["runs"]}
    fig, ax = _plt().subplots(figsize=(6, 3.8), dpi=100)
    ranks, losses = [p[0] for p in sweep], [p[1] for p in sweep]
    ax.plot(ranks, losses, marker="o", label="LoRA")
    if "full" in runs:
        ax.axhline(runs["full"]["heldout_loss"], color="#c44e52", linestyle="--",
                   label="full fine-tuning (ceiling)")  # fmt: skip
    if "base" in runs:
        ax.axhline(runs["base"]["heldout_loss"], color="grey", linestyle=":", label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("held-out loss")
    ax.set_title("Held-out loss against LoRA rank")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def draw_charts(report: dict[str, Any], out: Path) -> list[str]:
    """Write the charts into `out`; return the file names drawn."""
    runs = report["runs"]
    trained = [r for r in runs if r["method"] != "base"]
    drawn = {
        "quality_vs_params.png": quality_vs_params(runs, out / "quality_vs_params.png"),
        "memory.png": _bars(trained, "peak_train_memory_mb", "MB",
                            "Peak training memory", out / "memory.png"),
        "train_speed.png": _bars(trained, "train_tokens_per_s", "tokens / s",
                                 "Training throughput", out / "train_speed.png"),
        "latency.png": latency(runs, out / "latency.png"),
        "rank_sweep.png": rank_sweep(report, out / "rank_sweep.png"),
    }  # fmt: skip
    return [name for name, done in drawn.items() if done]
