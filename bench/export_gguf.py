"""Export the built-in SmolLM2-135M to GGUF (f32, f16, q8_0) and compare perplexities.

    python bench/export_gguf.py [--out runs/export-bench] [--tokens 1024]

Each GGUF is written by `slimtune export` and read back by transformers' own GGUF loader
(the reference reader); perplexity is on the bundled held-out chat data. Prints the export
time, file size and perplexity of each, and the q8_0/f32 perplexity ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from slimtune.cli.main import main
from slimtune.models import load_tokenizer


def heldout_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    lines = resources.files("slimtune").joinpath("demo_data/heldout.jsonl").read_text().splitlines()
    text = "\n".join(
        tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        for line in lines
    )
    return tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]


def perplexity(path: Path, ids: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        return float(torch.exp(model.eval()(ids, labels=ids).loss))


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/export-bench")
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    out = Path(args.out)
    ids = heldout_ids(load_tokenizer("smollm2-135m"), args.tokens)
    results = {}
    for dtype in ("f32", "f16", "q8_0"):
        path = out / f"smollm2-{dtype}.gguf"
        start = time.perf_counter()
        main(["export", "--model", "smollm2-135m", "--format", "gguf", "--dtype", dtype,
              "--out", str(path), "--overwrite"])  # fmt: skip
        seconds = time.perf_counter() - start
        results[dtype] = (seconds, path.stat().st_size / 2**20, perplexity(path, ids))
    for dtype, (seconds, mib, ppl) in results.items():
        print(f"{dtype:5s} export {seconds:5.1f} s  {mib:6.1f} MiB  perplexity {ppl:.4f}")
    print(f"q8_0 / f32 perplexity: {results['q8_0'][2] / results['f32'][2]:.4f} "
          f"on {ids.shape[1]} held-out tokens")  # fmt: skip


if __name__ == "__main__":
    run()
