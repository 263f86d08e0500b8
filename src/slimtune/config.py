"""Configuration: one frozen dataclass per method, plus the training configuration.

Field names follow Hugging Face PEFT so that users (and adapter_config.json files)
carry over unchanged. Every check lives in `__post_init__` and raises a SlimtuneError
that names the field, the value and what is accepted.
"""

from __future__ import annotations

import math
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
    target_modules: list[str] | str | None = (
        None  # suffixes, a full regex, "all-linear", or None (model default)
    )
    exclude_modules: list[str] | str | None = None  # suffixes or regex never adapted
    layers_to_transform: list[int] | int | None = None  # only these layer indices
    layers_pattern: str | None = None  # name of the layer list ("layers", "h") when ambiguous
    modules_to_save: list[str] | None = (
        None  # modules trained in full and saved (e.g. a classifier)
    )
    bias: Literal["none", "all", "lora_only"] = "none"  # which biases train
    use_rslora: bool = False  # scaling = lora_alpha / sqrt(r)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module regex -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module regex -> alpha
    fan_in_fan_out: bool = False  # base weight stored (in, out), as GPT-2's Conv1D
    init_lora_weights: InitLora = (
        True  # True: Kaiming A, zero B; "gaussian"; "pissa"; "loftq"; False: random B
    )
    use_dora: bool = False  # weight-decomposed LoRA (magnitude vector · direction)
    enable_lora: dict[str, list[bool]] = field(
        default_factory=dict
    )  # fused module suffix -> slices to adapt
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
                name,
                "init_lora_weights",
                self.init_lora_weights,
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


@dataclass(frozen=True, kw_only=True)
class PromptTuningConfig:
    """Prompt tuning: n trainable virtual-token embeddings prepended to the input embeddings."""

    num_virtual_tokens: int = 20  # n, the number of soft-prompt vectors
    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = (
        "RANDOM"  # how the prompt starts
    )
    prompt_tuning_init_text: str | None = (
        None  # the text whose embeddings start the prompt ("TEXT")
    )
    tokenizer_name_or_path: str | None = None  # recorded in the PEFT file (informational)
    token_dim: int | None = None  # hidden size of the model; filled in from the model when None
    task_type: str | None = "CAUSAL_LM"  # PEFT's task type; informational

    def __post_init__(self) -> None:
        name = type(self).__name__
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise _fail(name, "num_virtual_tokens", n, "an integer > 0")
        if self.prompt_tuning_init not in ("RANDOM", "SAMPLE_VOCAB", "TEXT"):
            accepted = "'RANDOM', 'SAMPLE_VOCAB' or 'TEXT'"
            raise _fail(name, "prompt_tuning_init", self.prompt_tuning_init, accepted)
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            accepted = "a non-empty text when prompt_tuning_init='TEXT'"
            raise _fail(name, "prompt_tuning_init_text", self.prompt_tuning_init_text, accepted)
        dim = self.token_dim
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0):
            raise _fail(name, "token_dim", self.token_dim, "an integer > 0 or None")


@dataclass(frozen=True, kw_only=True)
class BottleneckConfig:
    """Houlsby bottleneck adapters: h + W_up f(W_down h) after attention and after the MLP."""

    bottleneck_size: int = 64  # m, the width of the bottleneck (hidden d -> m -> d)
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"  # f
    target_modules: list[str] | None = None  # sub-layer suffixes; None: attention + MLP
    adapter_dropout: float = 0.0  # dropout on the adapter's input, in [0, 1)
    task_type: str | None = "CAUSAL_LM"  # informational

    def __post_init__(self) -> None:
        name = type(self).__name__
        m = self.bottleneck_size
        if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
            raise _fail(name, "bottleneck_size", m, "an integer > 0")
        if self.non_linearity not in ("relu", "gelu", "silu", "tanh"):
            accepted = "'relu', 'gelu', 'silu' or 'tanh'"
            raise _fail(name, "non_linearity", self.non_linearity, accepted)
        if not 0.0 <= float(self.adapter_dropout) < 1.0:
            raise _fail(name, "adapter_dropout", self.adapter_dropout, "a number in [0, 1)")
        if isinstance(self.target_modules, str | tuple):
            value = self.target_modules
            _freeze(self, "target_modules", [value] if isinstance(value, str) else list(value))


