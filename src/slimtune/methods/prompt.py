"""Prompt tuning: Lester, Al-Rfou and Constant 2021, "The Power of Scale for
Parameter-Efficient Prompt Tuning", arXiv:2104.08691.

A frozen language model reads n trainable vectors P (the soft prompt) before the
embeddings of the real tokens; only P trains (n · d parameters):

    P (n×d, trainable) ─────────────┐
                                    ▼
    input_ids ─► E (frozen) ─► [P_1 … P_n | E x_1 … E x_T] ─► frozen model ─► logits[:, n:]

    attention mask: [1 … 1 | mask]     labels: [-100 … -100 | labels]

The model's own loss over the extended labels is exactly PEFT's (the last virtual
token predicts the first real one); the logits handed back cover the real tokens
only, so they line up with `input_ids`. Generation hands the extended embeddings
and mask to the model's own `generate`, so positions and the KV cache stay right.

Initialisation ("prompt_tuning_init"): "TEXT" copies the embeddings of a text's
tokens (cut or repeated to n, as PEFT does); "SAMPLE_VOCAB" copies the embeddings
of n random vocabulary tokens; "RANDOM" draws N(0, σ²) with σ the standard
deviation of the word embeddings, so the prompt starts on the scale of real tokens
(PEFT draws N(0, 1)). File format: PEFT's PROMPT_TUNING (`prompt_embeddings`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.config import PromptTuningConfig
from slimtune.errors import SlimtuneError

IGNORE_INDEX = -100


def text_token_ids(token_ids: list[int], n: int) -> list[int]:
    """The text's token ids cut to n, or repeated until there are n (PEFT's rule)."""
    if not token_ids:
        raise SlimtuneError("prompt_tuning_init_text tokenizes to no tokens: give a longer text")
    reps = math.ceil(n / len(token_ids))
    return (token_ids * reps)[:n]


def init_prompt(
    word_embeddings: Tensor,
    n: int,
    init: str = "RANDOM",
    token_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The starting soft prompt, (n, d) in float32.

    Args:
        word_embeddings: the model's embedding matrix, (vocab, d).
        n: the number of virtual tokens.
        init: "RANDOM", "SAMPLE_VOCAB" or "TEXT".
        token_ids: the text's token ids for "TEXT".
        generator: the random source for "RANDOM" and "SAMPLE_VOCAB".
    """
    table = word_embeddings.detach().float()  # (V, d)
    if init == "TEXT":
        if token_ids is None:
            raise SlimtuneError("prompt_tuning_init='TEXT' needs the text's token ids")
        ids = torch.tensor(text_token_ids(token_ids, n), device=table.device)
        return table[ids].clone()  # (n, d)
    if init == "SAMPLE_VOCAB":
        ids = torch.randint(0, table.shape[0], (n,), generator=generator).to(table.device)
        return table[ids].clone()  # (n, d)
    noise = torch.randn(n, table.shape[1], generator=generator).to(table.device)
    return noise * table.std()  # (n, d)


