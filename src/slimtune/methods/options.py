"""The command line's method flags, shared by the methods' `prepare` functions.

`options` is a dict of the flags of `slimtune train` (rank, alpha, dropout, target_modules,
quant, num_virtual_tokens, prompt_init, tokenizer_path, bottleneck_size, base_model).
"""

from __future__ import annotations

from slimtune.errors import SlimtuneError


def parse_targets(value: str | list[str] | None) -> list[str] | str | None:
    """'q_proj,v_proj' -> ['q_proj', 'v_proj']; 'all-linear' stays a string."""
    if value is None or isinstance(value, list):
        return value
    if value.strip() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise SlimtuneError(f"--target-modules {value!r}: give comma-separated module names")
    return names