@dataclass(frozen=True, kw_only=True)
class IA3Config:
    """IA³: learned vectors that rescale keys, values (outputs) and the MLP's down projection (input)."""

    target_modules: list[str] | str | None = None  # suffixes or a regex; None: model default
    feedforward_modules: list[str] | str | None = None  # targets scaled on their input
    exclude_modules: list[str] | str | None = None  # suffixes or regex never adapted
    fan_in_fan_out: bool = False  # base weight stored (in, out), as GPT-2's Conv1D
    init_ia3_weights: bool = True  # True: vectors start at 1 (the base model); False: random
    modules_to_save: list[str] | None = None  # modules trained in full and saved
    task_type: str | None = None  # PEFT's task type; informational

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field_name in ("target_modules", "feedforward_modules", "exclude_modules"):
            value = getattr(self, field_name)
            if isinstance(value, tuple | set):
                _freeze(self, field_name, sorted(value))
        targets, ff = self.target_modules, self.feedforward_modules
        if isinstance(targets, list) and isinstance(ff, list) and not set(ff) <= set(targets):
            raise _fail(name, "feedforward_modules", ff, f"a subset of target_modules {targets}")


SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
OBJECTIVES = ("sft", "dpo", "orpo")
# each preference setting: (the objective it belongs to, its default)
PREFERENCE_SETTINGS = {"beta": ("dpo", 0.1), "dpo_loss": ("dpo", "sigmoid"),
                       "label_smoothing": ("dpo", 0.0), "orpo_lambda": ("orpo", 0.1)}  # fmt: skip


