"""The comparison report's PNG charts (matplotlib, headless).

Points are told apart by a legend (colour and marker per run), never by labels placed
beside them, so close points cannot make labels collide. Whiskers are min–max over seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MARKERS = "osD^vP*XhH<>"
AXIS = {"hard_exact_match": "exact match, new wordings (%)", "exact_match": "exact match (%)",
        "heldout_loss": "held-out loss"}  # fmt: skip


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)


def _style(i: int) -> dict[str, Any]:
    return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]}


def _plain_log(ax, axis: str = "y") -> None:
    """A log axis labelled 0.05, 0.1, 0.2, 0.5, 1, 2 … instead of 5×10⁻², 10⁻¹ …"""
    from matplotlib import ticker

    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    target.set_major_formatter(plain)
    target.set_minor_locator(ticker.LogLocator(subs=(2, 5)))
    target.set_minor_formatter(plain)


def _whiskers(figures: list[dict[str, Any]], scale: float = 1.0) -> list[list[float]]:
    """yerr for matplotlib: [[mean - min …], [max - mean …]]."""
    return [[scale * (f["mean"] - f["min"]) for f in figures],
            [scale * (f["max"] - f["mean"]) for f in figures]]  # fmt: skip


def _bars(runs: list[dict[str, Any]], key: str, ylabel: str, title: str, path: Path) -> bool:
    def value(r: dict[str, Any]) -> float | None:
        v = r.get(key)
        return v["mean"] if isinstance(v, dict) else v

    points = [(r["label"], value(r)) for r in runs if value(r) is not None]
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


def quality(runs: list[dict[str, Any]], path: Path) -> bool:
    """Exact match per run on each held-out split, mean bars with min–max whiskers."""
    import numpy as np

    splits = [(k, name) for k, name in (("exact_match", "held-out"),
              ("hard_exact_match", "held-out, new wordings")) if any(k in r for r in runs)]  # fmt: skip
    shown = [r for r in runs if any(k in r for k, _ in splits)]
    if not shown:
        return False
    fig, ax = _plt().subplots(figsize=(8, 3.8), dpi=100)
    x, width = np.arange(len(shown)), 0.8 / len(splits)
    for i, (key, name) in enumerate(splits):
        figures = [r.get(key) or {"mean": 0, "min": 0, "max": 0} for r in shown]
        ax.bar(x + (i - (len(splits) - 1) / 2) * width, [100 * f["mean"] for f in figures],
               width, yerr=_whiskers(figures, 100), capsize=3, label=name, color=f"C{i}")  # fmt: skip
    ax.set_xticks(x, [r["label"] for r in shown], rotation=30)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Exact match (mean, min–max over seeds)")
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, path)
    return True


def quality_vs_params(runs: list[dict[str, Any]], path: Path) -> bool:
    trained = [r for r in runs if r["trainable_params"] > 0 and r.get("heldout_loss")]
    if not trained:
        return False
    fig, ax = _plt().subplots(figsize=(7.5, 4), dpi=100)
    for i, r in enumerate(trained):
        loss = r["heldout_loss"]
        ax.errorbar([r["trainable_params"]], [loss["mean"]], yerr=_whiskers([loss]), capsize=3,
                    linestyle="none", markersize=7, label=r["label"], **_style(i))  # fmt: skip
    base = next((r for r in runs if r["method"] == "base" and r.get("heldout_loss")), None)
    if base:
        ax.axhline(base["heldout_loss"]["mean"], color="grey", linestyle=":", label="base model")
    ax.set_xscale("log")
    _plain_log(ax)
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("held-out loss (log; lower is better)")
    ax.set_title("Quality against trainable parameters")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
    return True


def learning_curves(report: dict[str, Any], path: Path) -> bool:
    """One panel per run: validation loss against step, each seed at the chosen lr (solid)
    and the other lrs of the sweep (dashed), the stopping points marked."""
    runs = [r for r in report["runs"] if r.get("curves")]
    if not runs:
        return False
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    plt = _plt()
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), dpi=100, squeeze=False)
    for ax, run in zip(axes.flat, runs, strict=False):
        for point in report.get("sweep", {}).get(run["label"], []):
            if point["lr"] != run["lr"] and point.get("curve"):
                steps, losses = zip(*point["curve"], strict=True)
                ax.plot(steps, losses, linestyle="--", linewidth=1, label=f"lr {point['lr']:g}")
        for i, c in enumerate(run["curves"]):
            steps, losses = zip(*c["curve"], strict=True)
            ax.plot(steps, losses, color="black", linewidth=1.3,
                    label=f"lr {run['lr']:g} (used)" if i == 0 else None)  # fmt: skip
            ax.plot(steps[-1], losses[-1], marker="x", color="black")
        ax.set_title(run["label"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("validation loss", fontsize=8)
    _save(fig, path)
    return True


def lr_sweep(report: dict[str, Any], path: Path) -> bool:
    sweep = {k: v for k, v in report.get("sweep", {}).items() if len(v) > 1}
    if not sweep:
        return False
    fig, ax = _plt().subplots(figsize=(7.5, 4), dpi=100)
    for i, (label, points) in enumerate(sweep.items()):
        done = [p for p in points if p["val_loss"] is not None]
        ax.plot([p["lr"] for p in done], [p["val_loss"] for p in done], label=label, **_style(i))
    ax.set_xscale("log")
    _plain_log(ax)
    ax.set_xlabel("peak learning rate (log)")
    ax.set_ylabel("best validation loss (log)")
    ax.set_title("Learning-rate sweep (first seed)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
    return True


def rank_sweep_points(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every LoRA run, by rank."""
    return sorted((r for r in report["runs"] if r["method"] == "lora" and r.get("rank")),
                  key=lambda r: r["rank"])  # fmt: skip


