"""The training loop: AdamW over whatever requires grad, a warmup + decay schedule,
clipping, gradient accumulation, checkpoints, resume, metrics.

    for step in 1..max_steps:
        rows  = the next grad_accum micro-batches (length-grouped, order fixed by the seed)
        loss  = Σ token losses / number of label tokens in the step      (token-weighted)
        g     = ∇loss, clipped to max_grad_norm;  θ ← AdamW(θ, g, lr(step))
        lr(step) = lr · step/warmup during warmup, then linear or cosine decay to 0

The loop is method-agnostic: it trains the parameters that require grad and hands
the model to a `save_fn` at the end (an adapter directory for LoRA, a transformers
directory for full fine-tuning). The pieces a distributed run replaces (placing the
model, making batches, checkpoints, logging) are small functions of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.atomic import write_json, write_yaml
from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError
from slimtune.training import distributed
from slimtune.training.checkpoints import latest_checkpoint
from slimtune.training.checkpoints_sharded import (
    intact_for_resume,
    keep_global_batch,
    load_checkpoint,
    save_checkpoint,
)
from slimtune.training.data import (
    IGNORE_INDEX,
    Dataset,
    batches_from,
    load_dataset,
    to_device,
)
from slimtune.training.loraplus import param_groups
from slimtune.training.memory import MemoryPlan, plan_memory
from slimtune.training.neftune import neftune
from slimtune.training.packing import pack_dataset
from slimtune.training.preference import PreferenceData, load_preference_data, pair_batches
from slimtune.training.preference_loss import objective_loss, preference_eval
from slimtune.training.run_lock import run_lock
from slimtune.training.rundir import check_run_dir, clear_run, removed_on_failure
from slimtune.training.runlog import MetricsLog, peak_memory_mb, plot_losses
from slimtune.training.stop_signals import Stopped, StopRequest, signalled, stop_on_signals
from slimtune.training.tensorboard import reporters

SaveFn = Callable[[nn.Module, Path], Any]
LossFn = Callable[[nn.Module, dict[str, torch.Tensor], int], tuple[torch.Tensor, int]]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    warmup, total = config.warmup_steps, config.max_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # in [0, 1)
    if config.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(config: TrainConfig) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None): fp32 on the CPU, bf16 autocast on a GPU."""
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlimtuneError(f"device {name!r} was asked for but CUDA is not available")
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    return device, torch.bfloat16 if bf16 else None


def place_model(
    model: nn.Module, device: torch.device, loss_fn: LossFn
) -> tuple[nn.Module, LossFn]:
    """Put the model where it trains; under torchrun, shard it with FSDP2 (distributed.py)."""
    return distributed.place_model(model, device, loss_fn)


def make_optimizer(params: list, config: TrainConfig) -> torch.optim.Optimizer:
    from slimtune.training.optim import optimizer_class

    extra = {}
    if config.optim == "adamw" and params and not distributed.is_distributed():
        # on a GPU one fused kernel updates every tensor (foreach launches several per group)
        tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
        extra["fused"] = all(t.is_cuda for t in tensors) or None
    return optimizer_class(config.optim)(
        params,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        **extra,
    )


def make_batches(data: Dataset, config: TrainConfig, pad_id: int, start: int) -> Iterator[dict]:
    """Micro-batches from number `start` on (distributed runs shard them here)."""
    data = pack_dataset(data, config.max_length) if config.packing else data  # packing.py
    make = pair_batches if isinstance(data, PreferenceData) else batches_from
    batches = make(data, config.batch_size, config.seed, pad_id, start, config.group_by_length)
    return distributed.rank_share(batches)