def _number(value: object) -> float:
    """`value` as a float when it is a number (not a bool); NaN otherwise, which every range
    check refuses (a YAML file can hold a string or a list where a number belongs)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else math.nan


def _check_objective(config: Any) -> None:
    """The objective and its settings; a setting of another objective is an error, not ignored."""
    name = type(config).__name__
    if config.objective not in OBJECTIVES:
        raise _fail(name, "objective", config.objective, "'sft', 'dpo' or 'orpo'")
    if config.dpo_loss not in ("sigmoid", "ipo"):
        raise _fail(name, "dpo_loss", config.dpo_loss, "'sigmoid' or 'ipo'")
    ranges = {
        "beta": (lambda x: x > 0, "a number > 0"),
        "label_smoothing": (lambda x: 0 <= x < 0.5, "a number in [0, 0.5)"),
        "orpo_lambda": (lambda x: x >= 0, "a number >= 0"),
    }
    for key, (ok, accepted) in ranges.items():
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
            raise _fail(name, key, value, accepted)
    for key, (objective, default) in PREFERENCE_SETTINGS.items():
        value = getattr(config, key)
        if value != default and config.objective != objective:
            raise _fail(name, key, value, f"it applies to objective {objective!r} only")
    if config.label_smoothing and config.dpo_loss != "sigmoid":
        accepted = "it applies to dpo_loss 'sigmoid' only"
        raise _fail(name, "label_smoothing", config.label_smoothing, accepted)
    for key in ("packing", "neftune_alpha"):  # rows of SFT data; DPO's reference is noise-free
        if getattr(config, key) and config.objective != "sft":
            raise _fail(name, key, getattr(config, key), "it applies to objective 'sft' only")


REPORT_TO = ("none", "tensorboard")
OPTIMS = ("adamw", "paged", "8bit")
CHECKPOINTING = ("auto", "all", "none", "offload")


def _checkpointing_ok(value: object) -> bool:
    """auto, all, none, offload, or F: the share of decoder layers recomputed (0 < F < 1)."""
    if value in CHECKPOINTING:
        return True
    try:
        return 0.0 < float(value) < 1.0 and not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop: AdamW, a warmup + decay schedule, clipping, accumulation, checkpoints."""

    max_steps: int = 100  # optimizer steps (each one batch_size · grad_accum rows)
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 512  # tokens per row; longer rows are cut (.txt files are packed to it)
    lr: float = 2e-4  # peak learning rate
    schedule: Literal["linear", "cosine", "constant"] = "cosine"  # decay after warmup, to 0
    warmup_steps: int = 0  # steps of linear warmup from 0 to lr
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    adam_beta1: float = 0.9  # AdamW's first-moment decay
    adam_beta2: float = 0.999  # AdamW's second-moment decay
    adam_eps: float = 1e-8  # AdamW's epsilon
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    seed: int = 0  # fixes data order, adapter init and dropout
    save_every: int = 50  # checkpoint every this many steps (0: only the final adapter)
    keep_checkpoints: int = 2  # how many of the latest checkpoints stay on disk
    log_every: int = 1  # append a line to metrics.jsonl every this many steps
    eval_every: int = 0  # evaluate the eval data every this many steps (0: at the end only)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: fp32 on CPU, bf16 autocast on GPU
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: CUDA when there is one
    loss_chunk: int = 1024  # positions per chunk of the output layer in the loss
    group_by_length: bool = True  # batch rows of similar length together (less padding)
    objective: Literal["sft", "dpo", "orpo"] = "sft"  # sft: next tokens; dpo, orpo: pairs
    beta: float = 0.1  # DPO's β: how far the policy may move from the reference (IPO's τ)
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO's -log σ(βΔ), or IPO's square
    label_smoothing: float = 0.0  # cDPO's ε in [0, 0.5): the share of flipped preferences
    orpo_lambda: float = 0.1  # ORPO's λ: the weight of the odds-ratio term beside the SFT loss
    checkpointing: str = "auto"  # auto|all|none|offload|F: layers recomputed (training/memory.py)
    gpu_memory: float | None = None  # GiB the auto plan may use (None: 90% of free GPU memory)
    optim: Literal["adamw", "paged", "8bit"] = "adamw"  # AdamW, paged to CPU, or 8-bit states
    packing: bool = False  # pack rows into max_length sequences; no attention across rows
    neftune_alpha: float = 0.0  # NEFTune: noise alpha/sqrt(L*d) on input embeddings (0: off)
    lora_plus_ratio: float = 0.0  # LoRA+: B matrices train at this x lr (0: off)
    report_to: Literal["none", "tensorboard"] = "none"  # tensorboard: also RUN/tensorboard/

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key in ("max_steps", "batch_size", "grad_accum", "max_length", "keep_checkpoints",
                    "log_every", "loss_chunk"):  # fmt: skip
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise _fail(name, key, value, "an integer > 0")
        for key in ("warmup_steps", "save_every", "eval_every", "seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _fail(name, key, value, "an integer >= 0")
        if not isinstance(self.lr, int | float) or not 0.0 < self.lr <= 1.0:
            raise _fail(name, "lr", self.lr, "a number in (0, 1]")
        if self.schedule not in SCHEDULES:
            raise _fail(name, "schedule", self.schedule, "'linear', 'cosine' or 'constant'")
        if self.precision not in PRECISIONS:
            raise _fail(name, "precision", self.precision, "'auto', 'fp32' or 'bf16'")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= _number(getattr(self, key)) < 1.0:
                raise _fail(name, key, getattr(self, key), "a number in [0, 1)")
        if not _number(self.adam_eps) > 0:
            raise _fail(name, "adam_eps", self.adam_eps, "a number > 0")
        for key in ("weight_decay", "max_grad_norm"):
            if not _number(getattr(self, key)) >= 0:
                raise _fail(name, key, getattr(self, key), "a number >= 0")
        _check_objective(self)
        if not _checkpointing_ok(self.checkpointing):
            raise _fail(
                name,
                "checkpointing",
                self.checkpointing,
                "auto, all, none, offload or a share in (0, 1)",
            )
        if self.gpu_memory is not None and (
            isinstance(self.gpu_memory, bool)
            or not isinstance(self.gpu_memory, int | float)
            or self.gpu_memory <= 0
        ):
            raise _fail(name, "gpu_memory", self.gpu_memory, "a number of GiB > 0")
        if self.optim not in OPTIMS:
            raise _fail(name, "optim", self.optim, "'adamw', 'paged' or '8bit'")
        for key in ("neftune_alpha", "lora_plus_ratio"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise _fail(name, key, value, "a number >= 0 (0: off)")
        if self.report_to not in REPORT_TO:
            raise _fail(name, "report_to", self.report_to, "'none' or 'tensorboard'")
        if not isinstance(self.packing, bool):
            raise _fail(name, "packing", self.packing, "true or false")
