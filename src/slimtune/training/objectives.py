"""Preference losses over per-sequence log-probabilities: DPO (sigmoid, cDPO, IPO) and ORPO.

Each pair is a prompt x with a chosen answer y_w and a rejected one y_l. The policy π_θ is
the model being trained; the reference π_ref is the frozen model it started from (for an
adapter: the same model with its adapters disabled). With log π(y|x) = Σ_t log π(y_t|x, y_<t)
over the answer's tokens, the implicit reward of an answer is r(y) = β (log π_θ(y|x) - log π_ref(y|x)).

DPO, Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", arXiv:2305.18290 (Eq. 7):

    Δ = [log π_θ(y_w) - log π_ref(y_w)] - [log π_θ(y_l) - log π_ref(y_l)]
    L_DPO = -log σ(β Δ)

with label smoothing ε (conservative DPO, Mitchell 2023, "A note on DPO with noisy
preferences"), for preferences flipped with probability ε:

    L_cDPO = -(1 - ε) log σ(β Δ) - ε log σ(-β Δ)

IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences", arXiv:2310.12036 (Eq. 17), on log-ratios averaged per answer token (as TRL,
confirmed with the paper's authors), with τ = β:

    L_IPO = (Δ_avg - 1 / (2 τ))²,   Δ_avg = Δ_w / |y_w| - Δ_l / |y_l|

ORPO, Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
arXiv:2403.07691 (Eqs. 4-7), on the mean token log-probability P = exp(log π_θ(y)/|y|) and
no reference model:

    odds(y) = P / (1 - P)
    L_ORPO = L_NLL(y_w) - λ log σ(log odds(y_w) - log odds(y_l))

Every function returns one loss per pair, (B,); the trainer averages them over the pairs of
a step. These are the formulas of TRL's DPOTrainer (loss types "sigmoid" and "ipo"; cDPO is
TRL's "aot" loss on one pair, and the sigmoid loss of TRL before 1.0) and ORPOTrainer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSSES = ("sigmoid", "ipo")


def dpo_margin(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> Tensor:
    """Δ = (log π_θ(y_w) - log π_ref(y_w)) - (log π_θ(y_l) - log π_ref(y_l)), (B,)."""
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


def dpo_sigmoid_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """-(1 - ε) log σ(β Δ) - ε log σ(-β Δ) per pair, (B,); ε = 0 is plain DPO.

    Args:
        chosen_logps, rejected_logps: Σ log π_θ over each answer's tokens, (B,).
        ref_chosen_logps, ref_rejected_logps: the same under the reference model, (B,).
        beta: β, how far the policy may move from the reference (higher: less).
        label_smoothing: ε in [0, 0.5), the assumed share of flipped preferences.
    """
    logits = beta * dpo_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """(Δ_w / |y_w| - Δ_l / |y_l| - 1 / (2β))² per pair, (B,); |y| = answer tokens, (B,)."""
    chosen = (chosen_logps - ref_chosen_logps) / chosen_tokens.clamp(min=1)
    rejected = (rejected_logps - ref_rejected_logps) / rejected_tokens.clamp(min=1)
    return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Mächler 2012: branch at -log 2)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor) -> Tensor:
    """log odds(y_w) - log odds(y_l), with log odds(y) = log P - log(1 - P), (B,).

    Args:
        chosen_mean_logps, rejected_mean_logps: log P = mean log π_θ per answer token, (B,).
    """
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def orpo_loss(
    chosen_nll: Tensor, chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, lam: float = 0.1
) -> Tensor:
    """L_NLL - λ log σ(log odds ratio) per pair, (B,).

    Args:
        chosen_nll: the supervised loss on the chosen answers (a scalar, or (B,)).
        chosen_mean_logps, rejected_mean_logps: mean log π_θ per answer token, (B,).
        lam: λ, the weight of the odds-ratio term.
    """
    ratio = F.logsigmoid(orpo_log_odds(chosen_mean_logps, rejected_mean_logps))  # (B,)
    return chosen_nll - lam * ratio
