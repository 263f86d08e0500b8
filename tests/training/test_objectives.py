"""DPO (sigmoid, cDPO, IPO) and ORPO against TRL's own trainers: the same tiny model, the
same batch (tokenized and collated by TRL) and the same LoRA weights give the same loss,
the same gradients and the same logged rewards, within 1e-5 in fp32."""

import pytest
import torch

trl = pytest.importorskip("trl")

from slimtune.config import LoraConfig  # noqa: E402
from slimtune.methods.table import add_adapter  # noqa: E402
from slimtune.training.objectives import log1mexp  # noqa: E402
from slimtune.training.preference_loss import PreferenceLoss  # noqa: E402

ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "five, I think"},
    {"prompt": "Say hi: ", "chosen": "hello there", "rejected": "no"},
    {"prompt": "Capital of France? ", "chosen": "Paris.", "rejected": "Lyon, of course."},
    {"prompt": "x", "chosen": "yz", "rejected": "y"},
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_lora():
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)


def randomize_lora(model, seed=0):
    """Non-zero A and B, so that the policy differs from the reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def slimtune_twin(model_dir, trl_model):
    """Our LoRA on the same base, with the TRL model's adapter weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    theirs = {
        name.removeprefix("base_model.model."): param
        for name, param in trl_model.named_parameters()
        if param.requires_grad
    }
    ours = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert ours.keys() == theirs.keys()
    with torch.no_grad():
        for name, param in ours.items():
            param.copy_(theirs[name])
    return model.train(), theirs


def grads(named):
    return {name: param.grad for name, param in named.items()}


