"""Forward+backward time of DoRA: slimtune vs HF PEFT on SmolLM2-135M's shapes, one process.

DoRA (arXiv:2402.09353) recomputes the row norms of W0 + s·B A in every forward, which
makes it slower than LoRA; PEFT builds B A by pushing an identity matrix through both
adapter layers (B(A(I))), slimtune multiplies the two small matrices. Both libraries
wrap the same linear layers (r=16, lora_alpha=32, use_dora=True) of their own copy of
the same base model and run the same batch, timed interleaved (the order alternates
each repetition) so that machine noise hits both alike. Prints the median time per
step of each and the ratio PEFT / slimtune (> 1 means slimtune is faster).

    python bench/dora.py                          # CPU, SmolLM2-135M shapes, 4 layers
    python bench/dora.py --layers 30 --device cuda --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimtune as st
from _timing import SMOLLM2_135M, device_name, median_step_times

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(device: str, layers: int, r: int) -> dict[str, torch.nn.Module]:
    import peft

    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    base = LlamaForCausalLM(config).to(device).eval()
    base.config.use_cache = False
    kwargs = dict(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=True)
    ours = st.add_adapter(copy.deepcopy(base), st.LoraConfig(**kwargs)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).train()
    assert st.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    return {"slimtune": ours, "peft": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (SmolLM2: 30)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    models = build(args.device, args.layers, args.rank)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq), device=args.device)
    medians = median_step_times(models, ids, args.device, args.warmup, args.reps)
    ours, theirs = medians["slimtune"], medians["peft"]
    device = device_name(args.device)
    print(f"DoRA r={args.rank} on {', '.join(TARGETS)}; SmolLM2-135M shapes, {args.layers} layers, "
          f"random weights; batch {args.batch}x{args.seq}, fp32, {device}")  # fmt: skip
    print(f"slimtune  {ours * 1000:8.1f} ms / forward+backward (median of {args.reps})")
    print(f"peft      {theirs * 1000:8.1f} ms / forward+backward")
    print(f"ratio     {theirs / ours:8.3f}x  (peft / slimtune; > 1 means slimtune is faster)")


if __name__ == "__main__":
    main()
