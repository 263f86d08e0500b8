"""The report's sentences against a synthetic report.json: each follows from the numbers and
their spread over seeds ("no measurable difference" when the min–max ranges overlap)."""

import json
import statistics

import pytest

from slimtune.compare.findings import findings, verdict
from slimtune.compare.report import load_report, markdown
from slimtune.compare.stats import same, spread


def fig(*values):
    return spread(list(values))


def run(label, method=None, **values):
    row = {"label": label, "method": method or label, "rank": None, "lr": 1e-3,
           "trainable_params": 1000, "total_params": 100_000, "seeds": [0, 1, 2],
           "curves": []}  # fmt: skip
    return {**row, **values}


def curves(*per_seed):
    return [{"seed": i, "curve": c} for i, c in enumerate(per_seed)]


def synthetic(tmp_path, **changes):
    runs = {
        "base": run(
            "base",
            trainable_params=0,
            lr=None,
            ms_per_token=10.0,
            exact_match=fig(0.0),
            hard_exact_match=fig(0.0),
            heldout_loss=fig(3.0),
        ),
        "lora": run(
            "lora",
            rank=8,
            hard_exact_match=fig(0.80, 0.85, 0.90),
            heldout_loss=fig(0.10, 0.12, 0.11),
            plateau_step=fig(30, 40, 50),
            curves=curves([[10, 0.5], [20, 0.2]], [[10, 0.7], [20, 0.3]]),
            peak_train_memory_mb=fig(2000, 2000),
            train_tokens_per_s=300.0,
            ms_per_token=12.0,
            merged_ms_per_token=10.2,
            base_ms_per_token_merged_pass=10.0,
        ),
        "qlora": run(
            "qlora",
            rank=8,
            hard_exact_match=fig(0.60, 0.65, 0.70),
            heldout_loss=fig(0.2, 0.21, 0.22),
            peak_train_memory_mb=fig(1500, 1500),
            train_tokens_per_s=150.0,
        ),
        "prompt": run(
            "prompt",
            trainable_params=10,
            hard_exact_match=fig(0.1, 0.2, 0.3),
            train_tokens_per_s=240.0,
            peak_train_memory_mb=fig(2100),
            ms_per_token=10.0,
            plateau_step=fig(90, 100, 110),
            extra_context_tokens=20,
        ),
        "adapter": run("adapter", ms_per_token=13.0, hard_exact_match=fig(0.7, 0.8, 0.9)),
        "full": run(
            "full",
            trainable_params=100_000,
            hard_exact_match=fig(0.85, 0.9, 0.95),
            heldout_loss=fig(0.08, 0.09, 0.1),
        ),
        "lora-r1": run(
            "lora-r1",
            "lora",
            rank=1,
            hard_exact_match=fig(0.75, 0.80, 0.88),
            plateau_step=fig(70, 80, 90),
            curves=curves([[10, 1.5], [20, 0.6]], [[10, 1.7], [20, 0.7]]),
        ),
        "lora-r2": run("lora-r2", "lora", rank=2, hard_exact_match=fig(0.40, 0.45, 0.50)),
    }
    for label, values in changes.items():
        runs[label] = {**runs[label], **values}
    report = {"settings": {"seeds": 3}, "header": {"device": "cpu"}, "runs": list(runs.values())}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return load_report(path)


def said(report, start):
    found = [s for s in findings(report) if s.startswith(start)]
    assert len(found) == 1, (start, findings(report))
    return found[0]


def test_spread_and_overlap_against_plain_statistics():
    values = [0.8, 0.95, 0.85]
    f = spread(values + [None])
    assert (f["mean"], f["min"], f["max"], f["n"]) == (statistics.mean(values), 0.8, 0.95, 3)
    assert same(fig(0.1, 0.3), fig(0.3, 0.5)) and not same(fig(0.1, 0.29), fig(0.3, 0.5))
    assert verdict(fig(0.8, 0.9), fig(0.85, 0.95), "exact_match") == "same"
    assert verdict(fig(0.5, 0.6), fig(0.85, 0.95), "exact_match") == "worse"
    assert verdict(fig(0.5, 0.6), fig(0.85, 0.95), "heldout_loss") == "better"  # lower loss


