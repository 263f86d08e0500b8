"""No silent no-ops: an option the chosen method (or command) would not read is an error.

    slimtune train --method lora --quant nf4    ->  --quant nf4 needs --method qlora
    slimtune train --eval-every 5               ->  --eval-every 5 needs --eval-data

The same holds for keys of a --config file (the message names the file, line and key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError

LORA = ("rank", "alpha", "dropout", "target_modules")
# the options of `slimtune train` each method reads (methods/*.py, prepare_*)
READS: dict[str, tuple[str, ...]] = {
    "lora": LORA,
    "qlora": (*LORA, "quant"),
    "dora": LORA,
    "ia3": ("target_modules",),
    "prompt": ("num_virtual_tokens", "prompt_init"),
    "adapter": ("target_modules", "bottleneck_size"),
    "full": (),
}
METHOD_OPTIONS = sorted(set().union(*READS.values()))


def given(key: str, value: Any, sources: list[tuple[str, dict[str, Any]]]) -> str:
    """How the user gave `key`: '--rank 4', or 'run.yaml:3: rank: 4'."""
    from slimtune.cli.yaml_lines import yaml_line

    for source, options in reversed(sources):
        if key in options:
            if source == "flag":
                return f"--{key.replace('_', '-')} {value}"
            line = yaml_line(Path(source), key)
            return f"{source}{f':{line}' if line else ''}: {key}: {value}"
    return f"--{key.replace('_', '-')} {value}"


def check_train_options(
    run: dict[str, Any], config: TrainConfig, sources: list[tuple[str, dict[str, Any]]]
) -> None:
    """Refuse an option that `run['method']` (or the rest of the run) would ignore."""
    method = run.get("method")
    reads = READS.get(method)  # a method registered at run time: its options are its own
    for key in METHOD_OPTIONS if reads is not None else ():
        if run.get(key) is not None and key not in reads:
            users = " or ".join(m for m, keys in READS.items() if key in keys)
            raise SlimtuneError(
                f"{given(key, run[key], sources)} needs --method {users} "
                f"(--method {method} does not use it)"
            )
    if method == "adapter" and run.get("target_modules") == "all-linear":
        raise SlimtuneError(
            f"{given('target_modules', 'all-linear', sources)} is not for --method adapter: "
            "it adds one adapter after a block's attention and MLP; name those sub-layers "
            "(e.g. self_attn,mlp) or leave the option out"
        )
    if config.eval_every and not run.get("eval_data"):
        raise SlimtuneError(f"{given('eval_every', config.eval_every, sources)} needs --eval-data")
