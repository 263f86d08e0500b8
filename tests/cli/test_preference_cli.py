"""`slimtune train --objective dpo|orpo` and `slimtune eval --objective dpo` end to end on the
tiny model: the run directory and its metrics, rewards against a plain PyTorch computation
through PEFT, resume after SIGKILL, QLoRA on the CPU (and the GPU), and every bad input."""

import json
import math
import random
import signal
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtune.cli.main import main
from slimtune.config import TrainConfig

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
           "logps/chosen", "logps/rejected")  # fmt: skip


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sums(n, seed):
    """Pairs whose chosen answer is the sum and whose rejected one is a refusal."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": "no idea"})
    return rows


@pytest.fixture
def pref_file(tmp_path):
    return write_rows(tmp_path / "pref.jsonl", sums(24, 0))


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def train_argv(model_dir, data, out, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
            "--batch-size", "4", "--quiet", *extra]  # fmt: skip


def plain_rewards(model_dir, adapter, data, beta):
    """β (log π(y|x) - log π_base(y|x)) for each pair, with PEFT and a plain log-softmax."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    model.eval()

    def logp(prompt, answer):
        head = tokenizer(prompt)["input_ids"]
        ids = torch.tensor([head + tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        picked = logits.gather(1, ids[0, 1:, None])[:, 0]
        return float(picked[len(head) - 1 :].sum())

    out = []
    for row in (json.loads(line) for line in data.open()):
        policy = [logp(row["prompt"], row[side]) for side in ("chosen", "rejected")]
        with model.disable_adapter():
            base = [logp(row["prompt"], row[side]) for side in ("chosen", "rejected")]
        out.append((beta * (policy[0] - base[0]), beta * (policy[1] - base[1])))
    return out


def test_dpo_run_learns_the_preference_and_eval_scores_it_as_peft_does(
    tiny_llama_dir, pref_file, tmp_path, capsys
):
    out, held_out = tmp_path / "run", write_rows(tmp_path / "held.jsonl", sums(12, 1))
    argv = train_argv(tiny_llama_dir, pref_file, out, "--objective", "dpo", "--beta", "0.5",
                      "--max-steps", "30", "--lr", "0.02", "--eval-data", str(held_out))  # fmt: skip
    assert main(argv) == 0
    steps = [r for r in records(out) if "loss" in r]
    assert all(set(METRICS) <= set(r) for r in steps)
    # step 1: the adapter starts at zero (B = 0), so the policy is its reference
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/margin"] == 0.0
    final = [r for r in records(out) if "eval_loss" in r][-1]
    assert final["eval_rewards/accuracy"] >= 0.75 and final["eval_loss"] < 0.6
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["objective"], saved["beta"]) == ("dpo", 0.5)  # --resume trains the same
    # a plain PEFT LoRA directory, and eval's rewards are PEFT's with the adapter on and off
    assert json.loads((out / "adapter/adapter_config.json").read_text())["peft_type"] == "LORA"
    report = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_llama_dir), "--adapter", str(out / "adapter"),
            "--data", str(held_out), "--objective", "dpo", "--beta", "0.5", "--json", str(report)]  # fmt: skip
    assert main(argv) == 0
    assert "reward accuracy" in capsys.readouterr().out
    result = json.loads(report.read_text())
    expected = plain_rewards(tiny_llama_dir, out / "adapter", held_out, 0.5)
    margins = [c - r for c, r in expected]
    assert result["pairs"] == len(expected)
    assert result["rewards/accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert result["rewards/margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    losses = [-math.log(1 / (1 + math.exp(-m))) for m in margins]  # -log σ(β Δ)
    assert result["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert result["loss"] == pytest.approx(final["eval_loss"], abs=1e-5)  # as the trainer's eval


def test_orpo_run_logs_its_terms_and_learns(tiny_llama_dir, pref_file, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(tiny_llama_dir, pref_file, out, "--objective", "orpo", "--orpo-lambda",
                      "0.5", "--max-steps", "24", "--lr", "0.02")  # fmt: skip
    assert main(argv) == 0
    steps = [r for r in records(out) if "loss" in r]
    assert all({*METRICS, "nll_loss", "log_odds_ratio"} <= set(r) for r in steps)
    first, last = steps[0], steps[-1]
    # ORPO = NLL - λ log σ(log odds ratio), with the rewards λ · mean log-prob
    for r in (first, last):
        assert r["rewards/margin"] == pytest.approx(
            0.5 * (r["logps/chosen"] - r["logps/rejected"]), abs=1e-6
        )
        assert r["loss"] > r["nll_loss"]  # -λ log σ(·) > 0
    assert last["loss"] < first["loss"] and last["log_odds_ratio"] > first["log_odds_ratio"]


def test_qlora_dpo_trains_on_the_cpu(tiny_llama_dir, pref_file, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(tiny_llama_dir, pref_file, out, "--method", "qlora", "--objective", "dpo",
                      "--max-steps", "12", "--lr", "0.02", "--dpo-loss", "ipo")  # fmt: skip
    assert main(argv) == 0
    steps = [r for r in records(out) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, abs=1e-4)  # IPO at Δ = 0
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["rewards/margin"] > 0
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


@pytest.mark.gpu
def test_qlora_dpo_trains_on_the_gpu(tiny_llama_dir, pref_file, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "run"
    argv = train_argv(tiny_llama_dir, pref_file, out, "--method", "qlora", "--objective", "dpo",
                      "--max-steps", "12", "--lr", "0.02")  # fmt: skip
    assert main(argv) == 0
    steps = [r for r in records(out) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert json.loads((out / "summary.json").read_text())["device"].startswith("cuda")


def test_full_fine_tuning_keeps_a_reference_copy(tiny_llama_dir, pref_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(tiny_llama_dir, pref_file, out, "--method", "full", "--objective", "dpo",
                      "--max-steps", "4", "--lr", "0.001")  # fmt: skip
    argv.remove("--quiet")
    assert main(argv) == 0
    assert "a frozen copy of the model is the reference" in capsys.readouterr().out
    steps = [r for r in records(out) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[-1]["rewards/margin"] != 0.0  # the copy stayed; the model moved
    assert (out / "adapter/model.safetensors").is_file()


def test_python_api_takes_the_objective(tiny_llama, pref_file, tmp_path):
    import slimtune as st

    model, tokenizer = tiny_llama
    torch.manual_seed(0)
    model = st.add_adapter(model, st.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    config = TrainConfig(max_steps=3, batch_size=4, lr=0.01, save_every=0)
    summary = st.train(
        model, tokenizer, pref_file, config, tmp_path / "run", objective="dpo", quiet=True
    )
    assert summary["steps"] == 3 and summary["train_rows"] == 24
    assert "rewards/accuracy" in records(tmp_path / "run")[-1]


def test_sigkill_then_resume_is_bit_identical(tiny_llama_dir, pref_file, tmp_path):
    from test_train_cli import run_cli

    steps = 14
    common = train_argv(tiny_llama_dir, pref_file, "OUT", "--objective", "dpo", "--max-steps",
                        str(steps), "--lr", "0.01", "--save-every", "3", "--dropout", "0.1",
                        "--seed", "3")  # fmt: skip
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    at = common.index("OUT")
    assert main([*common[:at], str(reference), *common[at + 1 :]]) == 0

    kill_after = random.randint(4, steps // 2)
    proc = run_cli([*common[:at], str(killed), *common[at + 1 :]])
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        logged = metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after
        if logged and any((killed / "checkpoints").glob("step-*")):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"finished before the kill at step {kill_after}"

    assert main([*common[:at], str(killed), *common[at + 1 :], "--resume"]) == 0
    ours = load_file(str(killed / "adapter/adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter/adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), f"{key} differs (killed after {kill_after})"
    keys = ("step", "loss", "lr", "grad_norm", "tokens", *METRICS)  # not timings or memory
    logged = [[{k: r.get(k) for k in keys} for r in records(run)] for run in (killed, reference)]
    assert logged[0] == logged[1]  # losses, rewards and log-probs of every step


BAD = {
    "sft data": (["--objective", "dpo"], "sft", "train.jsonl:1: a preference row has ['completion', 'prompt']"),
    "pairs for sft": ([], "pref", "train.jsonl:1: a row has ['chosen', 'prompt', 'rejected']"),
    "beta without dpo": (["--beta", "0.2"], "pref", "--beta 0.2 is not accepted: it applies to objective 'dpo' only"),
    "smoothing with ipo": (["--objective", "dpo", "--dpo-loss", "ipo", "--label-smoothing", "0.1"], "pref",
                           "--label-smoothing 0.1 is not accepted: it applies to dpo_loss 'sigmoid' only"),
    "beta zero": (["--objective", "dpo", "--beta", "0"], "pref", "--beta 0.0 is not accepted: a number > 0"),
    "prompt tuning": (["--objective", "dpo", "--method", "prompt"], "pref", "a soft prompt (--method prompt) cannot be switched off"),
    "several processes": (["--objective", "dpo", "--nproc", "2"], "pref", "--objective dpo runs in one process: drop --nproc"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_one_line_and_writes_nothing(case, tiny_llama_dir, tmp_path, capsys):
    flags, kind, expected = BAD[case]
    rows = sums(4, 0) if kind == "pref" else [{"prompt": "1+1=", "completion": "2"}] * 4
    data = write_rows(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    assert main(train_argv(tiny_llama_dir, data, out, "--max-steps", "2", *flags)) == 1
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_preference_demo_data_differs_in_style_only_and_holds_out_questions():
    from slimtune.cli.demo import demo_file

    def load(name):
        return [json.loads(line) for line in demo_file(name).open()]

    train, held = load("preference_train.jsonl"), load("preference_heldout.jsonl")
    assert (len(train), len(held)) == (109, 30)
    for row in train + held:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen in rejected and len(rejected) > 2 * len(chosen)  # the same fact, padded
    questions = {r["prompt"][0]["content"] for r in train}
    assert not questions & {r["prompt"][0]["content"] for r in held}
    assert not any("sound" in q or "plural" in q for q in questions)  # kinds only held out


def test_one_sentence_rule():
    from slimtune.cli.demo_preference import one_sentence

    assert one_sentence("A spider has eight legs.") and one_sentence(" Is it 0.5 m? ")
    assert not one_sentence("Great question! A spider has eight legs.")
    assert not one_sentence("A spider has eight legs, which")  # cut off by the token budget
    assert not one_sentence("")


def test_preference_demo_prints_before_after_and_writes_the_run(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    import dataclasses

    from slimtune.cli import demo_preference
    from slimtune.config import LoraConfig

    monkeypatch.setattr(demo_preference, "MODEL", str(tiny_llama_dir))
    monkeypatch.setattr(demo_preference, "LORA", LoraConfig(r=2, target_modules=["q_proj"]))
    short = dataclasses.replace(demo_preference.TRAIN, max_steps=2, save_every=1, lr=0.05)
    monkeypatch.setattr(demo_preference, "TRAIN", short)
    monkeypatch.setattr(demo_preference, "BUDGET", 4)
    out = tmp_path / "demo"
    assert main(["demo", "--preference", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "held-out answers in one sentence:" in printed and "reward accuracy" in printed
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["pairs"] == after["pairs"] == 30
    # before training the adapter is zero: the policy is its reference, every margin 0
    assert (before["reward_margin"], before["reward_accuracy"]) == (0.0, 0.0)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["reward_margin"] != 0.0
    for split in (before, after):
        share = sum(e["one_sentence"] for e in split["examples"]) / 30
        assert split["one_sentence"] == share
    assert (out / "adapter/adapter_config.json").is_file()
