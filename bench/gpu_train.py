"""slimtune vs PEFT (+ bitsandbytes) training speed on one GPU, side by side.

Builds Llama-3-8B / Llama-3.2-1B shapes with random weights (no download), then for
each run spec trains LoRA r=16 alpha=16 on all seven projections with AdamW on the same
random token batches, and prints tokens/s (median step time after warm-up), peak GPU
memory during training (weights included) and the loss per step, with ratios.

    python bench/gpu_train.py --shape 1b --steps 12
    python bench/gpu_train.py --shape 8b --runs peft:qlora,slim:qlora:fastops,slim:qlora:fastops:offload

Run specs are impl:method[:option...]: impl peft|slim, method lora|qlora|full (full: slim
only, every weight trains), options offload (checkpoint inputs to CPU), ligerops
(liger-kernel RMSNorm/RoPE/SwiGLU), ligerce (liger's fused linear cross-entropy instead of
slimtune's), liger (both), nockpt (no activation checkpointing), ckpt=F (checkpoint a share
F of the layers), fastops (slimtune's Triton RMSNorm, SwiGLU and RoPE), optim=adamw|paged|8bit
(torch AdamW, slimtune.training.optim.PagedAdamW or AdamW8bit). "vs base" compares with the PEFT run
of the same method, or else with the method's first run.
PEFT runs as HF Trainer(bf16=True) would: bf16 autocast, gradient checkpointing, and for
QLoRA bnb Linear4bit NF4 + double quant after prepare_model_for_kbit_training.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # from the public configs of meta-llama/Meta-Llama-3-8B and Llama-3.2-1B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}  # fmt: skip


def llama_config(shape: str) -> LlamaConfig:
    vocab = 128256 if shape != "tiny" else 512
    cfg = LlamaConfig(vocab_size=vocab, rope_theta=500000.0, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, **SHAPES[shape])  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(shape: str, device: str, seed: int) -> LlamaForCausalLM:
    """Random bf16 weights, built on the device (identical for the same seed)."""
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(old)
    return model


def lora_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(A, B) of every adapted projection, in layer order (PEFT and slimtune alike)."""
    pairs = []
    for name, mod in model.named_modules():
        if name.split(".")[-1] in TARGETS and hasattr(mod, "lora_A"):
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            pairs.append((a, b))
    return pairs


@torch.no_grad()
def same_adapters(model: nn.Module, seed: int) -> int:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) from one seeded stream, B = 0: both impls start equal."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pairs = lora_pairs(model)
    for a, b in pairs:
        values = (torch.rand(a.shape, generator=gen) * 2 - 1) / a.shape[1] ** 0.5
        a.copy_(values.to(a.device, a.dtype))
        b.zero_()
    return len(pairs)


def bnb_quantize(model: nn.Module) -> None:
    """Replace the seven projections by bitsandbytes Linear4bit (NF4, double quant)."""
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        if name.split(".")[-1] not in TARGETS or not isinstance(mod, nn.Linear):
            continue
        q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", device="meta")  # fmt: skip
        q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")  # fmt: skip
        q = q.to(mod.weight.device)  # quantizes here
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, q)
    model.is_loaded_in_4bit = True


def setup_peft(model: nn.Module, method: str, opts: set[str]):
    import peft

    if method == "qlora":
        bnb_quantize(model)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    cfg = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, cfg)

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda):
            return model(input_ids=ids, labels=ids).loss

    return model, loss_fn


