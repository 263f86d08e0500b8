"""The shipped command on a GPU: `slimtune train` as a user runs it, against PEFT (+ bitsandbytes).

Builds a random-weight Llama directory (sharded bf16 safetensors, a word-level tokenizer of
the model's vocabulary) and a JSONL of rows of more than --seq tokens, then runs each spec
as its own process and reads what it left behind:

    tok/s            median of the per-step tokens/s of steps 3..N (metrics.jsonl)
    peak GPU GiB     torch.cuda.max_memory_allocated of the process (summary.json)
    host anon GiB    peak RssAnon of the process, sampled every 50 ms (mapped safetensors
                     pages are page cache, not the process's own)
    start s          from starting the process to the first step's metrics line

    python bench/gpu_command.py --shape 8b --runs slim:qlora:all,slim:qlora:auto,peft:qlora
    python bench/gpu_command.py --shape 1b --runs slim:qlora:all,peft:qlora,slim:lora:all,peft:lora

Specs: slim:METHOD:CHECKPOINTING[:GIB] (`slimtune train --checkpointing CHECKPOINTING
[--gpu-memory GIB]`), peft:METHOD (transformers + PEFT, bitsandbytes NF4 + double quant for
qlora; bf16 autocast and gradient checkpointing, as HF Trainer(bf16=True) runs it; the same
rows in the same order, from slimtune's data pipeline). Every run: LoRA r=16 alpha=16,
dropout 0, on q,k,v,o,gate,up,down; AdamW lr 2e-4, constant; clipping at 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SHARD_BYTES = 5 * 2**30


def build_model_dir(shape: str, target: Path, seed: int = 0) -> Path:
    """Random bf16 weights (std 0.02, norms 1) saved in shards with an index, plus a tokenizer."""
    import torch
    from safetensors.torch import save_file

    from gpu_train import llama_config

    if (target / "model.safetensors.index.json").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    config = llama_config(shape)
    config.bos_token_id, config.eos_token_id = 1, 2
    config.save_pretrained(target)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, target / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, n = {}, 0, n + 1

    for key, shape_ in shapes.items():
        if key.endswith("norm.weight"):
            value = torch.ones(shape_, dtype=torch.bfloat16)
        else:
            value = torch.randn(shape_, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
        shard[key] = value.cpu()
        size += value.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    index = {
        "metadata": {"total_size": sum(s.numel() * 2 for s in shapes.values())},
        "weight_map": weight_map,
    }
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    build_tokenizer(config.vocab_size).save_pretrained(target)
    return target


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer: '<unk>' '<s>' '</s>' then the words w3 … w{vocab-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


def build_data(path: Path, vocab: int, rows: int, seq: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(
                json.dumps(
                    {"text": " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(seq + 8))}
                )
                + "\n"
            )
    return path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def rss_anon_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], out: Path, log: Path) -> dict:
    """Run `cmd`, sampling RssAnon, until it exits; read metrics.jsonl and summary.json."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    peak_kib, first_step = 0, None
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        peak_kib = max(peak_kib, rss_anon_kib(proc.pid))
        if first_step is None and metrics.is_file() and metrics.stat().st_size > 0:
            first_step = time.perf_counter() - start
        time.sleep(0.05)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        return {
            "failed": text.strip().splitlines()[-1][:300]
            if text.strip()
            else f"exit {proc.returncode}"
        }
    records = [json.loads(x) for x in metrics.open() if x.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    summary = json.loads((out / "summary.json").read_text())
    plan = (summary.get("memory") or {}).get("line", "")
    return {
        "tok_s": statistics.median(r["tokens_per_s"] for r in steps[2:] or steps),
        "peak_gib": summary["peak_memory_mb"] / 1024,
        "host_anon_gib": peak_kib / 2**20,
        "start_s": first_step,
        "wall_s": wall,
        "losses": [r["loss"] for r in steps],
        "plan": plan,
        "trainable": summary.get("trainable_params"),
    }


def slim_command(method: str, checkpointing: str, gib: str | None, args, out: Path) -> list[str]:
    config = {
        "model": str(args.model_dir), "data": str(args.data), "out": str(out), "method": method,
        "max_steps": args.steps, "batch_size": args.batch, "max_length": args.seq, "rank": 16,
        "alpha": 16, "dropout": 0.0, "target_modules": TARGETS, "lr": 2e-4, "schedule": "constant",
        "save_every": 0, "checkpointing": checkpointing, "seed": 0,
    }  # fmt: skip
    if gib:
        config["gpu_memory"] = float(gib)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return [
        sys.executable,
        "-m",
        "slimtune",
        "train",
        "--config",
        str(path),
        "--overwrite",
        "--quiet",
    ]


def peft_child(
    method: str, model_dir: Path, data: Path, out: Path, steps: int, batch: int, seq: int
) -> None:
    """What a PEFT user runs: from_pretrained (+ BitsAndBytesConfig), LoRA, bf16 autocast."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from slimtune.training.data import batches_from, load_dataset

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset(data, tokenizer, seq, quiet=True)
    kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0}}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    config = peft.LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS.split(",")
    )
    model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    batches = batches_from(dataset, batch, 0, tokenizer.pad_token_id)
    model.train()
    with (out / "metrics.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            b = {k: v.cuda() for k, v in next(batches).items()}
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = loss.item()
            tokens = int(b["attention_mask"].sum())
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": value,
                        "tokens_per_s": tokens / (time.perf_counter() - t0),
                    }
                )
                + "\n"
            )
            f.flush()
    summary = {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
               "trainable_params": sum(p.numel() for p in params)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary))


def print_table(shape: str, results: list[tuple[str, dict]], tflops: float, args) -> None:
    import torch

    from gpu_train import flops_per_token

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{card}, shape {shape}, batch {args.batch}x{args.seq}, {args.steps} steps; "
          f"matmul {tflops:.0f} TFLOP/s")  # fmt: skip
    print(
        "| run | tok/s | peak GPU GiB | host anon GiB | start→step 1 s | MFU | loss 1 | loss last | plan |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    refs = {
        spec.split(":")[1]: r for spec, r in results if spec.startswith("peft:") and "tok_s" in r
    }
    for spec, r in results:
        if "tok_s" not in r:
            print(f"| {spec} | FAILED: {r.get('failed')} |")
            continue
        mfu = flops_per_token(shape, args.seq, r["trainable"] or 0) * r["tok_s"] / (tflops * 1e12)
        print(f"| {spec} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | {r['host_anon_gib']:.2f} | "
              f"{r['start_s'] or float('nan'):.1f} | {mfu:.0%} | {r['losses'][0]:.4f} | "
              f"{r['losses'][-1]:.4f} | {r['plan']} |")  # fmt: skip
    for spec, r in results:
        ref = refs.get(spec.split(":")[1])
        if ref is not None and "losses" in r and r is not ref:
            d = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"], strict=False))
            print(f"max relative per-step loss difference {spec} vs peft: {d:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1b", choices=("8b", "1b", "tiny"))
    p.add_argument("--runs", default="slim:qlora:all,slim:qlora:auto,peft:qlora")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slimtune-bench"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--peft-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peft_child:
        return peft_child(
            args.peft_child, args.model_dir, args.data, args.out, args.steps, args.batch, args.seq
        )
    from gpu_train import llama_config, matmul_tflops

    t0 = time.perf_counter()
    args.model_dir = build_model_dir(args.shape, args.workdir / f"model-{args.shape}")
    vocab = llama_config(args.shape).vocab_size
    args.data = build_data(
        args.workdir / f"data-{args.shape}.jsonl", vocab, args.batch * args.steps + 8, args.seq
    )
    print(f"model directory and data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    tflops = matmul_tflops("cuda" if _cuda() else "cpu")
    results = []
    for spec in args.runs.split(","):
        impl, method, *rest = spec.split(":")
        out = args.workdir / "runs" / spec.replace(":", "-")
        shutil.rmtree(out, ignore_errors=True)  # an old metrics.jsonl would end the start clock
        out.parent.mkdir(parents=True, exist_ok=True)
        if impl == "slim":
            cmd = slim_command(
                method, rest[0] if rest else "auto", rest[1] if len(rest) > 1 else None, args, out
            )
        else:
            cmd = [sys.executable, __file__, "--peft-child", method, "--model-dir", str(args.model_dir),
                   "--data", str(args.data), "--out", str(out), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip
        r = measure(cmd, out, out.parent / f"{out.name}.log")
        results.append((spec, r))
        print(spec, json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    print_table(args.shape, results, tflops, args)
    if args.json:
        args.json.write_text(
            json.dumps({"shape": args.shape, "tflops": tflops, "results": results}, indent=1)
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
