"""LoRA+: the B matrices learn faster than the A matrices.

Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv:2402.12354. With A and B at one learning rate, feature learning in wide models is
inefficient; setting ηB = λ·ηA (λ = `--lora-plus-ratio`, 16 in the paper) fixes it:

    group          parameters                                    lr        weight decay
    A              lora_A (and everything else not below)        η         wd
    embedding      LoRA on an nn.Embedding (lora_embedding_A/B)  1e-6      wd
    B              lora_B, and 1-d parameters (DoRA magnitude)   λ·η       wd
    B, no decay    those of B inside a LayerNorm, or biases      λ·η       0

The groups are exactly those of PEFT's `create_loraplus_optimizer` (tested against it).
Each group also carries `lr_scale` = its lr / η, so the trainer's schedule can set
`lr = η(step) · lr_scale` for every group, as transformers' LambdaLR schedulers do.
"""

from __future__ import annotations

from torch import nn

from slimtune.errors import SlimtuneError

LR_EMBEDDING = 1e-6  # PEFT's loraplus_lr_embedding default


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float,
    weight_decay: float = 0.0,
    lr_embedding: float = LR_EMBEDDING,
) -> list[dict]:
    """The four parameter groups of LoRA+ over the parameters of `model` that require grad."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    from slimtune.methods.lora.layers import LoraEmbedding

    decay = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    modules = dict(model.named_modules())
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = modules.get(".".join(name.split(".")[:-2]))  # lora_embedding_A.<adapter>
        if isinstance(owner, LoraEmbedding):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    if not any("lora_B" in n or "lora_embedding_B" in n for n, _ in model.named_parameters()):
        raise SlimtuneError(
            "--lora-plus-ratio needs LoRA B matrices to train: use it with --method lora, "
            "qlora or dora"
        )
    settings = {
        "A": (lr, weight_decay),
        "embedding": (lr_embedding, weight_decay),
        "B": (lr * ratio, weight_decay),
        "B_no_decay": (lr * ratio, 0.0),
    }
    return [
        {"params": params, "lr": settings[key][0], "weight_decay": settings[key][1],
         "lr_scale": settings[key][0] / lr}
        for key, params in groups.items()
    ]  # fmt: skip


def param_groups(model: nn.Module, params: list[nn.Parameter], ratio: float, **kwargs) -> list:
    """What the trainer's optimizer gets: `params` as they are, or LoRA+'s groups (ratio > 0)."""
    return loraplus_param_groups(model, ratio=ratio, **kwargs) if ratio else params
