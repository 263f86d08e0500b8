"""Export the built-in SmolLM2-135M to every GGUF type and measure size and perplexity.

    python bench/export_gguf.py [--out runs/export-bench] [--tokens 1024] [--types f16,q4_k_m]

f32, f16, bf16 and q8_0 are written by `slimtune export`; the llama.cpp types by the second step
of `slimtune export --dtype T` alone (llama.cpp's quantizer on the f16 file, `quantize_gguf`;
needs the llamacpp extra), so the model is not reloaded for each. Every file is run by llama.cpp
itself (llama-cpp-python) on the bundled held-out chat data, chat-rendered; perplexity =
exp(mean next-token NLL). Prints the time, file size, perplexity and its ratio to f16 per type,
and the Q8_0 encoder's speed (gguf-py's numpy quantizer, the one slimtune uses) on SmolLM2's MLP
shape.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import numpy as np

from slimtune.cli.main import main
from slimtune.export.quantize import LLAMACPP_TYPES, quantize_gguf
from slimtune.models import load_tokenizer

TYPES = ("f32", "f16", "bf16", "q8_0", *LLAMACPP_TYPES)


def heldout_ids(tokenizer, n_tokens: int) -> list[int]:
    lines = resources.files("slimtune").joinpath("demo_data/heldout.jsonl").read_text().splitlines()
    text = "\n".join(
        tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        for line in lines
    )
    return tokenizer(text)["input_ids"][:n_tokens]


def llamacpp_perplexity(path: Path, ids: list[int]) -> float:
    """exp(mean -log p(token | prefix)) over `ids`, computed by llama.cpp."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(ids) + 8, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T-1, V)
    finally:
        llm.close()
    peak = logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
    nll = logz - logits[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def q8_0_speed() -> float:
    """Seconds to Q8_0-encode a (1536, 576) float32 matrix with gguf.quants (best of 3)."""
    import gguf
    import gguf.quants

    w = np.random.default_rng(0).standard_normal((1536, 576), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
        best = min(best, time.perf_counter() - start)
    return best


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/export-bench")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--types", default=",".join(TYPES))
    args = parser.parse_args()
    out = Path(args.out)
    ids = heldout_ids(load_tokenizer("smollm2-135m"), args.tokens)
    results = {}
    types = args.types.split(",")
    for dtype in ["f16"] + [t for t in types if t != "f16"]:  # f16 first: the others' source
        path = out / f"smollm2-{dtype}.gguf"
        start = time.perf_counter()
        if dtype in LLAMACPP_TYPES:
            quantize_gguf(out / "smollm2-f16.gguf", path, dtype)
        else:
            main(["export", "--model", "smollm2-135m", "--format", "gguf", "--dtype", dtype,
                  "--out", str(path), "--overwrite"])  # fmt: skip
        seconds = time.perf_counter() - start
        results[dtype] = (seconds, path.stat().st_size / 2**20, llamacpp_perplexity(path, ids))
    base = results["f16"][2]
    print(f"SmolLM2-135M, {len(ids)} held-out tokens, perplexity by llama.cpp")
    print("type    export s   MiB      perplexity  / f16")
    for dtype, (seconds, mib, ppl) in results.items():
        print(f"{dtype:7s} {seconds:7.1f}  {mib:7.1f}  {ppl:10.4f}  {ppl / base:6.4f}")
    print(f"q8_0 encode (gguf.quants) of a 1536x576 matrix: {q8_0_speed() * 1000:.1f} ms")


if __name__ == "__main__":
    run()