def setup_slim(model: nn.Module, method: str, opts: set[str]):
    import slimtune as st
    from slimtune.kernels.cross_entropy import causal_lm_loss
    from slimtune.kernels.recompute import enable_checkpointing

    model.requires_grad_(method == "full")
    if opts & {"liger", "ligerops"}:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)  # fmt: skip
    if method == "qlora":
        st.quantize_model(model, "nf4", skip=("lm_head",), blocksize=64, double_quant=True)
    if method != "full":
        cfg = st.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
        model = st.add_adapter(model, cfg)
    fraction = 0.0 if "nockpt" in opts else 1.0
    for opt in opts:
        if opt.startswith("ckpt="):
            fraction = float(opt[5:])
    enable_checkpointing(model, offload="offload" in opts, fraction=fraction)
    if "fastops" in opts:
        from slimtune.kernels.llama_ops import patch_llama

        patch_llama(model)
    if opts & {"liger", "ligerce"}:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss()

        def loss_fn(ids):
            hidden = model.model(input_ids=ids).last_hidden_state
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            return ce(model.lm_head.weight, h, ids[:, 1:].reshape(-1))

        return model, loss_fn
    return model, lambda ids: causal_lm_loss(model, ids, ids)


def make_optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    """adamw (torch, states in the parameters' dtype), paged or 8bit (slimtune.training.optim)."""
    from slimtune.training.optim import AdamW8bit, PagedAdamW

    table = {"adamw": torch.optim.AdamW, "paged": PagedAdamW, "8bit": AdamW8bit}
    return table[name](params, lr=lr, weight_decay=0.0)


def train(model, loss_fn, batches, lr: float, profile: bool = False, optim: str = "adamw") -> dict:
    from slimtune.training.optim import state_bytes

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optim, params, lr)
    model.train()
    cuda = batches.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []

    def step(ids):
        t0 = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes
        times.append(time.perf_counter() - t0)

    gc.collect()
    gc.disable()  # no collector pauses inside timed steps (the same for every run)
    try:
        for ids in batches:
            step(ids)
    finally:
        gc.enable()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    if profile:  # two more steps under the profiler (not counted above)
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for ids in batches[:2]:
                step(ids)
        print(  # self time: each kernel counted once, so the rows add up to the step
            p.key_averages().table(
                sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90
            )
        )
        print_idle(p, sum(times[-2:]))
        del losses[-2:], times[-2:]
    n_train = sum(p.numel() for p in params)
    states = state_bytes(opt, "cuda") / 2**30 if cuda else float("nan")
    return dict(losses=losses, times=times, peak_gib=peak, trainable=n_train, state_gib=states)