def read_data(data, tokenizer, config: TrainConfig, quiet: bool):
    """A data file read as the objective needs it: SFT rows, or preference pairs."""
    if data is None or isinstance(data, Dataset | PreferenceData):
        if isinstance(data, PreferenceData) != (config.objective != "sft") and data is not None:
            kind = "preference pairs" if isinstance(data, PreferenceData) else "SFT rows"
            raise SlimtuneError(f"{data.path} holds {kind}; objective {config.objective!r}")
        return data
    load = load_dataset if config.objective == "sft" else load_preference_data
    return load(data, tokenizer, config.max_length, quiet=quiet)


def label_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def train_step(model, micro_batches, config, device, autocast, loss_fn) -> tuple:
    """Forward and backward over the micro-batches of one step; (loss, label tokens, tokens,
    metrics). A preference loss averages over pairs (its `count`) and returns metric sums.

    The loss comes back as a tensor on the device: nothing here waits for the GPU (counts
    are read from the host batches), so the next step can be queued while this one runs.
    """
    count = getattr(loss_fn, "count", label_count)
    n_labels = max(1, int(distributed.all_sum(sum(count(b) for b in micro_batches))))
    total, tokens, sums = 0.0, 0, {}
    for i, batch in enumerate(micro_batches):
        distributed.sync_gradients(model, i == len(micro_batches) - 1)
        tokens += int(batch["attention_mask"].sum())
        batch = to_device(batch, device)
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            loss_sum, _, *extra = loss_fn(model, batch, config.loss_chunk)
        for key, value in (extra[0] if extra else {}).items():
            sums[key] = sums.get(key, 0.0) + value
        if loss_sum.requires_grad:
            (loss_sum / n_labels).backward()
        total = total + loss_sum.detach().double()  # as the float sum it replaces
    total, tokens = distributed.all_sum(total), int(distributed.all_sum(tokens))
    return total / n_labels, n_labels, tokens, {k: v / n_labels for k, v in sums.items()}


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused Adam/AdamW, which skip an update on the GPU when `found_inf`
    is set: a step's loss can then be checked after the next step is queued (`_Pending`)."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(
        optimizer.defaults.get("fused")
    )


@dataclasses.dataclass
class _Pending:
    """A step whose loss and gradient norm are still being computed: they are copied to the
    host behind the step's work and read (`numbers`) once that copy has landed."""

    step: int
    lr: float
    tokens: int  # this step's
    seen: int  # the run's, up to this step
    extra: dict[str, float]
    values: torch.Tensor  # [loss, grad norm]: on the host, valid once `landed` has passed
    landed: Any = None  # a CUDA event, or None where the values are ready

    @classmethod
    def of(cls, step, lr, tokens, seen, extra, loss, norm, late: bool) -> _Pending:
        """`late`: copy the values behind the step's work (one device); else read them now
        (a sharded run's norm is a DTensor, which `float` gathers)."""
        if not late:
            values = torch.tensor([float(loss), float(norm)], dtype=torch.float64)
            return cls(step, lr, tokens, seen, extra, values)
        values, landed = torch.stack([loss.double(), norm.double()]), None
        if values.is_cuda:
            values = values.to("cpu", non_blocking=True)  # into pinned memory
            landed = torch.cuda.Event()
            landed.record()
        return cls(step, lr, tokens, seen, extra, values, landed)

    def numbers(self) -> tuple[float, float]:
        if self.landed is not None:
            self.landed.synchronize()  # this step's work only, not what was queued after it
        loss, norm = self.values.tolist()
        return loss, norm


def check_finite(loss: float, step: int, out: Path) -> None:
    if math.isfinite(loss):
        return
    found = sorted((out / "checkpoints").glob("step-*"))
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
    raise SlimtuneError(
        f"step {step}: the loss is {loss}; training stopped ({kept}); try a lower --lr"
    )


def progress_bar(config: TrainConfig, start: int, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.max_steps, initial=start, disable=quiet, unit="step", dynamic_ncols=True
    )


def prepare_run(out: Path, resume: bool, overwrite: bool) -> None:
    if overwrite and not resume and out.is_dir():
        clear_run(out)  # an earlier run's own files only (rundir.py)
    out.mkdir(parents=True, exist_ok=True)


