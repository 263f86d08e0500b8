"""Forward+backward time of LoRA layers: slimtune vs HF PEFT on SmolLM2-135M, one process.

Both wrap every linear layer (target_modules="all-linear", r=16, lora_alpha=32) of their
own copy of the same base model, run the same batch, and are timed interleaved (the order
alternates each repetition) so that machine noise hits both alike. Prints the median
time per step of each and the ratio PEFT / slimtune (> 1 means slimtune is faster).

    python bench/lora_layer.py                       # CPU, batch 2 × 128 tokens
    python bench/lora_layer.py --device cuda --batch 8 --seq 512 --dtype bf16
    python bench/lora_layer.py --shape-only ...      # random weights, SmolLM2-135M's shapes
                                                     # (for machines without the GGUF package)
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

import slimtune as st
from _timing import SMOLLM2_135M, device_name, median_step_times

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_model(device: str, dtype: torch.dtype, shape_only: bool) -> torch.nn.Module:
    if not shape_only:
        return st.load_model("smollm2-135m", dtype=dtype, device=device)[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device=device, dtype=dtype).eval()


def build(device: str, dtype: torch.dtype, r: int, shape_only: bool = False):
    import peft

    base = base_model(device, dtype, shape_only)
    base.config.use_cache = False
    kwargs = dict(r=r, lora_alpha=2 * r, target_modules="all-linear")
    ours = st.add_adapter(copy.deepcopy(base), st.LoraConfig(**kwargs)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).train()
    if dtype != torch.float32:  # both keep LoRA weights in fp32 (PEFT's autocast_adapter_dtype)
        for model in (ours, theirs):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.data = param.data.float()
    assert st.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    return {"slimtune": ours, "peft": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--shape-only", action="store_true", help="random weights of the same shapes"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    models = build(args.device, DTYPES[args.dtype], args.rank, args.shape_only)
    ids = torch.randint(0, 49152, (args.batch, args.seq), device=args.device)
    medians = median_step_times(models, ids, args.device, args.warmup, args.reps)
    ours, theirs = medians["slimtune"], medians["peft"]
    device = device_name(args.device)
    weights = "random weights, SmolLM2-135M shapes" if args.shape_only else "SmolLM2-135M"
    print(
        f"{weights}, LoRA r={args.rank} on all linear layers, batch {args.batch}×{args.seq}, {args.dtype}, {device}"
    )
    print(f"slimtune  {ours * 1000:8.1f} ms / forward+backward (median of {args.reps})")
    print(f"peft      {theirs * 1000:8.1f} ms / forward+backward")
    print(
        f"ratio     {theirs / ours:8.3f}x  (peft / slimtune; >= 1.0 means slimtune is at least as fast)"
    )


if __name__ == "__main__":
    main()
