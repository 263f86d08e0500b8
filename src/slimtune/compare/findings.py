"""The report's sentences: each answers one question of the source notes from the numbers.

    Does r=1/2 suffice, and at which step budget?   Does LoRA reach full fine-tuning?
    Does QLoRA lose quality against LoRA, and how much memory does it save?
    What latency do adapters add?   What does prompt tuning cost for its parameter count?

A quality difference counts only when the min–max ranges over seeds do not overlap
(stats.same); otherwise the sentence says "no measurable difference". Latency is timed
once per model (fastest of several interleaved rounds): differences below NOISE are noise.
"""

from __future__ import annotations

from typing import Any

from slimtune.compare.stats import same

NOISE = 0.05  # latency differences below 5% are called measurement noise
NAMES = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "ia3": "IA³", "prompt": "prompt tuning",
         "adapter": "bottleneck adapters", "full": "full fine-tuning", "base": "the base model"}  # fmt: skip
METRICS = {"hard_exact_match": "exact match on the held-out split with new wordings",
           "exact_match": "held-out exact match", "heldout_loss": "held-out loss"}  # fmt: skip


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {run["label"]: run for run in report["runs"]}


def primary_metric(report: dict[str, Any]) -> str:
    """The quality figure the sentences decide on: the hardest exact match measured."""
    for key in ("hard_exact_match", "exact_match"):
        if any(run.get(key) for run in report["runs"] if run["method"] != "base"):
            return key
    return "heldout_loss"


def _higher_is_better(key: str) -> bool:
    return "exact_match" in key


def fmt(figure: dict[str, Any], key: str) -> str:
    """'90% (85–95%)' or '0.123 (0.110–0.130)'; one seed: the value alone."""
    if "exact_match" in key:
        one = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    elif key in ("plateau_step", "steps"):
        one = lambda v: f"{v:.0f}"  # noqa: E731
    else:
        one = lambda v: f"{v:.3f}"  # noqa: E731
    if figure["n"] == 1 or figure["min"] == figure["max"]:
        return one(figure["mean"])
    low = one(figure["min"]).rstrip("%")  # 81% (75–88%)
    return f"{one(figure['mean'])} ({low}–{one(figure['max'])})"


