"""Configuration: one frozen dataclass per method, plus the training configuration.

Field names follow Hugging Face PEFT so that users (and adapter_config.json files)
carry over unchanged. Every check lives in `__post_init__` and raises a SlimtuneError
that names the field, the value and what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from slimtune.errors import SlimtuneError

InitLora = bool | Literal["gaussian", "pissa", "loftq"]


def _fail(cls: str, name: str, value: Any, accepted: str) -> SlimtuneError:
    return SlimtuneError(f"{cls}.{name}={value!r} is not accepted: {accepted}")


def _freeze(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA (and DoRA): h = W0 x + scaling · B A x, scaling = lora_alpha / r (or / √r)."""

    r: int = 8  # rank of A (r×in) and B (out×r)
    lora_alpha: float = 8  # scaling numerator: scaling = lora_alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter's input, in [0, 1)
    target_modules: list[str] | str | None = None  # suffixes, a full regex, "all-linear", or None (model default)
    exclude_modules: list[str] | str | None = None  # suffixes or regex never adapted
    layers_to_transform: list[int] | int | None = None  # only these layer indices
    layers_pattern: str | None = None  # name of the layer list ("layers", "h") when ambiguous
    modules_to_save: list[str] | None = None  # modules trained in full and saved (e.g. a classifier)
    bias: Literal["none", "all", "lora_only"] = "none"  # which biases train
    use_rslora: bool = False  # scaling = lora_alpha / sqrt(r)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module regex -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module regex -> alpha
    fan_in_fan_out: bool = False  # base weight stored (in, out), as GPT-2's Conv1D
    init_lora_weights: InitLora = True  # True: Kaiming A, zero B; "gaussian"; "pissa"; "loftq"; False: random B
    use_dora: bool = False  # weight-decomposed LoRA (magnitude vector · direction)
    enable_lora: dict[str, list[bool]] = field(default_factory=dict)  # fused module suffix -> slices to adapt
    task_type: str | None = None  # PEFT's task type ("CAUSAL_LM", "SEQ_CLS"); informational

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise _fail(name, "r", self.r, "an integer > 0")
        if not isinstance(self.lora_alpha, int | float) or self.lora_alpha <= 0:
            raise _fail(name, "lora_alpha", self.lora_alpha, "a number > 0")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise _fail(name, "lora_dropout", self.lora_dropout, "a number in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            raise _fail(name, "bias", self.bias, "'none', 'all' or 'lora_only'")
        if self.init_lora_weights not in (True, False, "gaussian", "pissa", "loftq"):
            raise _fail(
                name, "init_lora_weights", self.init_lora_weights,
                "True, False, 'gaussian', 'pissa' or 'loftq'",
            )
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise _fail(name, f"rank_pattern[{key!r}]", rank, "an integer > 0")
        for key, alpha in self.alpha_pattern.items():
            if not isinstance(alpha, int | float) or alpha <= 0:
                raise _fail(name, f"alpha_pattern[{key!r}]", alpha, "a number > 0")
        for key, mask in self.enable_lora.items():
            if not mask or not any(mask):
                raise _fail(name, f"enable_lora[{key!r}]", mask, "a list of booleans with one True")
        if isinstance(self.layers_to_transform, int):
            _freeze(self, "layers_to_transform", [self.layers_to_transform])
        if isinstance(self.target_modules, tuple):
            _freeze(self, "target_modules", list(self.target_modules))
