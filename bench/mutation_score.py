"""`make mutate`: which functions are mutated, and the score of the last run.

    python bench/mutation_score.py --targets     # the mutant name patterns for `mutmut run`
    python bench/mutation_score.py               # killed / tested, and every survivor

The targets are the core math and wiring: LoRA's layer math, NF4, the data masks, the loss
and gradient accumulation, evaluation. docs/testing.md records the score and why each
surviving mutant survives (or the test that now kills it).
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from collections import Counter

LORA = "slimtune.methods.lora.layers."
TARGETS = [
    *(LORA + f"x_{name}__mutmut_*" for name in (
        "_add_lora", "block_diagonal_b", "init_lora_", "lora_delta", "lora_scaling",
        "merge_weight", "unmerge_weight", "pissa_init", "base_weight", "_features")),
    *(LORA + f"xǁ{cls}ǁ{name}__mutmut_*" for cls, name in (
        ("LoraLinear", "forward"), ("LoraLinear", "delta_weight"), ("LoraLinear", "full_b"),
        ("LoraFusedLinear", "full_b"), ("LoraEmbedding", "forward"),
        ("LoraEmbedding", "delta_weight"), ("LoraLayer", "merge"), ("LoraLayer", "unmerge"))),
    "slimtune.quant.nf4.*",
    *(f"slimtune.training.data.x_{name}__mutmut_*" for name in (
        "tokenize_prompt_completion", "tokenize_messages", "tokenize_text", "collate",
        "truncate_examples", "pack_text_file")),
    "slimtune.training.loss.x_causal_lm_loss__mutmut_*",
    "slimtune.training.loss.x_kept_rows__mutmut_*",
    "slimtune.training.loss.x_rows_by_host_index__mutmut_*",
    "slimtune.training.loss.x_dataset_loss__mutmut_*",
    "slimtune.training.loop.x_train_step__mutmut_*",
    "slimtune.training.loop.x_lr_factor__mutmut_*",
    *(f"slimtune.evaluate.x_{name}__mutmut_*" for name in (
        "sliding_windows", "exact_match_pairs", "greedy_continuations", "exact_match",
        "evaluate")),
    *(f"slimtune.training.memory.x_{name}__mutmut_*" for name in (
        "layers_to_keep", "choose_recomputation", "hold_dequantized")),
    "slimtune.training.memory.xǁMemoryPlanǁrebuilt_choice__mutmut_*",
    "slimtune.training.memory.xǁMemoryPlanǁrelease__mutmut_*",
    "slimtune.kernels.lora.xǁFrozenWeightǁ*__mutmut_*",
    "slimtune.kernels.lora.xǁ_FusedLoraLinearǁ*__mutmut_*",
    "slimtune.training.objectives.*",
    "slimtune.training.packing.*",
    "slimtune.quant.blockwise.*",
]  # fmt: skip


def results() -> dict[str, str]:
    """{mutant name: status} of the selected mutants, from `mutmut results --all true`."""
    done = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = {}
    for line in done.stdout.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name and any(fnmatch.fnmatch(name, t) for t in TARGETS):
            found[name] = status
    return found


def main() -> None:
    if sys.argv[1:] == ["--targets"]:
        print(" ".join(TARGETS))
        return
    found = results()
    counts = Counter(found.values())
    tested = counts["killed"] + counts["survived"] + counts["timeout"]
    killed = counts["killed"] + counts["timeout"]  # a mutant that hangs the tests is caught
    print(", ".join(f"{status} {n}" for status, n in sorted(counts.items())))
    print(f"mutation score: {killed} of {tested} killed ({100 * killed / max(tested, 1):.1f}%)")
    for name, status in sorted(found.items()):
        if status in ("survived", "no tests"):
            print(f"  {status}: {name}")


if __name__ == "__main__":
    main()