def prepend_prompt(
    prompt: Tensor,
    inputs_embeds: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Put the soft prompt before every row: embeddings, mask (ones) and labels (ignored).

    Args:
        prompt: (n, d) soft prompt.
        inputs_embeds: (B, T, d) embeddings of the real tokens.
        attention_mask: (B, T) or None (all ones).
        labels: (B, T) or None.

    Returns:
        (B, n+T, d) embeddings, (B, n+T) mask, (B, n+T) labels or None.
    """
    batch, length = inputs_embeds.shape[:2]
    n = prompt.shape[0]
    virtual = prompt.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, d)
    embeds = torch.cat([virtual, inputs_embeds], dim=1)  # (B, n+T, d)
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    ones = attention_mask.new_ones(batch, n)
    mask = torch.cat([ones, attention_mask], dim=1)  # (B, n+T)
    if labels is not None:
        ignored = labels.new_full((batch, n), IGNORE_INDEX)
        labels = torch.cat([ignored, labels], dim=1)  # (B, n+T)
    return embeds, mask, labels


class PromptTuningModel(nn.Module):
    """A causal LM with a soft prompt in front of its input; attributes fall through to it."""

    def __init__(self, base_model: nn.Module, prompt: Tensor, config: PromptTuningConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.prompt_embeddings = nn.Parameter(prompt.float())  # (n, d), the only trainable tensor
        self.prompt_config = config

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    # the AdapterLayer protocol of slimtune.adapters.layers: one soft prompt, never merged into weights
    def set_adapter(self, names: list[str]) -> None:
        self.prompt_embeddings.requires_grad_(bool(names))

    def delete_adapter(self, name: str) -> None:
        raise SlimtuneError("a soft prompt cannot be deleted from its model; load the base again")

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled:
            raise SlimtuneError("a soft prompt cannot be disabled; use the base model")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def _extend(self, input_ids, inputs_embeds, attention_mask, labels, kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)  # (B, T, d)
        embeds, mask, labels = prepend_prompt(
            self.prompt_embeddings, inputs_embeds, attention_mask, labels
        )
        positions = kwargs.pop("position_ids", None)
        if positions is not None:
            n = self.num_virtual_tokens
            first = torch.arange(n, device=positions.device).expand(positions.shape[0], n)
            kwargs["position_ids"] = torch.cat([first, positions + n], dim=1)  # (B, n+T)
        return embeds, mask, labels

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ):
        """The base model's output on [prompt | tokens]; logits cover the real tokens only."""
        embeds, mask, labels = self._extend(
            input_ids, inputs_embeds, attention_mask, labels, kwargs
        )
        out = self.base_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)
        out.logits = out.logits[:, self.num_virtual_tokens :]  # (B, T, V)
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """The model's `generate` on [prompt | tokens]; returns input_ids followed by new tokens."""
        embeds, mask, _ = self._extend(
            input_ids, kwargs.pop("inputs_embeds", None), attention_mask, None, kwargs
        )
        return self.base_model.generate(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask, **kwargs
        )


def hidden_size(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[1]


def add_prompt_tuning(
    model: nn.Module, config: PromptTuningConfig, tokenizer: Any = None
) -> PromptTuningModel:
    """Freeze the model and put a trainable soft prompt in front of it.

    Args:
        model: a transformers causal LM.
        config: the prompt-tuning configuration.
        tokenizer: tokenizes `prompt_tuning_init_text` for "TEXT" (else loaded from
            `config.tokenizer_name_or_path`).
    """
    d = hidden_size(model)
    if config.token_dim is not None and config.token_dim != d:
        raise SlimtuneError(
            f"soft prompt token_dim={config.token_dim} differs from the model's hidden size {d}"
        )
    token_ids = None
    if config.prompt_tuning_init == "TEXT":
        if tokenizer is None:
            if config.tokenizer_name_or_path is None:
                raise SlimtuneError("prompt_tuning_init='TEXT' needs a tokenizer_name_or_path")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
        token_ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    weight = model.get_input_embeddings().weight
    prompt = init_prompt(weight, config.num_virtual_tokens, config.prompt_tuning_init, token_ids)
    for param in model.parameters():
        param.requires_grad_(False)
    return PromptTuningModel(model, prompt, config)


def peft_config_dict(model: PromptTuningModel) -> dict[str, Any]:
    """adapter_config.json for PEFT's PROMPT_TUNING type."""
    config = model.prompt_config
    base_config = model.base_model.config
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": config.task_type,
        "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": model.prompt_embeddings.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(base_config, "num_attention_heads", None),
        "num_layers": getattr(base_config, "num_hidden_layers", None),
        "prompt_tuning_init": config.prompt_tuning_init,
        "prompt_tuning_init_text": config.prompt_tuning_init_text,
        "tokenizer_name_or_path": config.tokenizer_name_or_path,
        "tokenizer_kwargs": None,
        "inference_mode": True,
        "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
        "revision": None,
        "modules_to_save": None,
    }


def prompt_state_dict(model: PromptTuningModel) -> dict[str, Tensor]:
    """adapter_model.safetensors for PEFT's PROMPT_TUNING type."""
    return {"prompt_embeddings": model.prompt_embeddings.detach().clone()}