def print_idle(p, wall_s: float) -> None:
    """How long the GPU ran kernels in the profiled steps against their wall time, and the
    longest gaps between kernels with the kernels on either side (where the GPU waited)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in p.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    busy, gaps, end, last = 0.0, [], None, ""
    for start, stop, name in spans:
        if end is not None and start > end:
            gaps.append((start - end, last, name))
        lo = start if end is None else max(start, end)
        busy += max(0, stop - lo)
        if end is None or stop > end:
            end, last = stop, name
    print(f"profiled wall {wall_s * 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms "
          f"({busy / 1e4 / wall_s:.1f}%), gaps {sum(g[0] for g in gaps) / 1e3:.1f} ms in {len(gaps)}")  # fmt: skip
    for gap, before, after in sorted(gaps, reverse=True)[:12]:
        print(f"  gap {gap:8.0f} us after {before[:60]} before {after[:60]}")


def flops_per_token(shape: str, seq: int, trainable: int) -> float:
    """4 N_frozen + 6 N_trainable + attention (causal, fwd + bwd), per token."""
    cfg = llama_config(shape)
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = d // cfg.num_attention_heads * cfg.num_key_value_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    frozen = layers * per_layer + cfg.vocab_size * d  # projections + lm_head
    attention = 3 * 2 * seq * d * layers  # QKᵀ and AV, half for causal, x3 for backward
    return 4 * frozen + 6 * trainable + attention


def matmul_tflops(device: str) -> float:
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def run_spec(spec: str, args, batches: torch.Tensor) -> dict:
    impl, method, *options = spec.split(":")
    opts = set(options)
    t0 = time.perf_counter()
    model = build_model(args.shape, args.device, args.seed)
    t_build = time.perf_counter() - t0
    setup = setup_peft if impl == "peft" else setup_slim
    model, loss_fn = setup(model, method, opts)
    n = same_adapters(model, args.seed + 1)
    t_setup = time.perf_counter() - t0 - t_build
    if args.device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    optim = next((o[6:] for o in opts if o.startswith("optim=")), "adamw")
    profile = spec in args.profile.split(",")
    result = train(model, loss_fn, batches, args.lr, profile=profile, optim=optim)
    result.update(spec=spec, adapted=n, build_s=t_build, setup_s=t_setup,
                  first_step_s=result["times"][0])  # fmt: skip
    times = result["times"][args.warmup :] or result["times"]
    result["step_s"] = statistics.median(times)
    result["tok_s"] = batches.shape[1] * batches.shape[2] / result["step_s"]
    if impl == "slim":
        from slimtune.kernels.llama_ops import unpatch_rope

        unpatch_rope()  # transformers' RoPE is module-level: give PEFT runs the original back
    del model, loss_fn
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def print_table(results: list[dict], args, peak_tflops: float) -> None:
    seq = args.seq
    base = {}
    for r in results:
        method = r["spec"].split(":")[1]
        if method not in base or (
            r["spec"].startswith("peft:") and base[method]["spec"][:5] != "peft:"
        ):
            base[method] = r  # PEFT's run of the method, else the method's first run
    print(f"\nshape {args.shape}, batch {args.batch}x{seq}, {args.steps} steps "
          f"(median of steps {args.warmup + 1}..{args.steps}); matmul {peak_tflops:.0f} TFLOP/s")  # fmt: skip
    head = "| run | tok/s | vs base | peak GiB | vs base | optim. state GiB | MFU | 1st step s"
    head += " | loss 1 | loss last |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        ref = base.get(r["spec"].split(":")[1])
        speed = r["tok_s"] / ref["tok_s"] if ref else float("nan")
        mem = r["peak_gib"] / ref["peak_gib"] if ref else float("nan")
        mfu = flops_per_token(args.shape, seq, r["trainable"]) * r["tok_s"] / (peak_tflops * 1e12)
        print(f"| {r['spec']} | {r['tok_s']:,.0f} | {speed:.2f}x | {r['peak_gib']:.1f} | "
              f"{mem:.2f}x | {r['state_gib']:.2f} | {mfu:.0%} | {r['first_step_s']:.1f} | {r['losses'][0]:.4f} | "
              f"{r['losses'][-1]:.4f} |")  # fmt: skip
    for method, ref in base.items():
        for r in results:
            if r["spec"].split(":")[1] == method and r is not ref:
                d = max(
                    abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"], strict=False)
                )
                print(f"max relative loss difference {r['spec']} vs {ref['spec']}: {d:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--runs", default="peft:qlora,slim:qlora:fastops,peft:lora,slim:lora:fastops")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write every number here")
    p.add_argument("--profile", default="", help="run specs to profile (2 extra steps each)")
    args = p.parse_args()
    cfg = llama_config(args.shape)
    gen = torch.Generator().manual_seed(args.seed + 2)
    batches = torch.randint(0, cfg.vocab_size, (args.steps, args.batch, args.seq), generator=gen)
    batches = batches.to(args.device)
    peak = matmul_tflops(args.device)
    results = []
    for spec in args.runs.split(","):
        try:
            r = run_spec(spec, args, batches)
        except Exception as exc:  # one failed run must not lose the others' numbers
            print(f"{spec}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
            continue
        results.append(r)
        print(f"{spec}: {r['tok_s']:,.0f} tok/s, peak {r['peak_gib']:.2f} GiB, build "
              f"{r['build_s']:.1f}s setup {r['setup_s']:.1f}s first step {r['first_step_s']:.1f}s, "
              f"losses {[round(x, 4) for x in r['losses']]}", flush=True)  # fmt: skip
    print_table(results, args, peak)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), matmul_tflops=peak, results=results), f, indent=1)


if __name__ == "__main__":
    main()
