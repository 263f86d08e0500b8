"""Held-out perplexity of SmolLM2-135M with its linear layers quantized: slimtune vs bitsandbytes.

    python bench/quant_quality.py [--max-tokens 2048] [--loftq-rank 16] [--json FILE]

Every linear layer except lm_head (tied to the embeddings) is quantized; bits per
parameter count every stored byte of those layers (codes and all statistics). slimtune
runs its own QuantLinear layers; bitsandbytes (CPU) quantizes the same weights, which are
dequantized with its kernel and evaluated in plain nn.Linear layers. The text,
bench/data/heldout.txt, was written for this project and is in no training set.
LoftQ (arXiv:2310.08659) rows show step 0 of QLoRA with A, B from the quantization error.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

import slimtune as st
from slimtune.quant.linear import quantized_layers

TEXT = Path(__file__).parent / "data" / "heldout.txt"
VARIANTS = [  # (label, quant, double_quant)
    ("int8", "int8", False),
    ("NF4 + double quant", "nf4", True),
    ("NF4", "nf4", False),
    ("FP4 + double quant", "fp4", True),
]


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, chunk: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `chunk` tokens."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, chunk):
        window = ids[start : start + chunk + 1].view(1, -1)  # (1, T + 1)
        logits = model(window[:, :-1]).logits  # (1, T, V)
        nll = nn.functional.cross_entropy(logits[0].float(), window[0, 1:], reduction="sum")
        total, count = total + nll.item(), count + window.shape[1] - 1
    return math.exp(total / count)


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"}


def slimtune_variant(base: nn.Module, quant: str, dq: bool) -> tuple[nn.Module, float, float]:
    """(quantized copy, bits per parameter, seconds to quantize)."""
    model = copy.deepcopy(base)
    start = time.perf_counter()
    st.quantize_model(model, quant, double_quant=dq)
    seconds = time.perf_counter() - start
    layers = quantized_layers(model).values()
    bits = (
        8
        * sum(m.quant_state.nbytes for m in layers)
        / sum(m.in_features * m.out_features for m in layers)
    )
    return model, bits, seconds


def bnb_variant(base: nn.Module, quant: str, dq: bool) -> tuple[nn.Module, float, float]:
    """(copy with bitsandbytes-quantized-then-dequantized weights, bits per parameter,
    seconds spent in bitsandbytes' quantize calls)."""
    import bitsandbytes.functional as F

    model = copy.deepcopy(base)
    stored, params, seconds = 0, 0, 0.0
    for layer in linears(model).values():
        w = layer.weight.data
        start = time.perf_counter()
        if quant == "int8":
            codes, stats, cols = F.int8_vectorwise_quant(w.clone(), threshold=6.0)
            seconds += time.perf_counter() - start
            deq = F.int8_vectorwise_dequant(codes, stats)
            if cols is not None and cols.numel():
                deq[:, cols] = w[:, cols].half().float()  # outlier columns kept in 16 bits
            tensors = [codes, stats] + ([cols, w[:, cols].half()] if cols is not None else [])
        else:
            packed, state = F.quantize_4bit(
                w, blocksize=64, compress_statistics=dq, quant_type=quant
            )
            seconds += time.perf_counter() - start
            deq = F.dequantize_4bit(packed, state)
            tensors = [packed, state.absmax] + ([state.state2.absmax, state.offset] if dq else [])
        layer.weight.data = deq.to(w.dtype)
        stored += sum(t.numel() * t.element_size() for t in tensors)
        params += w.numel()
    return model, 8 * stored / params, seconds


def same_weights(ours: nn.Module, theirs: nn.Module) -> bool:
    mine = quantized_layers(ours)
    return all(
        torch.equal(mine[n].dequantize_weight(torch.float32), m.weight.data)
        for n, m in linears(theirs).items()
    )


def loftq_variant(base: nn.Module, rank: int) -> nn.Module:
    """QLoRA at step 0 with LoftQ: A, B from the NF4 error of every linear layer, then NF4."""
    model = copy.deepcopy(base)
    config = st.LoraConfig(
        r=rank, lora_alpha=rank, target_modules="all-linear", init_lora_weights="loftq"
    )
    st.add_adapter(model, config)
    return st.quantize_model(model, "nf4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--loftq-rank", type=int, default=16)
    parser.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes columns")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = st.load_model("smollm2-135m")
    ids = torch.tensor(tokenizer(TEXT.read_text())["input_ids"][: args.max_tokens])
    rows = [{"variant": "fp32", "bits": 32.0, "ppl": perplexity(base, ids, args.chunk)}]
    for label, quant, dq in VARIANTS:
        model, bits, seconds = slimtune_variant(base, quant, dq)
        row = {
            "variant": label,
            "bits": bits,
            "ppl": perplexity(model, ids, args.chunk),
            "quantize_s": seconds,
        }
        if not args.no_bnb:
            theirs, bnb_bits, bnb_seconds = bnb_variant(base, quant, dq)
            row |= {"bnb_bits": bnb_bits, "bnb_ppl": perplexity(theirs, ids, args.chunk)}
            row["bnb_quantize_s"] = bnb_seconds
            row["identical"] = same_weights(model, theirs)
        rows.append(row)
        del model
    loftq = loftq_variant(base, args.loftq_rank)
    nf4_bits = rows[2]["bits"]
    rows.append(
        {
            "variant": f"NF4 + double quant + LoftQ r={args.loftq_rank} (step 0)",
            "bits": nf4_bits,
            "ppl": perplexity(loftq, ids, args.chunk),
        }
    )
    print(table(rows, ids.numel()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def table(rows: list[dict], tokens: int) -> str:
    lines = [
        f"Held-out perplexity, SmolLM2-135M, {tokens} tokens of bench/data/heldout.txt "
        "(bits: per parameter of the quantized linear layers)",
        "",
        "| weights | bits/param | perplexity | bitsandbytes bits/param | bitsandbytes perplexity "
        "| same weights | quantize time (slimtune / bitsandbytes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bnb = (
            [f"{r['bnb_bits']:.3f}", f"{r['bnb_ppl']:.3f}", "yes" if r["identical"] else "NO"]
            if "bnb_ppl" in r
            else ["", "", ""]
        )
        secs = f"{r['quantize_s']:.1f} s" if "quantize_s" in r else ""
        if "bnb_quantize_s" in r:
            secs += f" / {r['bnb_quantize_s']:.1f} s"
        lines.append(
            f"| {r['variant']} | {r['bits']:.3f} | {r['ppl']:.3f} | {' | '.join(bnb)} | {secs} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