def config_from_peft(config_dict: dict[str, Any]) -> PromptTuningConfig:
    """A PromptTuningConfig from a PEFT adapter_config.json (checks what slimtune supports)."""
    submodules = config_dict.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise SlimtuneError(
            f"prompt tuning with num_transformer_submodules={submodules} (encoder-decoder) is not "
            "supported: slimtune prompt tuning is for decoder-only models (1)"
        )
    init = config_dict.get("prompt_tuning_init") or "RANDOM"
    text = config_dict.get("prompt_tuning_init_text")
    return PromptTuningConfig(
        num_virtual_tokens=int(config_dict["num_virtual_tokens"]),
        prompt_tuning_init="RANDOM" if init == "TEXT" and not text else init,
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=config_dict.get("tokenizer_name_or_path"),
        token_dim=config_dict.get("token_dim"),
        task_type=config_dict.get("task_type"),
    )


def check_prompt_state(
    model: nn.Module, config_dict: dict[str, Any], state: dict[str, Tensor]
) -> tuple[PromptTuningConfig, Tensor]:
    """The config and (n, d) prompt of a PEFT (or slimtune) file, checked against the model.

    Raises:
        SlimtuneError: when token_dim or the stored tensor's width differs from the
            model's hidden size, or the tensor is missing.
    """
    if "prompt_embeddings" not in state:
        raise SlimtuneError(f"prompt-tuning file holds no 'prompt_embeddings' (has {list(state)})")
    prompt = state["prompt_embeddings"]  # (n, d)
    d = hidden_size(model)
    token_dim = config_dict.get("token_dim") or prompt.shape[1]
    for width in (token_dim, prompt.shape[1]):
        if width != d:
            raise SlimtuneError(
                f"soft prompt token_dim={width} differs from the model's hidden size {d}"
            )
    n = config_dict.get("num_virtual_tokens")
    if n is not None and prompt.shape[0] != n:
        raise SlimtuneError(
            f"prompt_embeddings has {prompt.shape[0]} rows but num_virtual_tokens={n}"
        )
    config = config_from_peft({**config_dict, "num_virtual_tokens": prompt.shape[0]})
    return config, prompt


def load_prompt_tuning(
    model: nn.Module, config_dict: dict[str, Any], state: dict[str, Tensor]
) -> PromptTuningModel:
    """Wrap a model with a soft prompt read from a PEFT (or slimtune) adapter file."""
    config, prompt = check_prompt_state(model, config_dict, state)
    for param in model.parameters():
        param.requires_grad_(False)
    weight = model.get_input_embeddings().weight
    return PromptTuningModel(model, prompt.to(weight.device), config)


# ----------------------------------------------------------------------------- the table's functions


def add_prompt(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> nn.Module:
    if isinstance(model, PromptTuningModel) or getattr(model, "_slimtune_adapters", None):
        raise SlimtuneError("prompt tuning takes one adapter on a model that carries no other")
    if config.prompt_tuning_init == "TEXT" and config.tokenizer_name_or_path is None:
        source = getattr(getattr(model, "config", None), "_name_or_path", None)
        config = replace(config, tokenizer_name_or_path=source or None)
    return add_prompt_tuning(model, config)


def export_prompt(model: nn.Module, adapter_name: str, config: Any):
    fields = {k: v for k, v in peft_config_dict(model).items() if k != "peft_type"}
    return prompt_state_dict(model), fields, {}


def load_prompt(model: nn.Module, adapter_name: str, config_json, tensors, metadata) -> nn.Module:
    from slimtune.methods.table import add_adapter

    config, prompt = check_prompt_state(model, config_json, tensors)
    model = add_adapter(model, replace(config, prompt_tuning_init="RANDOM"), adapter_name)
    with torch.no_grad():
        model.prompt_embeddings.copy_(prompt)
    model.prompt_config = config  # as the file says (its init already happened)
    model.__dict__["_slimtune_adapters"][adapter_name] = config
    return model


def prepare_prompt(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """`--method prompt`: --num-virtual-tokens N vectors, from --prompt-init TEXT or random."""
    from slimtune.methods.table import add_adapter

    text, count = options.get("prompt_init"), options.get("num_virtual_tokens")
    config = PromptTuningConfig(
        num_virtual_tokens=20 if count is None else count,
        prompt_tuning_init="TEXT" if text else "RANDOM",
        prompt_tuning_init_text=text or None,
        tokenizer_name_or_path=options.get("tokenizer_path"),
    )
    return add_adapter(model, config)
