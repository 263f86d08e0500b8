"""slimtune's FSDP2 path under torchrun vs its plain one-GPU path, in one process, side by side.

    torchrun --standalone --nproc-per-node 1 bench/gpu_train_dist.py --shape 1b --method lora
    torchrun --standalone --nproc-per-node 1 bench/gpu_train_dist.py --shape 1b --method qlora

Same model shape, same adapters (LoRA r=16 on all seven projections), same random token
batches and the same training step as bench/gpu_train.py's `slim` runs. First the plain
path trains (model on the GPU, no process group in use), then a fresh copy of the same
model is sharded with FSDP2 over torchrun's process group (NCCL on GPUs: with one process
the all-gathers and reduce-scatters run over a world of one) and trains on the same batches.
Prints tokens/s (median step after warm-up), peak memory, the ratio and the largest
relative loss difference. With N processes each rank trains on rows rank::N of each batch
and the sharded tokens/s counts all ranks (the plain run then uses rank 0's rows alone).
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

import gpu_train as gt
from slimtune import distributed


def shard(model, loss_fn, device: torch.device):
    """FSDP2 over the process group; the same loss, run inside FSDP's root forward."""
    model = distributed.shard_model(model, device)
    sharded_loss = distributed.sharded_loss(model, lambda m, ids, chunk: (loss_fn(ids), 1))
    return model, lambda ids: sharded_loss(model, ids, 0)[0]


def run(sharded: bool, args, batches: torch.Tensor) -> dict:
    model = gt.build_model(args.shape, args.device, args.seed)
    model, loss_fn = gt.setup_slim(model, args.method, set(filter(None, args.options.split(","))))
    gt.same_adapters(model, args.seed + 1)
    if sharded:
        model, loss_fn = shard(model, loss_fn, torch.device(args.device))
    result = gt.train(model, loss_fn, batches, args.lr)
    step_s = statistics.median(result["times"][args.warmup :] or result["times"])
    world = distributed.world_size() if sharded else 1
    result.update(step_s=step_s, tok_s=batches.shape[1] * batches.shape[2] * world / step_s)
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(gt.SHAPES), default="1b")
    p.add_argument("--method", choices=("lora", "qlora"), default="lora")
    p.add_argument("--options", default="", help="gpu_train.py run options, e.g. nockpt")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
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
    plain, sharded = run(False, args, batches), run(True, args, batches)
    if distributed.is_main():
        backend = torch.distributed.get_backend()
        print(f"shape {args.shape}, {args.method} {args.options}, batch {args.batch}x{args.seq}, "
              f"{world} process(es), {backend}, {args.steps} steps (median after {args.warmup})")  # fmt: skip
        print("| run | tok/s | peak GiB | loss 1 | loss last |\n|---|---|---|---|---|")
        for name, r in (("plain", plain), (f"fsdp2 x{world}", sharded)):
            print(f"| {name} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | "
                  f"{r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |")  # fmt: skip
        diff = max(
            abs(a - b) / abs(b) for a, b in zip(sharded["losses"], plain["losses"], strict=True)
        )
        print(
            f"fsdp2 / plain tokens/s: {sharded['tok_s'] / plain['tok_s']:.3f}; "
            f"max relative loss difference: {diff:.2e}"
        )
    distributed.shutdown()


if __name__ == "__main__":
    main()
