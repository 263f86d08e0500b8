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
import statistics
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimtune as st

# SmolLM2-135M's architecture (its config.json): timing depends on shapes, not on values
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0,
)  # fmt: skip
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


def step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    for param in model.parameters():
        param.grad = None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.warmup + args.reps):
        order = list(models) if rep % 2 == 0 else list(models)[::-1]
        for name in order:
            sync(args.device)
            start = time.perf_counter()
            step(models[name], ids)
            sync(args.device)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    ours, theirs = statistics.median(times["slimtune"]), statistics.median(times["peft"])
    on_cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"DoRA r={args.rank} on {', '.join(TARGETS)}; SmolLM2-135M shapes, {args.layers} layers, "
          f"random weights; batch {args.batch}x{args.seq}, fp32, {device}")  # fmt: skip
    print(f"slimtune  {ours * 1000:8.1f} ms / forward+backward (median of {args.reps})")
    print(f"peft      {theirs * 1000:8.1f} ms / forward+backward")
    print(f"ratio     {theirs / ours:8.3f}x  (peft / slimtune; > 1 means slimtune is faster)")


if __name__ == "__main__":
    main()
