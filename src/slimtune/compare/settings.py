"""What a comparison runs: the settings every method shares, and the list of runs.

    configs   = base, each method, each extra LoRA rank          (labels: lora, lora-r1, …)
    sweep     = each config at lr · f for f in lr_factors, seed s0   (validation loss decides)
    seeds     = the best lr of each config at seeds s0+1 … s0+N-1     (seed s0 is the sweep's)

Every trained run validates every `eval_every` steps on rows carved from the training data,
and with `patience` > 0 stops once the validation loss has not improved for that many
evaluations in a row (`Plateau`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from slimtune.errors import SlimtuneError

METHODS = ("lora", "qlora", "dora", "ia3", "prompt", "adapter", "full")
# peak learning rate per method (the papers' or PEFT's usual ranges): the centre of the sweep
DEFAULT_LR = {"lora": 1e-3, "qlora": 1e-3, "dora": 1e-3, "ia3": 3e-2, "prompt": 3e-2,
              "adapter": 1e-3, "full": 1e-4}  # fmt: skip
LR_FACTORS = (1 / 3, 1.0, 3.0)  # --lr-sweep without values: a third, the default, three times
MERGEABLE = ("lora", "qlora", "dora", "ia3")
RANKED = ("lora", "qlora", "dora")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareSettings:
    """What every method shares."""

    model: str  # model argument (directory, .gguf or built-in name)
    data: str  # training data
    eval_data: str  # held-out data (the same split for every method)
    hard_eval_data: str | None = None  # a second held-out split (e.g. wordings never trained on)
    methods: tuple[str, ...] = METHODS  # methods to run ("base" is always added)
    ranks: tuple[int, ...] = ()  # LoRA ranks to sweep (besides the lora run's own rank)
    rank: int = 8  # the rank of lora, qlora and dora
    max_steps: int = 40  # optimizer steps per run (the cap when patience > 0)
    batch_size: int = 8  # rows per step
    max_length: int = 256  # tokens per row
    seed: int = 0  # data order and init of the first seed
    seeds: int = 1  # seeds per config at its best lr (mean and spread over them)
    lr_factors: tuple[float, ...] = ()  # lr sweep: default lr times each factor (() = no sweep)
    patience: int = 0  # stop after this many evaluations without a better validation loss
    eval_every: int = 10  # steps between validation evaluations
    val_rows: int = 0  # rows carved from the training data for validation (0: none)
    val_data: str | None = None  # those rows (written by compare; None: no validation)
    device: str | None = None  # "cpu", "cuda"; None: CUDA when there is one
    latency_tokens: int = 16  # tokens generated per latency measurement
    jobs: int = 1  # training runs at a time (each child gets cpu_count / jobs threads)
    lr: dict[str, float] = dataclasses.field(default_factory=dict)  # overrides of DEFAULT_LR

    def base_lr(self, method: str) -> float:
        return self.lr.get(method, DEFAULT_LR[method])


def parse_methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise SlimtuneError(
            f"--methods {text!r}: unknown method {unknown[0] if unknown else '(none)'!r}; "
            f"methods: {', '.join(METHODS)}"
        )
    return names


def parse_ranks(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        ranks = tuple(int(r) for r in text.split(",") if r.strip())
    except ValueError:
        ranks = (0,)
    if not ranks or any(r <= 0 for r in ranks):
        raise SlimtuneError(
            f"--sweep-ranks {text!r}: give comma-separated integers > 0, e.g. 1,2,8,64"
        )
    return ranks


def parse_lr_factors(text: str | None) -> tuple[float, ...]:
    """--lr-sweep's value: comma-separated multipliers of each method's default lr."""
    if text is None:
        return ()
    if text == "default":
        return LR_FACTORS
    try:
        factors = tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        factors = ()
    if len(factors) < 2 or any(not (f > 0 and math.isfinite(f)) for f in factors):
        raise SlimtuneError(
            f"--lr-sweep {text!r}: give two or more multipliers > 0 of each method's "
            "default lr, e.g. 0.33,1,3"
        )
    return tuple(sorted(set(factors)))


def configs(settings: CompareSettings) -> list[dict[str, Any]]:
    """One entry per thing compared: base, each method, each extra LoRA rank."""
    runs = [{"label": "base", "method": "base", "rank": None}]
    runs += [
        {"label": m, "method": m, "rank": settings.rank if m in RANKED else None}
        for m in settings.methods
    ]
    runs += [
        {"label": f"lora-r{r}", "method": "lora", "rank": r}
        for r in settings.ranks
        if not (r == settings.rank and "lora" in settings.methods)
    ]
    return runs


def jobs(settings: CompareSettings) -> list[dict[str, Any]]:
    """The first round of runs: base once, each config at each lr of the sweep, seed s0."""
    runs = []
    for config in configs(settings):
        if config["method"] == "base":
            runs.append({**config, "lr": None, "seed": settings.seed})
            continue
        for lr in lr_candidates(settings, config["method"]):  # a sweep scores held-out later
            runs.append(
                {**config, "lr": lr, "seed": settings.seed, "test": not settings.lr_factors}
            )
    return runs


def lr_candidates(settings: CompareSettings, method: str) -> list[float]:
    base = settings.base_lr(method)
    return [float(f"{base * f:.3g}") for f in settings.lr_factors] or [base]


def seed_jobs(settings: CompareSettings, best_lr: dict[str, float]) -> list[dict[str, Any]]:
    """The second round: every trained config again at its best lr, one run per extra seed."""
    return [
        {**config, "lr": best_lr[config["label"]], "seed": settings.seed + i}
        for config in configs(settings)
        if config["method"] != "base"
        for i in range(1, settings.seeds)
    ]


def run_name(job: dict[str, Any]) -> str:
    """The run's directory under DIR/runs/: label, lr and seed."""
    if job["method"] in ("base", "latency"):
        return job["method"]
    name = f"{job['label']}-lr{job['lr']:g}-s{job['seed']}"
    return name + "-eval" if job.get("eval_of") else name


class Plateau:
    """Early stopping: True once `patience` evaluations in a row brought no better loss.

    A loss counts as better when it is below the best so far by more than `min_delta`
    (relative), so that noise in the last digits does not keep a flat run going.
    """

    def __init__(self, patience: int, min_delta: float = 1e-3) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_step, self.waited = math.inf, 0, 0

    def __call__(self, record: dict[str, Any]) -> bool:
        loss = record["eval_loss"]
        if loss < self.best * (1 - self.min_delta):
            self.best, self.best_step, self.waited = loss, record["step"], 0
        else:
            self.waited += 1
        return self.patience > 0 and self.waited >= self.patience
