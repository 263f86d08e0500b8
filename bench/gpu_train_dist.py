"""slimtune's FSDP2 path under torchrun vs its plain one-GPU path, in one process, side by side.

    torchrun --standalone --nproc-per-node 1 bench/gpu_train_dist.py --shape 1b --method lora
    torchrun --standalone --nproc-per-node 1 bench/gpu_train_dist.py --shape 1b --method qlora

Same model shape, same adapters (LoRA r=16 on all seven projections), same random token
batches and the same training step as bench/gpu_train.py's `slim` runs. The plain path
trains (model on the GPU, no process group in use), then a fresh copy of the same model
is sharded with FSDP2 over torchrun's process group (NCCL on GPUs) and trains on the same
batches; `--repeat 2` runs the pair twice (plain, fsdp2, plain, fsdp2) to show the noise.
`--layout auto` is what `slimtune train` does (one process: frozen weights whole, the
adapters one FSDP2 unit); `--layout sharded` forces the several-process layout (one unit
per decoder layer, every weight sharded, 4-bit storage as bf16 bytes) onto any world size.

Prints tokens/s (median step after warm-up), peak memory, loss, the host time of each
phase of a step (median; on a CPU-bound step they add up to the step, and "wait" is the
time the host then waits for the GPU) and how many fused LoRA calls (fast.py) a step
made, then the ratio and the largest relative loss difference. With N processes each
rank trains on rows rank::N of each batch and the sharded tokens/s counts all ranks.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import gpu_train as gt
from slimtune.kernels import lora as fast
from slimtune.training import distributed

FUSED_CALLS = [0]


def _counting(fn):
    def counted(*args, **kwargs):
        FUSED_CALLS[0] += 1
        return fn(*args, **kwargs)

    return counted


fast.lora_linear = _counting(fast.lora_linear)  # try_lora_forward looks it up at each call


def shard(model, loss_fn, device: torch.device, layout: str):
    """FSDP2 over the process group; the same loss, run inside FSDP's root forward."""
    model = distributed.shard_model(model, device, None if layout == "auto" else False)
    sharded_loss = distributed.sharded_loss(model, lambda m, ids, chunk: (loss_fn(ids), 1))
    return model, lambda ids: sharded_loss(model, ids, 0)[0]


def timed_train(model, loss_fn, batches: torch.Tensor, lr: float) -> dict:
    """gpu_train.train's loop (same optimizer and step), timing each phase on the host."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = gt.make_optimizer("adamw", params, lr)
    model.train()
    cuda = batches.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, phases, calls = [], [], []
    gc.collect()
    gc.disable()  # no collector pauses inside timed steps (the same for every run)
    try:
        for ids in batches:
            FUSED_CALLS[0] = 0
            t = [time.perf_counter()]
            loss = loss_fn(ids)
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            opt.step()
            opt.zero_grad(set_to_none=True)
            t.append(time.perf_counter())
            losses.append(loss.item())  # synchronizes
            t.append(time.perf_counter())
            phases.append([b - a for a, b in zip(t, t[1:], strict=False)] + [t[-1] - t[0]])
            calls.append(FUSED_CALLS[0])
    finally:
        gc.enable()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return dict(losses=losses, phases=phases, peak_gib=peak, fused_calls=calls[-1])


def run(sharded: bool, args, batches: torch.Tensor) -> dict:
    model = gt.build_model(args.shape, args.device, args.seed)
    model, loss_fn = gt.setup_slim(model, args.method, set(filter(None, args.options.split(","))))
    gt.same_adapters(model, args.seed + 1)
    if sharded:
        model, loss_fn = shard(model, loss_fn, torch.device(args.device), args.layout)
    result = timed_train(model, loss_fn, batches, args.lr)
    kept = result["phases"][args.warmup :] or result["phases"]
    result["median"] = [statistics.median(col) for col in zip(*kept, strict=True)]
    world = distributed.world_size() if sharded else 1
    result["tok_s"] = batches.shape[1] * batches.shape[2] * world / result["median"][-1]
    del model, loss_fn
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def report(args, results: list[tuple[str, dict]]) -> None:
    world, backend = distributed.world_size(), torch.distributed.get_backend()
    print(f"shape {args.shape}, {args.method} {args.options}, layout {args.layout}, batch "
          f"{args.batch}x{args.seq}, {world} process(es), {backend}, {args.steps} steps "
          f"(median after {args.warmup})")  # fmt: skip
    print("| run | tok/s | peak GiB | loss 1 | loss last | host ms: forward | backward "
          "| optimizer | wait | step | fused LoRA calls/step |\n|" + "---|" * 11)  # fmt: skip
    for name, r in results:
        ms = " | ".join(f"{1e3 * x:.1f}" for x in r["median"])
        print(f"| {name} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | {r['losses'][0]:.4f} | "
              f"{r['losses'][-1]:.4f} | {ms} | {r['fused_calls']} |")  # fmt: skip
    plain = [r for name, r in results if name == "plain"]
    fsdp = [r for name, r in results if name != "plain"]
    ratio = statistics.median(r["tok_s"] for r in fsdp) / statistics.median(
        r["tok_s"] for r in plain
    )
    diff = max(
        abs(a - b) / abs(b)
        for r in fsdp
        for a, b in zip(r["losses"], plain[0]["losses"], strict=True)
    )
    print(f"fsdp2 / plain tokens/s (medians over runs): {ratio:.3f}; "
          f"max relative loss difference: {diff:.2e}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(gt.SHAPES), default="1b")
    p.add_argument("--method", choices=("lora", "qlora"), default="lora")
    p.add_argument("--options", default="fastops", help="gpu_train.py run options")
    p.add_argument("--layout", choices=("auto", "sharded"), default="auto")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--repeat", type=int, default=1, help="runs of the (plain, fsdp2) pair")
    p.add_argument("--batch", type=int, default=4, help="rows per step over all ranks")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if not distributed.init_from_env(args.device):
        raise SystemExit("run me under torchrun: torchrun --nproc-per-node 1 " + __file__)
    vocab = gt.llama_config(args.shape).vocab_size
    gen = torch.Generator().manual_seed(args.seed + 2)
    batches = torch.randint(0, vocab, (args.steps, args.batch, args.seq), generator=gen)
    rank, world = distributed.rank(), distributed.world_size()
    batches = batches[:, rank::world].contiguous().to(args.device)  # (steps, rows / W, seq)
    results = []
    for _ in range(args.repeat):
        results.append(("plain", run(False, args, batches)))
        results.append((f"fsdp2 x{world}", run(True, args, batches)))
    if distributed.is_main():
        report(args, results)
    distributed.shutdown()


if __name__ == "__main__":
    main()