def rank_sweep(report: dict[str, Any], path: Path) -> bool:
    sweep = rank_sweep_points(report)
    keys = [
        k for k in ("hard_exact_match", "exact_match", "heldout_loss") if all(k in r for r in sweep)
    ]
    if len(sweep) < 2 or not keys:
        return False
    runs = {r["label"]: r for r in report["runs"]}
    fig, axes = _plt().subplots(1, len(keys), figsize=(4 * len(keys), 3.6), dpi=100, squeeze=False)
    ranks = [r["rank"] for r in sweep]
    for ax, key in zip(axes[0], keys, strict=True):
        scale = 100 if "exact" in key else 1
        figures = [r[key] for r in sweep]
        ax.errorbar(ranks, [scale * f["mean"] for f in figures], yerr=_whiskers(figures, scale),
                    marker="o", capsize=3, label="LoRA")  # fmt: skip
        for label, style in (("full", dict(color="#c44e52", linestyle="--")),
                             ("base", dict(color="grey", linestyle=":"))):  # fmt: skip
            if label in runs and key in runs[label]:
                ax.axhline(scale * runs[label][key]["mean"], label=f"{label}", **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel(AXIS[key])
        if scale == 100:
            ax.set_ylim(-2, 102)
        ax.legend(fontsize=7)
    fig.suptitle("LoRA rank sweep (mean, min–max over seeds)", fontsize=10)
    _save(fig, path)
    return True


def latency(runs: list[dict[str, Any]], path: Path) -> bool:
    import numpy as np

    runs = [r for r in runs if r.get("ms_per_token") is not None]
    if not runs:
        return False
    fig, ax = _plt().subplots(figsize=(7, 3.6), dpi=100)
    x = np.arange(len(runs))
    ax.bar(x - 0.2, [r["ms_per_token"] for r in runs], 0.4, label="as trained (unmerged)",
           color="#4c72b0")  # fmt: skip
    ax.bar(x + 0.2, [r.get("merged_ms_per_token") or 0 for r in runs], 0.4, label="merged",
           color="#55a868")  # fmt: skip
    base = next((r for r in runs if r["method"] == "base"), None)
    if base:
        ax.axhline(base["ms_per_token"], color="grey", linestyle=":", label="base model")
    ax.set_xticks(x, [r["label"] for r in runs], rotation=30)
    ax.set_ylabel("ms per generated token")
    ax.set_title("Inference latency (batch 1, KV cache)")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def draw_charts(report: dict[str, Any], out: Path) -> list[str]:
    """Write the charts into `out`; return the file names drawn."""
    runs = report["runs"]
    trained = [r for r in runs if r["method"] != "base"]
    drawn = {
        "quality.png": quality(runs, out / "quality.png"),
        "quality_vs_params.png": quality_vs_params(runs, out / "quality_vs_params.png"),
        "learning_curves.png": learning_curves(report, out / "learning_curves.png"),
        "lr_sweep.png": lr_sweep(report, out / "lr_sweep.png"),
        "rank_sweep.png": rank_sweep(report, out / "rank_sweep.png"),
        "memory.png": _bars(trained, "peak_train_memory_mb", "MB (mean over seeds)",
                            "Peak training memory", out / "memory.png"),
        "train_speed.png": _bars(trained, "train_tokens_per_s", "tokens / s",
                                 "Training throughput", out / "train_speed.png"),
        "latency.png": latency(runs, out / "latency.png"),
    }  # fmt: skip
    return [name for name, done in drawn.items() if done]