def test_ranks_lora_full_and_qlora(tmp_path):
    report = synthetic(tmp_path)
    r1 = said(report, "**LoRA at r=1 suffices on this task**")
    assert (
        "81% (75–88%) against 85% (80–90%) for r=8, the best rank: no measurable difference" in r1
    )
    assert "step 80 (70–90)" in r1 and "step 40 (30–50)" in r1
    # the mean of the seeds' curves at the first evaluation
    assert "after 10 steps its validation loss stood at 1.600 against 0.600, so a budget" in r1
    r2 = said(report, "**LoRA at r=2 does not suffice on this task**")
    assert "45% (40–50%) against 85% (80–90%)" in r2 and "(-40 points)" in r2
    full = said(report, "**LoRA (r=8) reaches full fine-tuning**")
    assert "no measurable difference" in full and "1.00% of its parameters" in full
    assert "held-out loss 0.110 (0.100–0.120) against 0.090 (0.080–0.100)" in full
    q = said(report, "**QLoRA shows a quality loss against LoRA**")
    assert "65% (60–70%) against 85% (80–90%) for LoRA (-20 points)" in q
    assert "1,500 MB against 2,000 MB: QLoRA saves 500 MB (25%)" in q and "0.50×" in q


def test_overlapping_spreads_are_no_measurable_difference(tmp_path):
    report = synthetic(tmp_path, qlora={"hard_exact_match": fig(0.55, 0.8, 0.82)},
                       full={"hard_exact_match": fig(0.95, 0.97, 1.0)})  # fmt: skip
    q = said(report, "**QLoRA shows no measurable quality loss against LoRA**")
    assert "no measurable difference" in q
    short = said(report, "**LoRA (r=8) falls short of full fine-tuning**")
    assert "(-12 points)" in short


def test_latency_prompt_and_best(tmp_path):
    report = synthetic(tmp_path)
    assert "(+30%;" in said(report, "**Bottleneck adapters add inference latency**")
    merged = said(report, "**Merged into the weights, adapters add no latency beyond noise**")
    assert "LoRA +2%" in merged and "they add: LoRA +20%" in merged
    prompt = said(report, "**Prompt tuning's cost does not follow its parameter count**")
    assert "10 parameters (1.0% of LoRA's)" in prompt and "0.80× LoRA's tokens/s" in prompt
    assert "2,100 MB against 2,000 MB" in prompt and "20 extra tokens" in prompt
    best = said(report, "Best exact match on the held-out split with new wordings: **full**")
    assert "no measurable difference from it: lora, adapter, lora-r1." in best
    slow = synthetic(tmp_path, lora={"merged_ms_per_token": 12.0}, adapter={"ms_per_token": 10.2})
    assert said(slow, "**Bottleneck adapters did not measurably add inference latency**")
    assert said(slow, "**Merged into the weights, LoRA timed outside the noise band")


def test_runs_stopped_by_the_cap_are_named(tmp_path):
    report = synthetic(tmp_path, prompt={"plateau_step": fig(100, 100, 90)})
    report["settings"]["max_steps"] = 100
    capped = said(report, "**Still improving at the 100-step cap**")
    assert "prompt (2 of 3 seeds)" in capped and "lora" not in capped
    report = synthetic(tmp_path, prompt={"plateau_step": fig(100, 100, 100),
                                         "curves": curves([[90, 0.5], [100, 0.4]],
                                                          [[90, 1.0], [100, 0.9]])})  # fmt: skip
    report["settings"]["max_steps"] = 100
    capped = said(report, "**Still improving at the 100-step cap**")
    assert "prompt (3 of 3 seeds; -15% over the last 10 steps)" in capped  # (-20% - 10%) / 2
    report["settings"]["max_steps"] = 200
    assert not [s for s in findings(report) if "cap**" in s]


def test_one_seed_says_so(tmp_path):
    report = synthetic(tmp_path, lora={"hard_exact_match": fig(0.8)},
                       full={"hard_exact_match": fig(0.9)})  # fmt: skip
    full = said(report, "**LoRA (r=8) falls short of full fine-tuning**")
    assert "one seed, so no spread measured" in full
    text = markdown({**report, "settings": {**report["settings"], **SETTINGS}}, [])
    assert "**LoRA (r=8) falls short of full fine-tuning**" in text


SETTINGS = {"model": "m", "data": "d", "eval_data": "e", "hard_eval_data": None, "jobs": 1,
            "patience": 3, "eval_every": 10, "max_steps": 200, "batch_size": 4, "max_length": 128,
            "lr_factors": [1 / 3, 1, 3], "seeds": 3, "seed": 0, "rank": 8, "latency_tokens": 16}  # fmt: skip


@pytest.mark.parametrize("label", ["qlora", "prompt", "lora-r1", "full"])
def test_missing_runs_drop_their_sentences(tmp_path, label):
    report = synthetic(tmp_path)
    report["runs"] = [r for r in report["runs"] if r["label"] != label]
    assert findings(report)  # nothing raises; the other sentences stay