def start_state(out: Path, model, optimizer, resume: bool, metrics: MetricsLog) -> dict:
    """The loop's state: fresh, or loaded from the latest checkpoint (metrics cut back to it)."""
    if not resume:
        metrics.path.unlink(missing_ok=True)
        return {"step": 0, "micro_batches": 0, "tokens": 0, "elapsed_s": 0.0}
    state = load_checkpoint(latest_checkpoint(out), model, optimizer)
    metrics.truncate_after(state["step"])
    return state


def train(
    model: nn.Module,
    tokenizer,
    data: Dataset | str | Path,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    save_fn: SaveFn | None = None,
    eval_data: Dataset | str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    run_config: dict[str, Any] | None = None,
    loss_fn: LossFn | None = None,
    objective: str | None = None,
    stop_when: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Train the parameters of `model` that require grad; write the run directory.

    Args:
        model: a model whose trainable parameters are set (an adapter added, or all of it).
        tokenizer: its tokenizer (pad and end tokens).
        data: a Dataset from `load_dataset`, or a data file path.
        config: the training configuration.
        out_dir: the run directory (metrics.jsonl, checkpoints/, loss.png, summary.json, …).
        save_fn: save_fn(model, directory) writes the final weights to RUN/adapter
            (default: `slimtune.save_adapter`).
        eval_data: held-out data; its loss is logged every config.eval_every steps and at the end.
        resume: continue from the latest checkpoint in out_dir.
        overwrite: replace an existing non-empty out_dir.
        quiet: no progress bar.
        run_config: extra settings recorded in RUN/config.yaml (model, data, method …).
        stop_when: called with each evaluation's record ({"step", "eval_loss", …}); training
            ends early when it returns True (early stopping, e.g. `slimtune compare`).
        loss_fn: loss_fn(model, batch, chunk) -> (Σ token losses, label tokens); default:
            the objective's (training/preference_loss.py: objective_loss).
        objective: "sft", "dpo" or "orpo" (default: config.objective); dpo and orpo read
            preference pairs (training/preference.py).

    Returns:
        The summary (also written to RUN/summary.json).
    """
    out = check_run_dir(out_dir, resume, overwrite)
    if objective is not None:
        config = dataclasses.replace(config, objective=objective)
    data = read_data(data, tokenizer, config, quiet)
    eval_data = read_data(eval_data, tokenizer, config, quiet)
    device, autocast = resolve_device(config)
    loss_fn = loss_fn or objective_loss(model, config, device, quiet)
    model, loss_fn = place_model(model, device, loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SlimtuneError("the model has no parameter that requires grad: nothing to train")
    groups = param_groups(
        model, params, config.lora_plus_ratio, lr=config.lr, weight_decay=config.weight_decay
    )  # LoRA+ (loraplus.py) when --lora-plus-ratio is set
    optimizer = make_optimizer(groups, config)
    plan = None if distributed.is_distributed() else plan_memory(model, config, device, data)
    if plan is not None and not plan.pending and not quiet:
        print(plan.line(), flush=True)
    if resume:
        intact_for_resume(out)  # an altered checkpoint is set aside, saying so
    config = keep_global_batch(config, out, resume)
    # a failure before the first checkpoint removes what this run wrote (rundir.py)
    lock = run_lock(out) if distributed.is_main() else contextlib.nullcontext()  # run_lock.py
    with removed_on_failure(out, keep=resume or not distributed.is_main()), lock:
        if distributed.is_main():
            prepare_run(out, resume, overwrite)
            write_yaml(out / "config.yaml", {**(run_config or {}), **dataclasses.asdict(config)})
        metrics = distributed.metrics_log(out / "metrics.jsonl")
        state = start_state(out, model, optimizer, resume, metrics)
        if distributed.is_main():  # --report-to tensorboard (tensorboard.py)
            metrics.sinks += reporters(config.report_to, out, state["step"])
        run = _Loop(
            model, tokenizer, data, config, out, device, autocast, loss_fn, eval_data, quiet
        )
        run.plan, run.stop_when = plan, stop_when
        try:
            with neftune(model, config.neftune_alpha), stop_on_signals() as run.signals:
                state = run.steps(optimizer, params, state, metrics)  # neftune: training noise
            return finish(run, state, metrics, save_fn or default_save_fn)
        finally:
            if plan is not None:
                plan.release(model)  # memory.py: what it held for the run


def default_save_fn(model: nn.Module, directory: Path) -> Any:
    from slimtune.adapter_dir import save_adapter

    return save_adapter(model, directory, overwrite=True)


@dataclasses.dataclass
class _Loop:
    """What the step loop needs, held together (one run)."""

    model: nn.Module
    tokenizer: Any
    data: Dataset
    config: TrainConfig
    out: Path
    device: torch.device
    autocast: torch.dtype | None
    loss_fn: LossFn
    eval_data: Dataset | None
    quiet: bool
    signals: StopRequest | None = None  # stop_signals.py: set by Ctrl-C or SIGTERM
    plan: MemoryPlan | None = None  # training/memory.py; `auto` completes it after step 1
    stop_when: Callable[[dict[str, Any]], bool] | None = None  # early stopping on eval records
    bar: Any = None  # the progress bar of `steps`
    window: list = dataclasses.field(default_factory=list)  # [tokens, start] of a log line
    tokens_per_s: float = 0.0  # over the last log line's window

    def steps(self, optimizer, params, state: dict, metrics: MetricsLog) -> dict:
        """The steps from state["step"] + 1 on.

        With a fused Adam (`skips_on_device`) a step's loss and norm are read once the next
        step's forward and backward are queued, so the GPU never waits for the host between
        steps. A non-finite loss sets the optimizer's `found_inf`: its update is skipped on
        the device, and the loop stops with the usual error before the next update, a
        checkpoint or an evaluation. Otherwise each step's loss is checked before its update.
        """
        config, model = self.config, self.model
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        batches = make_batches(self.data, config, pad, state["micro_batches"])
        model.train()
        self.bar = progress_bar(config, state["step"], self.quiet or not distributed.is_main())
        self.window = [0, time.perf_counter()]
        deferred = skips_on_device(optimizer) and not distributed.is_distributed()
        began, elapsed = time.perf_counter(), state.get("elapsed_s", 0.0)
        pending = None
        for step in range(state["step"] + 1, config.max_steps + 1):
            micro = [next(batches) for _ in range(config.grad_accum)]
            lr = config.lr * lr_factor(step - 1, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss, _, tokens, extra = train_step(
                model, micro, config, self.device, self.autocast, self.loss_fn
            )
            if pending is not None:  # the step before: read while this one runs, and
                self.report(pending, metrics)  # checked before this one's update
                pending = None
            if deferred:  # a non-finite loss: the fused update is skipped on the device
                optimizer.found_inf = (~torch.isfinite(loss)).float()
            else:
                check_finite(float(loss), step, self.out)
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if self.plan is not None and self.plan.after_step(model) and not self.quiet:
                self.bar.write(self.plan.line())
            state = {
                "step": step,
                "micro_batches": state["micro_batches"]
                + config.grad_accum * distributed.world_size(),
                "tokens": state["tokens"] + tokens,
            }
            pending = _Pending.of(
                step, lr, tokens, state["tokens"], extra, loss, norm, late=deferred
            )
            evaluates = (
                self.eval_data is not None
                and bool(config.eval_every)
                and step % config.eval_every == 0
            )
            saved = bool(config.save_every) and step % config.save_every == 0
            signum = signalled(self.signals)  # Ctrl-C / SIGTERM: checkpoint, then stop
            if not deferred or evaluates or saved or signum is not None or step == config.max_steps:
                self.report(pending, metrics)  # checked before anything is written
                pending = None
            state["elapsed_s"] = elapsed + time.perf_counter() - began
            stop = False
            if evaluates:
                record = {"step": step, **self.evaluate()}
                metrics.append(record)
                stop = self.stop_when is not None and self.stop_when(record)
            if saved:
                save_checkpoint(self.out, model, optimizer, state, config.keep_checkpoints)
            if signum is not None:
                if not saved:
                    save_checkpoint(self.out, model, optimizer, state, config.keep_checkpoints)
                self.bar.close()
                raise Stopped(step, signum)
            if stop:
                break
        self.bar.close()
        return state

    def report(self, pending: _Pending, metrics: MetricsLog) -> None:
        """A finished step's numbers: checked, logged every log_every steps, shown."""
        config = self.config
        loss, norm = pending.numbers()
        check_finite(loss, pending.step, self.out)
        self.window[0] += pending.tokens
        step, extra = pending.step, pending.extra
        if step % config.log_every == 0 or step == config.max_steps:
            self.tokens_per_s = self.window[0] / max(time.perf_counter() - self.window[1], 1e-9)
            record = {"step": step, "loss": loss, "lr": pending.lr,
                      "tokens_per_s": self.tokens_per_s,
                      "memory_mb": peak_memory_mb(self.device)}  # fmt: skip
            metrics.append({**record, **extra, "grad_norm": norm, "tokens": pending.seen})
            self.window = [0, time.perf_counter()]
        shown = {"acc": f"{extra['rewards/accuracy']:.2f}"} if extra else {}
        self.bar.set_postfix(
            loss=f"{loss:.4f}", **shown, tok_s=f"{self.tokens_per_s:,.0f}", refresh=False
        )
        self.bar.update(1)

    def evaluate(self) -> dict[str, float]:
        from slimtune.training.loss import dataset_loss

        if isinstance(self.eval_data, PreferenceData):  # loss and rewards of held-out pairs
            args = (self.eval_data, self.loss_fn, self.config.batch_size, self.autocast)
            result = preference_eval(self.model, *args)
            self.model.train()
            return {f"eval_{key}": value for key, value in result.items()}
        with distributed.gathered_root(self.model):
            loss = dataset_loss(self.model, self.eval_data, self.config.batch_size, self.autocast)
        self.model.train()
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    try:
        from slimtune.adapters.named import trainable_parameters
    except ImportError:  # the adapter layers are not there yet: count plainly
        params = list(model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return distributed.parameter_counts(model, trainable_parameters(model))


def finish(run: _Loop, state: dict, metrics: MetricsLog, save_fn: SaveFn) -> dict[str, Any]:
    """Write RUN/adapter, loss.png and summary.json; return the summary."""
    distributed.save_final(save_fn, run.model, run.out / "adapter")
    records = metrics.records()
    final_eval = {}
    if run.eval_data is not None:
        done = [r for r in records if "eval_loss" in r and r["step"] == state["step"]]
        final_eval = done[-1] if done else {"step": state["step"], **run.evaluate()}
        if not done:
            metrics.append(final_eval)
            records.append(final_eval)
    if distributed.is_main():
        plot_losses(records, run.out / "loss.png")
    losses = [r["loss"] for r in records if "loss" in r]
    trainable, total = count_parameters(run.model)
    summary = {
        "steps": state["step"],
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": final_eval.get("eval_loss"),
        "eval_perplexity": final_eval.get("eval_perplexity"),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "train_rows": len(run.data),
        "rows_truncated": run.data.truncated,
        "train_tokens": state["tokens"],
        "tokens_per_s": state["tokens"] / max(state["elapsed_s"], 1e-9),
        "wall_time_s": state["elapsed_s"],
        "peak_memory_mb": peak_memory_mb(run.device),
        "device": str(run.device),
        "memory": run.plan.record() if run.plan is not None else None,
    }
    if distributed.is_main():
        write_json(run.out / "summary.json", summary)
    return summary
