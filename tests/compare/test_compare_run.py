"""`slimtune compare` end to end on a tiny model: the sweep, the plateau, the seeds."""

import json

import pytest

from slimtune.cli.main import main
from slimtune.compare.settings import (
    CompareSettings,
    Plateau,
    jobs,
    parse_lr_factors,
    parse_methods,
    parse_ranks,
    seed_jobs,
)
from slimtune.errors import SlimtuneError

ROWS = [{"prompt": f"{w}?", "completion": f" {w[::-1]}!"} for w in
        ["abc", "hello", "cat", "moon", "tree", "slim", "tune", "lamp", "star", "kite", "sun",
         "rain", "snow", "wind", "leaf", "rock"]]  # fmt: skip


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_compare_sweeps_stops_and_repeats_seeds(tiny_llama_dir, tmp_path):
    """The fast case (make test): one method, a 2-value lr sweep, a plateau, 2 seeds."""
    data = _write(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "report"
    argv = ["compare", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out),
            "--methods", "lora", "--rank", "2", "--max-steps", "8", "--batch-size", "4",
            "--lr-sweep", "0.5,500", "--until-plateau", "1", "--eval-every", "2", "--val-rows", "4",
            "--seeds", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    lora = {r["label"]: r for r in report["runs"]}["lora"]
    points = report["sweep"]["lora"]
    assert [p["lr"] for p in points] == [5e-4, 0.5]
    for p in points:  # the best validation loss and its step, read off the run's own curve
        assert (p["plateau_step"], p["val_loss"]) == tuple(min(p["curve"], key=lambda c: c[1]))
        steps, losses = zip(*p["curve"], strict=True)
        assert list(steps) == list(range(2, steps[-1] + 1, 2))
        # --until-plateau 1: a run ends early only right after an evaluation that did not improve
        assert steps[-1] == 8 or losses[-1] >= min(losses[:-1]) * (1 - 1e-3)
    assert points[1]["steps"] < 8  # lr 0.5 blows the loss up: stopped at the plateau
    winner = min(points, key=lambda p: p["val_loss"])
    assert lora["lr"] == report["best_lr"]["lora"] == winner["lr"]
    assert lora["seeds"] == [0, 1] and lora["heldout_loss"]["n"] == 2
    assert lora["val_loss"]["values"][0] == winner["val_loss"]
    assert lora["heldout_loss"]["mean"] == pytest.approx(sum(lora["heldout_loss"]["values"]) / 2)
    assert not (out / "runs").exists() and (out / "learning_curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_compare_runs_end_to_end(tiny_llama_dir, tmp_path, capsys):
    data = _write(tmp_path / "rows.jsonl", ROWS)
    hard = _write(tmp_path / "hard.jsonl", [{"prompt": f"Reverse {w}", "completion": w[::-1]}
                                           for w in ("dog", "bird")])  # fmt: skip
    out = tmp_path / "report"
    argv = ["compare", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out),
            "--hard-eval-data", str(hard), "--methods", "lora,prompt", "--sweep-ranks", "2",
            "--max-steps", "6", "--batch-size", "4", "--lr-sweep", "0.5,2", "--until-plateau", "1",
            "--eval-every", "2", "--val-rows", "4", "--seeds", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["base", "lora", "prompt", "lora-r2"]
    rows = {r["label"]: r for r in report["runs"]}
    # the sweep: each config at default lr × 0.5 and × 2, the winner by validation loss
    for label, default in (("lora", 1e-3), ("prompt", 3e-2), ("lora-r2", 1e-3)):
        points = report["sweep"][label]
        assert [p["lr"] for p in points] == [default * 0.5, default * 2]
        winner = min(points, key=lambda p: p["val_loss"])
        assert rows[label]["lr"] == report["best_lr"][label] == winner["lr"]
        assert rows[label]["val_loss"]["values"][0] == winner["val_loss"]
    # seeds: two per config at its best lr, mean and spread of each figure
    for label in ("lora", "prompt", "lora-r2"):
        loss = rows[label]["heldout_loss"]
        assert rows[label]["seeds"] == [0, 1] and loss["n"] == 2
        assert loss["min"] <= loss["mean"] <= loss["max"]
        assert loss["mean"] == pytest.approx(sum(loss["values"]) / 2)
        for curve in rows[label]["curves"]:  # validation every 2 steps, capped at 6
            steps = [s for s, _ in curve["curve"]]
            assert steps == list(range(2, steps[-1] + 1, 2)) and steps[-1] <= 6
        assert "hard_exact_match" in rows[label]
    # LoRA r=2 on every linear layer of 2 layers: r·(in+out) for q, k, v, o, gate, up, down
    per_layer = (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32)
    assert rows["lora-r2"]["trainable_params"] == 2 * 2 * per_layer
    assert rows["prompt"]["trainable_params"] == 20 * 32
    assert rows["lora"]["merged_ms_per_token"] > 0 and "merged_ms_per_token" not in rows["prompt"]
    # 16 rows: a fifth (3) held out, 4 of the rest carved out for validation
    assert report["header"]["rows"] == {"train": 9, "validation": 4, "heldout": 3,
                                        "hard_heldout": 2}  # fmt: skip
    md = (out / "report.md").read_text()
    for name in ("quality.png", "quality_vs_params.png", "learning_curves.png", "lr_sweep.png",
                 "rank_sweep.png", "memory.png", "train_speed.png", "latency.png"):  # fmt: skip
        assert (out / name).stat().st_size > 1000 and f"]({name})" in md
    assert "**Model**" in md and "**Hardware**" in md and "## Learning-rate sweep" in md
    assert not (out / "runs").exists()


def test_plateau_stops_after_patience_evaluations_without_improvement():
    stop = Plateau(patience=2)
    losses = [1.0, 0.5, 0.6, 0.4, 0.41, 0.3999, 0.45]
    decisions = [stop({"step": 10 * (i + 1), "eval_loss": v}) for i, v in enumerate(losses)]
    # 0.41 and 0.3999 (within 0.1% of 0.4) bring no improvement: stop at the second of them
    assert decisions == [False, False, False, False, False, True, True]
    assert (stop.best, stop.best_step) == (0.4, 40)


def test_plans_and_bad_input():
    with pytest.raises(SlimtuneError, match="unknown method 'lorax'; methods: lora, qlora"):
        parse_methods("lora,lorax")
    with pytest.raises(SlimtuneError, match="--sweep-ranks"):
        parse_ranks("1,0")
    with pytest.raises(SlimtuneError, match="--lr-sweep '0,1'"):
        parse_lr_factors("0,1")
    assert parse_lr_factors("default") == (1 / 3, 1.0, 3.0)
    settings = CompareSettings(model="m", data="d", eval_data="e", methods=("lora", "full"),
                               ranks=(8, 4), lr_factors=(0.5, 2.0), seeds=3)  # fmt: skip
    first = [(j["label"], j["lr"], j["seed"]) for j in jobs(settings)]
    assert first == [("base", None, 0), ("lora", 5e-4, 0), ("lora", 2e-3, 0),
                     ("full", 5e-5, 0), ("full", 2e-4, 0), ("lora-r4", 5e-4, 0),
                     ("lora-r4", 2e-3, 0)]  # fmt: skip
    best = {"lora": 2e-3, "full": 5e-5, "lora-r4": 5e-4}
    again = [(j["label"], j["lr"], j["seed"]) for j in seed_jobs(settings, best)]
    assert again == [("lora", 2e-3, 1), ("lora", 2e-3, 2), ("full", 5e-5, 1), ("full", 5e-5, 2),
                     ("lora-r4", 5e-4, 1), ("lora-r4", 5e-4, 2)]  # fmt: skip


def test_a_sweep_without_validation_rows_is_refused(tmp_path):
    from slimtune.compare.run import compare

    data = _write(tmp_path / "rows.jsonl", ROWS)
    settings = CompareSettings(model="m", data=str(data), eval_data=str(data), lr_factors=(1, 3))
    with pytest.raises(SlimtuneError, match="needs validation rows"):
        compare(settings, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compare_flags_errors(tiny_llama_dir, tmp_path, capsys):
    data = _write(tmp_path / "rows.jsonl", ROWS)
    base = ["compare", "--model", str(tiny_llama_dir), "--data", str(data), "--out",
            str(tmp_path / "o")]  # fmt: skip
    for extra, message in ((["--seeds", "0"], "--seeds 0 is not accepted"),
                           (["--device", "tpu"], "--device 'tpu' is not accepted"),
                           (["--lr-sweep", "x"], "--lr-sweep 'x'")):  # fmt: skip
        assert main(base + extra) != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