def verdict(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    """'same', 'better' or 'worse': a against b, by min–max overlap over seeds."""
    if (a["n"] > 1 or b["n"] > 1) and same(a, b):
        return "same"
    if a["mean"] == b["mean"]:
        return "same"
    return "better" if (a["mean"] > b["mean"]) == _higher_is_better(key) else "worse"


def _gap(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    if "exact_match" in key:
        return f"{100 * (a['mean'] - b['mean']):+.0f} points"
    return f"{a['mean'] - b['mean']:+.3f}"


def _against(a: dict, b: dict, key: str, b_name: str) -> str:
    """'{metric} X against Y for B: no measurable difference' (or the gap)."""
    said = f"{METRICS[key]} {fmt(a[key], key)} against {fmt(b[key], key)} for {b_name}"
    if verdict(a[key], b[key], key) == "same":
        return said + ": no measurable difference"
    spread = "" if a[key]["n"] > 1 or b[key]["n"] > 1 else ", one seed, so no spread measured"
    return said + f" ({_gap(a[key], b[key], key)}{spread})"


def _seeds_note(report: dict[str, Any]) -> str:
    n = report["settings"].get("seeds", 1)
    return f"mean (min–max) over {n} seeds" if n > 1 else "one seed"


def _val_at(run: dict[str, Any], step: int) -> float | None:
    """Mean validation loss over seeds at `step`, from the learning curves."""
    found = [v for c in run.get("curves", []) for s, v in c["curve"] if s == step]
    return sum(found) / len(found) if found else None


def rank_findings(report: dict[str, Any]) -> list[str]:
    """Does r=1 / r=2 suffice, and after how many steps?"""
    key = primary_metric(report)
    lora = sorted((r for r in report["runs"] if r["method"] == "lora" and r.get(key)),
                  key=lambda r: r["rank"])  # fmt: skip
    if len(lora) < 2:
        return []
    sign = 1 if _higher_is_better(key) else -1
    best = max(lora, key=lambda r: sign * r[key]["mean"])
    said = []
    for run in lora:
        if run["rank"] not in (1, 2) or run is best:
            continue
        ok = verdict(run[key], best[key], key) != "worse"
        best_name = f"r={best['rank']}, the best rank"
        text = (f"**LoRA at r={run['rank']} {'suffices' if ok else 'does not suffice'} on this "
                f"task**: {_against(run, best, key, best_name)}.")  # fmt: skip
        if run.get("plateau_step") and best.get("plateau_step"):
            text += (f" Its validation loss bottoms out at step {fmt(run['plateau_step'], 'steps')}"
                     f" (r={best['rank']}: step {fmt(best['plateau_step'], 'steps')})")  # fmt: skip
            first = run["curves"][0]["curve"][0][0] if run.get("curves") else None
            mine, theirs = _val_at(run, first), _val_at(best, first)
            if mine is not None and theirs is not None:
                text += f"; after {first} steps its validation loss stood at {mine:.3f} against {theirs:.3f}"
                if mine > theirs * 1.05:  # more than 5% behind: a short budget misjudges it
                    text += ", so a budget that short understates it"
            text += "."
        said.append(text)
    return said


def lora_vs_full(report: dict[str, Any]) -> list[str]:
    rows, key = _rows(report), primary_metric(report)
    lora, full = rows.get("lora"), rows.get("full")
    if not lora or not full or key not in lora or key not in full:
        return []
    v = verdict(lora[key], full[key], key)
    head = {"same": "reaches", "better": "beats", "worse": "falls short of"}[v]
    text = f"**LoRA (r={lora['rank']}) {head} full fine-tuning**: {_against(lora, full, key, 'full fine-tuning')}"
    if "heldout_loss" in lora and "heldout_loss" in full:
        text += f"; {_against(lora, full, 'heldout_loss', 'full fine-tuning')}"
    return [
        text
        + f", training {lora['trainable_params'] / full['trainable_params']:.2%} of its parameters."
    ]


def qlora_findings(report: dict[str, Any]) -> list[str]:
    rows, key = _rows(report), primary_metric(report)
    qlora, lora = rows.get("qlora"), rows.get("lora")
    if not qlora or not lora or key not in qlora or key not in lora:
        return []
    v = verdict(qlora[key], lora[key], key)
    head = {"same": "no measurable quality loss against", "better": "better quality than",
            "worse": "a quality loss against"}[v]  # fmt: skip
    text = f"**QLoRA shows {head} LoRA**: {_against(qlora, lora, key, 'LoRA')}."
    mq, ml = qlora.get("peak_train_memory_mb"), lora.get("peak_train_memory_mb")
    if mq and ml:
        saved = ml["mean"] - mq["mean"]
        where = report.get("header", {}).get("device", "cpu")
        kind = "PyTorch's peak allocation" if where.startswith("cuda") else "resident memory"
        verb = f"saves {saved:,.0f} MB ({saved / ml['mean']:.0%})" if saved > 0 else \
            f"saves no memory ({-saved:,.0f} MB more)"  # fmt: skip
        text += (f" Its peak training memory ({kind} on `{where}`) is {mq['mean']:,.0f} MB against "
                 f"{ml['mean']:,.0f} MB: QLoRA {verb}")  # fmt: skip
        if qlora.get("train_tokens_per_s") and lora.get("train_tokens_per_s"):
            ratio = qlora["train_tokens_per_s"] / lora["train_tokens_per_s"]
            text += f", and trains at {ratio:.2f}× LoRA's tokens/s"
        text += "."
    return [text]


def latency_findings(report: dict[str, Any]) -> list[str]:
    rows, said = _rows(report), []
    base = rows.get("base")
    if not base or base.get("ms_per_token") is None:
        return []
    adapter = rows.get("adapter")
    if adapter and adapter.get("ms_per_token") is not None:
        r = adapter["ms_per_token"] / base["ms_per_token"] - 1
        verb = "add" if r > NOISE else "did not measurably add"
        said.append(
            f"**Bottleneck adapters {verb} inference latency**: {adapter['ms_per_token']:.1f} ms per "
            f"token against {base['ms_per_token']:.1f} ms for the base model ({r:+.0%}; |Δ| ≤ "
            f"{NOISE:.0%} counts as noise); they cannot be merged into the weights."
        )
    merged, unmerged, slower = [], [], []
    for label in ("lora", "qlora", "dora", "ia3"):
        run = rows.get(label)
        if not run or run.get("merged_ms_per_token") is None:
            continue
        reference = run.get("base_ms_per_token_merged_pass", base["ms_per_token"])
        m = run["merged_ms_per_token"] / reference - 1
        u = run["ms_per_token"] / base["ms_per_token"] - 1
        merged.append(f"{NAMES[label]} {m:+.0%}")
        if abs(m) > NOISE:
            slower.append(NAMES[label])
        unmerged.append(f"{NAMES[label]} {u:+.0%}")
    if merged:
        head = ("Merged into the weights, adapters add no latency beyond noise" if not slower
                else f"Merged into the weights, {' and '.join(slower)} timed outside the noise band")  # fmt: skip
        spread = ("" if not slower else "; a merged model has exactly the base model's layers, "
                  "so that difference is this machine's timing spread")  # fmt: skip
        said.append(
            f"**{head}** (|Δ| ≤ {NOISE:.0%} counts as noise) against the base model timed "
            f"alongside: {', '.join(merged)}{spread}. Unmerged, as trained, they add: "
            f"{', '.join(unmerged)} (base {base['ms_per_token']:.1f} ms per token)."
        )
    return said


def prompt_findings(report: dict[str, Any]) -> list[str]:
    rows, key = _rows(report), primary_metric(report)
    prompt, lora = rows.get("prompt"), rows.get("lora")
    if not prompt or not lora:
        return []
    text = (f"**Prompt tuning's cost does not follow its parameter count**: it trains "
            f"{prompt['trainable_params']:,} parameters "
            f"({prompt['trainable_params'] / lora['trainable_params']:.1%} of LoRA's)")  # fmt: skip
    if prompt.get("train_tokens_per_s") and lora.get("train_tokens_per_s"):
        speed = prompt["train_tokens_per_s"] / lora["train_tokens_per_s"]
        text += f" yet trains at {speed:.2f}× LoRA's tokens/s"
    mp, ml = prompt.get("peak_train_memory_mb"), lora.get("peak_train_memory_mb")
    if mp and ml:
        text += f" and peaks at {mp['mean']:,.0f} MB against {ml['mean']:,.0f} MB"
    text += (": the gradient passes back through every layer to reach the input embeddings, and "
             f"every input carries {prompt.get('extra_context_tokens', 0)} extra tokens.")  # fmt: skip
    if key in prompt and key in lora:
        text += f" Quality: {_against(prompt, lora, key, 'LoRA')}"
        if prompt.get("plateau_step") and lora.get("plateau_step"):
            text += (f"; its validation loss bottoms out at step "
                     f"{fmt(prompt['plateau_step'], 'steps')} against "
                     f"{fmt(lora['plateau_step'], 'steps')} for LoRA")  # fmt: skip
        text += "."
    return [text]


def best_findings(report: dict[str, Any]) -> list[str]:
    key = primary_metric(report)
    trained = [r for r in report["runs"] if r["method"] != "base" and r.get(key)]
    if not trained:
        return []
    sign = 1 if _higher_is_better(key) else -1
    best = max(trained, key=lambda r: sign * r[key]["mean"])
    ties = [
        r["label"] for r in trained if r is not best and verdict(r[key], best[key], key) == "same"
    ]
    text = f"Best {METRICS[key]}: **{best['label']}**, {fmt(best[key], key)}"
    text += (
        f"; no measurable difference from it: {', '.join(ties)}."
        if ties
        else "; every other run is measurably below it."
    )
    return [text]


def sweep_findings(report: dict[str, Any]) -> list[str]:
    """Which lr won, and where the winner sat at the edge of the sweep (a wider one may help)."""
    sweep = report.get("sweep", {})
    if not sweep or all(len(points) < 2 for points in sweep.values()):
        return []
    best = report.get("best_lr", {})
    picked = ", ".join(f"{label} {lr:g}" for label, lr in best.items())
    edge = [label for label, points in sweep.items() if len(points) > 1
            and best.get(label) in (points[0]["lr"], points[-1]["lr"])]  # fmt: skip
    text = f"Learning rates picked by validation loss: {picked}."
    if edge:
        text += f" At the edge of the sweep (a wider one might do better): {', '.join(edge)}."
    return [text]


def last_change(run: dict[str, Any]) -> tuple[float, int] | None:
    """(mean relative change of the validation loss over the last evaluation interval, the
    interval's steps) over the seeds' curves; None without two points in a curve."""
    changes, steps = [], 0
    for entry in run.get("curves", []):
        curve = entry["curve"]
        if len(curve) >= 2 and curve[-2][1]:
            changes.append(curve[-1][1] / curve[-2][1] - 1)
            steps = curve[-1][0] - curve[-2][0]
    return (sum(changes) / len(changes), steps) if changes else None


def cap_findings(report: dict[str, Any]) -> list[str]:
    """Runs whose validation loss was still falling when --max-steps ended them, and by how
    much over their last evaluation interval (how far from flat they were)."""
    cap = report["settings"].get("max_steps")
    capped = []
    for run in report["runs"]:
        best = run.get("plateau_step")
        if cap and best and cap in best["values"]:
            change = last_change(run)
            last = "" if change is None else f"; {change[0]:+.0%} over the last {change[1]} steps"
            capped.append(
                f"{run['label']} ({best['values'].count(cap)} of {best['n']} seeds{last})"
            )
    if not capped:
        return []
    return [f"**Still improving at the {cap}-step cap**: {', '.join(capped)}: their validation "
            "loss was lowest at the last step, so their figures are a lower bound on what "
            "longer training gives (the change over the last interval says how far from flat "
            "each was)."]  # fmt: skip


def findings(report: dict[str, Any]) -> list[str]:
    """Every sentence, in the order of the notes' questions."""
    return (rank_findings(report) + lora_vs_full(report) + qlora_findings(report)
            + latency_findings(report) + prompt_findings(report) + best_findings(report)
            + cap_findings(report) + sweep_findings(report))  # fmt: skip