def assert_close_grads(model, theirs):
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads(theirs).items():
        assert grad is not None and ours[name] is not None, name
        torch.testing.assert_close(ours[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def build_dpo(tiny_llama_dir, tmp_path, rows, **settings):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
        per_device_train_batch_size=len(rows), max_length=None, **settings,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=peft_lora(),
    )  # fmt: skip
    randomize_lora(trainer.model)
    return trainer


CASES = {
    "sigmoid": ({"loss_type": ["sigmoid"], "beta": 0.1}, {"beta": 0.1}, ROWS),
    "sigmoid beta 0.5": ({"loss_type": ["sigmoid"], "beta": 0.5}, {"beta": 0.5}, ROWS),
    # cDPO: TRL 1.x keeps label smoothing in its "aot" loss, which on one pair is cDPO
    "cdpo (aot, one pair)": (
        {"loss_type": ["aot"], "beta": 0.3, "label_smoothing": 0.2},
        {"beta": 0.3, "label_smoothing": 0.2},
        ROWS[2:3],
    ),
    "ipo": ({"loss_type": ["ipo"], "beta": 0.2}, {"beta": 0.2, "dpo_loss": "ipo"}, ROWS),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dpo_loss_gradients_and_rewards_equal_trl(case, tiny_llama_dir, tmp_path):
    trl_settings, our_settings, rows = CASES[case]
    trainer = build_dpo(tiny_llama_dir, tmp_path, rows, **trl_settings)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model, theirs = slimtune_twin(tiny_llama_dir, trainer.model)
    ours = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
    }
    loss_sum, pairs, stats = PreferenceLoss("dpo", **our_settings)(model, ours, chunk=5)
    (loss_sum / pairs).backward()

    assert pairs == len(rows)
    assert abs(float(loss_sum.detach()) / pairs - float(loss.detach())) < 1e-5
    assert (
        abs(float(loss.detach())) > 1e-3 and logged["rewards/margins"] != 0.0
    )  # not a trivial case
    assert_close_grads(model, theirs)
    for ours_name, trl_name in [("rewards/chosen", "rewards/chosen"),
                                ("rewards/rejected", "rewards/rejected"),
                                ("rewards/margin", "rewards/margins"),
                                ("rewards/accuracy", "rewards/accuracies"),
                                ("logps/chosen", "logps/chosen"),
                                ("logps/rejected", "logps/rejected")]:  # fmt: skip
        assert abs(stats[ours_name] / pairs - logged[trl_name]) < 1e-5, ours_name


def test_orpo_loss_gradients_and_rewards_equal_trl(tiny_llama_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    lam = 0.25
    args = ORPOConfig(
        output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
        beta=lam, per_device_train_batch_size=len(ROWS), max_length=64,
    )  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    trainer = ORPOTrainer(
        model=base, args=args, train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer, peft_config=peft_lora(),
    )  # fmt: skip
    randomize_lora(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    trainer.model.train()
    loss, logged = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()

    model, theirs = slimtune_twin(tiny_llama_dir, trainer.model)
    joined = ORPOTrainer.concatenated_inputs(batch, padding_value=trainer.padding_value)
    ours = {
        "input_ids": joined["concatenated_input_ids"],
        "attention_mask": joined["concatenated_attention_mask"],
        "labels": joined["concatenated_labels"],
    }
    loss_sum, pairs, stats = PreferenceLoss("orpo", orpo_lambda=lam)(model, ours, chunk=7)
    (loss_sum / pairs).backward()

    assert abs(float(loss_sum.detach()) / pairs - float(loss.detach())) < 1e-5
    assert_close_grads(model, theirs)
    for ours_name, trl_name in [("rewards/chosen", "rewards/chosen"),
                                ("rewards/margin", "rewards/margins"),
                                ("rewards/accuracy", "rewards/accuracies"),
                                ("logps/rejected", "logps/rejected"),
                                ("nll_loss", "nll_loss"),
                                ("log_odds_ratio", "log_odds_chosen")]:  # fmt: skip
        assert abs(stats[ours_name] / pairs - logged[trl_name]) < 1e-5, ours_name


def test_log1mexp_equals_trl_and_float64():
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    x = -torch.logspace(-8, 2, 200, dtype=torch.float32)
    exact = torch.log1p(-torch.exp(x.double())).float()
    torch.testing.assert_close(log1mexp(x), trl_log1mexp(x), atol=0, rtol=0)
    torch.testing.assert_close(log1mexp(x), exact, atol=1e-6, rtol=1e-5)


def test_the_losses_default_to_trls_hyperparameters_and_count_one_token_answers():
    """β = 0.1 (TRL's DPOConfig, IPO), ε = 0, λ = 0.1 (TRL's ORPOConfig); IPO divides by the
    answer's token count, which may be 1; the formulas written out by hand."""
    import torch.nn.functional as F

    from slimtune.training.objectives import dpo_sigmoid_loss, ipo_loss, orpo_loss

    pc, pr = torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -1.5])
    rc, rr = torch.tensor([-3.5, -2.5]), torch.tensor([-3.0, -2.0])
    margin = (pc - rc) - (pr - rr)
    want = -torch.nn.functional.logsigmoid(0.1 * margin)
    torch.testing.assert_close(dpo_sigmoid_loss(pc, pr, rc, rr), want)
    ones, threes = torch.tensor([1, 1]), torch.tensor([3, 3])
    want_ipo = ((pc - rc) / 1 - (pr - rr) / 3 - 1 / (2 * 0.1)) ** 2
    torch.testing.assert_close(ipo_loss(pc, pr, rc, rr, ones, threes), want_ipo)
    want_ipo = ((pc - rc) / 3 - (pr - rr) / 1 - 1 / (2 * 0.1)) ** 2
    torch.testing.assert_close(ipo_loss(pc, pr, rc, rr, threes, ones), want_ipo)
    nll, mc, mr = torch.tensor([1.2, 0.7]), torch.tensor([-0.5, -0.9]), torch.tensor([-1.1, -0.4])
    odds = (mc - torch.log1p(-mc.exp())) - (mr - torch.log1p(-mr.exp()))
    torch.testing.assert_close(orpo_loss(nll, mc, mr), nll - 0.1 * F.logsigmoid(odds))
