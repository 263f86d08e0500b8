"""The training loss of a preference objective: one forward pass of the policy over a batch
of pairs, one of the reference under no_grad (DPO), the loss of objectives.py, and its metrics.

A preference batch holds the B chosen rows first, then the B rejected rows (objectives'
"concatenated forward"), right-padded to one width; `labels` mark the answer tokens:

    input_ids (2B, T)  ──► policy π_θ ─────────────► log π_θ(y|x), (2B,)  ──┐
                       └─► reference π_ref, no_grad ─► log π_ref(y|x), (2B,) ─┴─► loss per pair (B,)

The reference is the same model with its adapters disabled (`disable_adapter`), so a LoRA or
QLoRA run holds one model in memory; full fine-tuning keeps a frozen copy instead (2× the
weights). ORPO needs no reference. The loss function returns (Σ pair losses, pairs, metric
sums); the loop divides both by the pairs of the whole step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from slimtune.errors import SlimtuneError
from slimtune.training.data import IGNORE_INDEX
from slimtune.training.logps import answer_mask, sequence_logps, token_logps
from slimtune.training.objectives import dpo_sigmoid_loss, ipo_loss, orpo_log_odds, orpo_loss
from slimtune.training.preference import PreferenceData, collate_pairs

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
           "logps/chosen", "logps/rejected")  # fmt: skip


@dataclasses.dataclass
class PreferenceLoss:
    """loss(model, batch, chunk) -> (Σ per-pair losses, pairs, {metric: Σ over pairs})."""

    objective: str = "dpo"  # "dpo" or "orpo"
    beta: float = 0.1  # DPO's β (IPO's τ)
    label_smoothing: float = 0.0  # cDPO's ε (sigmoid loss only)
    dpo_loss: str = "sigmoid"  # "sigmoid" or "ipo"
    orpo_lambda: float = 0.1  # ORPO's λ
    reference: nn.Module | None = None  # a frozen copy (full fine-tuning); None: adapters off

    def count(self, batch: dict[str, Tensor]) -> int:
        """What the loop averages over: the pairs of a batch (B of its 2B rows)."""
        return batch["input_ids"].shape[0] // 2

    def __call__(
        self, model: nn.Module, batch: dict[str, Tensor], chunk: int = 1024
    ) -> tuple[Tensor, int, dict[str, float]]:
        if self.objective == "orpo":
            return self.orpo(model, batch, chunk)
        return self.dpo(model, batch, chunk)

    def dpo(self, model, batch, chunk):
        logps = sequence_logps(model, batch, chunk)  # (2B,)
        with torch.no_grad(), reference_of(model, self.reference) as reference:
            ref_logps = sequence_logps(reference, batch, chunk)  # (2B,)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        if self.dpo_loss == "ipo":
            tokens = (batch["labels"] != IGNORE_INDEX).sum(dim=1)  # as TRL counts them
            chosen_tokens, rejected_tokens = tokens.chunk(2)
            losses = ipo_loss(chosen, rejected, ref_chosen, ref_rejected,
                              chosen_tokens, rejected_tokens, self.beta)  # fmt: skip
        else:
            losses = dpo_sigmoid_loss(
                chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing
            )
        rewards = (self.beta * (chosen - ref_chosen), self.beta * (rejected - ref_rejected))
        return losses.sum(), len(losses), metric_sums(*rewards, chosen, rejected)

    def orpo(self, model, batch, chunk):
        answer = answer_mask(batch["labels"])  # (2B, T-1)
        pairs = answer.shape[0] // 2
        whole = torch.zeros_like(answer)  # TRL's NLL: every real token of the chosen rows
        whole[:pairs] = batch["attention_mask"][:pairs, 1:].bool()
        per_token = token_logps(
            model, batch["input_ids"], batch["attention_mask"], answer | whole, chunk
        )
        mean_logps = (per_token * answer).sum(1) / answer.sum(1).clamp(min=1)  # (2B,)
        chosen_nll = -(per_token * whole).sum() / whole.sum().clamp(min=1)
        chosen, rejected = mean_logps.chunk(2)
        losses = orpo_loss(chosen_nll, chosen, rejected, self.orpo_lambda)
        stats = metric_sums(
            self.orpo_lambda * chosen, self.orpo_lambda * rejected, chosen, rejected
        )
        stats["nll_loss"] = float(chosen_nll.detach()) * pairs
        stats["log_odds_ratio"] = float(orpo_log_odds(chosen, rejected).detach().sum())
        return losses.sum(), pairs, stats


def metric_sums(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> dict[str, float]:
    """The logged metrics, summed over the pairs (the loop divides by the step's pairs)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    values = (
        chosen_rewards,
        rejected_rewards,
        chosen_rewards - rejected_rewards,
        (chosen_rewards > rejected_rewards).float(),
        chosen_logps.detach(),
        rejected_logps.detach(),
    )
    return {name: float(value.sum()) for name, value in zip(METRICS, values, strict=True)}


@contextlib.contextmanager
def reference_of(model: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The reference model: the frozen copy if there is one, else `model` with adapters off."""
    if reference is not None:
        yield reference
        return
    from slimtune.adapters.named import disable_adapter

    with disable_adapter(model):
        yield model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` that never trains: full fine-tuning's reference (2× the weights)."""
    reference = copy.deepcopy(model).eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference


def objective_loss(model: nn.Module, config, device: torch.device, quiet: bool = False):
    """The loss the loop calls for `config.objective`: the SFT loss, or a PreferenceLoss.

    DPO's reference is the model with its adapters off; a model without adapters (full
    fine-tuning) gets a frozen copy, and the run says so.
    """
    if config.objective == "sft":
        from slimtune.training.loss import causal_lm_loss

        return causal_lm_loss
    from slimtune.training import distributed

    if distributed.is_distributed():
        raise SlimtuneError(f"--objective {config.objective} runs in one process (no --nproc)")
    reference = None
    if config.objective == "dpo" and needs_copy(model):
        reference = frozen_copy(model).to(device)
        if not quiet:
            print(
                "dpo without an adapter: a frozen copy of the model is the reference (2x weights)"
            )
    return PreferenceLoss(config.objective, config.beta, config.label_smoothing,
                          config.dpo_loss, config.orpo_lambda, reference)  # fmt: skip


def needs_copy(model: nn.Module) -> bool:
    """True when DPO's reference must be a copy: the model has no adapter to switch off."""
    from slimtune.adapters.layers import adapter_layers, is_adapter_layer

    if any(True for _ in adapter_layers(model)):
        return False
    if is_adapter_layer(model):  # a soft prompt wraps the whole model and cannot be disabled
        raise SlimtuneError(
            "--objective dpo needs a reference model, and a soft prompt (--method prompt) "
            "cannot be switched off: use --method lora, qlora, dora, ia3, adapter or full"
        )
    return True


@torch.no_grad()
def preference_eval(
    model: nn.Module,
    data: PreferenceData,
    loss: PreferenceLoss,
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Mean loss and metrics over every pair of `data`, the model in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, sums = 0.0, {}
    for start in range(0, len(data), batch_size):
        batch = collate_pairs(data.pairs[start : start + batch_size], pad_id=0)
        batch = {k: v.to(device) for k, v in batch.items()}
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            loss_sum, _, stats = loss(model, batch, chunk)
        total += float(loss_sum)
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    return {"loss": total / len(data), **{key: value / len(data) for key, value in sums.items()}}
