"""Host memory and time of `slimtune merge`: the in-memory merge it ran before (the whole base
loaded in float32, merged, saved) against the streamed merge it runs now (one tensor at a time).

    python bench/merge_memory.py                               # 1B shape, 2 layers (CPU, ~1 min)
    python bench/merge_memory.py --shape 8b --layers 32        # the 8B shape (a GPU machine)

Builds once under --work a random bf16 Llama-shape directory (config dtype bfloat16, shards
of --shard-gb, a word-level tokenizer) and a LoRA adapter r=16 alpha=16 on q,k,v,o,gate,up,
down with non-zero B (PEFT's files). Each path runs as its own process:

    memory    slimtune.cli.merge.merged_model + save_pretrained (the merge before #15)
    streamed  `slimtune merge` (slimtune.export.streamed_merge)

and for each this prints the peak RssAnon (sampled every 20 ms from /proc/PID/status; mapped
safetensors pages are page cache, not the process's own memory), the process's VmHWM (peak
resident, mapped pages included) and the seconds from start to exit, then checks that the two
output directories hold the same tensors. Figures go to bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def status_kib(pid: int | str, field: str) -> int:
    """A memory field of /proc/PID/status in KiB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def build_base(shape: str, layers: int, shard_gb: float, target: Path) -> Path:
    """Random bf16 weights (std 0.02, norms 1), sharded with an index, plus a tokenizer."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(HERE))
    from gpu_command import build_tokenizer
    from gpu_train import llama_config

    if (target / "config.json").is_file():
        return target
    target.mkdir(parents=True)
    config = llama_config(shape)
    config.num_hidden_layers, config.bos_token_id, config.eos_token_id = layers, 1, 2
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, state_dict={})  # config.json (dtype bfloat16), generation config
    state = {k: v for k, v in model.state_dict().items() if k in dict(model.named_parameters())}
    split = split_torch_state_dict_into_shards(state, max_shard_size=int(shard_gb * 2**30))
    gen = torch.Generator().manual_seed(0)
    for name, keys in split.filename_to_tensors.items():
        shard = {}
        for key in keys:
            if key.endswith("norm.weight"):
                shard[key] = torch.ones(state[key].shape, dtype=torch.bfloat16)
            else:
                shard[key] = (torch.randn(state[key].shape, generator=gen) * 0.02).bfloat16()
        save_file(shard, target / name, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    build_tokenizer(config.vocab_size).save_pretrained(target)
    return target


def build_adapter(base: Path, target: Path, r: int = 16) -> Path:
    """A PEFT LoRA directory on every projection of `base`, B non-zero (as after training)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlamaForCausalLM

    if (target / "adapter_config.json").is_file():
        return target
    with torch.device("meta"):
        model = LlamaForCausalLM(AutoConfig.from_pretrained(base))
    gen, tensors = torch.Generator().manual_seed(1), {}
    for name, param in model.named_parameters():
        module = name.removesuffix(".weight")
        if module.rpartition(".")[2] in TARGETS:
            out_features, in_features = param.shape
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_features, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, r, generator=gen) * 0.01
    target.mkdir(parents=True)
    save_file(tensors, target / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": list(TARGETS),
              "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0}  # fmt: skip
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return target


def child(path: str, model: str, adapter: str, out: str) -> None:
    """Run one merge path in this process; print its VmHWM as JSON."""
    if path == "memory":
        from slimtune.cli.merge import merged_model

        merged, tokenizer = merged_model(model, adapter)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    else:
        from slimtune.cli.main import main

        if main(["merge", "--model", model, "--adapter", adapter, "--out", out]) != 0:
            raise SystemExit(1)
    print(json.dumps({"vmhwm_kib": status_kib("self", "VmHWM")}))


def measure(path: str, base: Path, adapter: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", path, str(base), str(adapter), str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, status_kib(proc.pid, "RssAnon"))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    lines = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{path}: exit {proc.returncode}")
    return {"rss_anon_gib": peak / 2**20, "vmhwm_gib": json.loads(lines[-1])["vmhwm_kib"] / 2**20,
            "seconds": seconds}  # fmt: skip


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two directories hold the same tensors (read one at a time)."""
    import torch
    from safetensors import safe_open

    def where(directory: Path) -> dict[str, Path]:
        found = {}
        for file in directory.glob("*.safetensors"):
            with safe_open(file, framework="pt") as handle:
                found |= dict.fromkeys(handle.keys(), file)
        return found

    left, right = where(a), where(b)
    if left.keys() != right.keys():
        return False
    for key in left:
        with safe_open(left[key], "pt") as x, safe_open(right[key], "pt") as y:
            if not torch.equal(x.get_tensor(key), y.get_tensor(key)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=["1b", "8b", "tiny"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shard-gb", type=float, default=0.5, help="the base's shard size")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-merge"))
    parser.add_argument("--child", nargs=4, metavar=("PATH", "MODEL", "ADAPTER", "OUT"))
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    import shutil

    work = args.work / f"{args.shape}-{args.layers}"
    base = build_base(args.shape, args.layers, args.shard_gb, work / "base")
    adapter = build_adapter(base, work / "adapter")
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**30
    print(f"{args.shape} shape, {args.layers} layers: {size:.2f} GiB of bf16 safetensors")
    results = {}
    for path in ("memory", "streamed"):
        shutil.rmtree(work / path, ignore_errors=True)
        results[path] = measure(path, base, adapter, work / path)
        r = results[path]
        print(f"  {path:9s} peak RssAnon {r['rss_anon_gib']:6.2f} GiB   VmHWM "
              f"{r['vmhwm_gib']:6.2f} GiB   {r['seconds']:6.1f} s")  # fmt: skip
    ratio = results["memory"]["rss_anon_gib"] / max(results["streamed"]["rss_anon_gib"], 1e-9)
    print(f"  peak RssAnon memory/streamed: {ratio:.1f}x; "
          f"same tensors: {same_tensors(work / 'memory', work / 'streamed')}")  # fmt: skip


if __name__ == "__main__":
    main()
