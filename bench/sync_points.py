"""Where a training step waits for the GPU: each synchronizing call of a short `slimtune.train`
run on CUDA (torch.cuda.set_sync_debug_mode), with the frames that made it and how often.

    python bench/sync_points.py [--steps 6] [--method lora|qlora] [--padded]

A step that never waits lets the host queue the next step while the GPU runs this one; a
count that grows with --steps is a wait inside every step.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

import slimtune as st
from slimtune.config import TrainConfig
from slimtune.models import load_model
from slimtune.training.loop import train


def frames() -> str:
    """The innermost frames of slimtune, transformers and torch.nn that led here."""
    keep = [
        f"{Path(f.filename).name}:{f.lineno} {f.name}"
        for f in traceback.extract_stack()[:-3]
        if any(k in f.filename for k in ("slimtune", "transformers", "torch/nn", "torch/optim"))
    ]
    return " <- ".join(reversed(keep[-5:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--method", default="lora")
    p.add_argument("--padded", action="store_true", help="rows of different lengths")
    args = p.parse_args()
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp = Path(tempfile.mkdtemp())
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp / "model")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 1000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp / "model")  # fmt: skip
    rows = [{"text": " ".join(f"w{3 + (i * 7 + j) % 990}" for j in range(300 - (i * 37) % 200 * args.padded))}
            for i in range(64)]  # fmt: skip
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tokenizer = load_model(tmp / "model", dtype=torch.bfloat16, device="cuda",
                                  quantize="nf4" if args.method == "qlora" else None)  # fmt: skip
    model = st.add_adapter(model, st.LoraConfig(r=8, target_modules="all-linear"))
    config = TrainConfig(max_steps=args.steps, batch_size=4, max_length=256, save_every=0)
    seen = collections.Counter()
    original = warnings.showwarning

    def record(message, *rest, **kw):
        if "synchroniz" in str(message):
            seen[frames()] += 1
        else:
            original(message, *rest, **kw)

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        train(model, tokenizer, tmp / "d.jsonl", config, tmp / "run", quiet=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"{sum(seen.values())} waits in {args.steps} steps ({args.method}, padded={args.padded})")
    for where, n in seen.most_common():
        print(f"{n:4d}  {where}")


if __name__ == "__main__":
    main()
