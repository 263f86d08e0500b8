"""Every method side by side: the same data, steps and seed, one held-out split, one report.

    for each method (and each LoRA rank of `ranks`), in a fresh child process:
        load the model ─► add the method ─► train N steps (peak memory sampled meanwhile)
        ─► held-out loss and exact match ─► ms per generated token (unmerged, then merged)
        ─► RUN/result.json
    then DIR/report.json, DIR/report.md and the charts (compare_report.py)

A child process per method keeps the measurements apart: the peak memory of one
method is not the high-water mark left by another, and nothing one method patches
leaks into the next. "base" is the untouched model (no training), the reference
for quality and latency. On the CPU, memory is the process's resident memory
sampled during training; on CUDA, the peak memory allocated by PyTorch.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from slimtune.errors import SlimtuneError

METHODS = ("lora", "qlora", "dora", "ia3", "prompt", "adapter", "full")
# peak learning rate per method for short runs (the paper's or PEFT's usual ranges)
DEFAULT_LR = {"lora": 1e-3, "qlora": 1e-3, "dora": 1e-3, "ia3": 3e-2, "prompt": 3e-2,
              "adapter": 1e-3, "full": 1e-4}  # fmt: skip
MERGEABLE = ("lora", "qlora", "dora", "ia3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareSettings:
    """What every method shares."""

    model: str  # model argument (directory, .gguf or built-in name)
    data: str  # training data
    eval_data: str  # held-out data (the same split for every method)
    methods: tuple[str, ...] = METHODS  # methods to run ("base" is always added)
    ranks: tuple[int, ...] = ()  # LoRA ranks to sweep (besides the lora run's own rank)
    rank: int = 8  # the rank of lora, qlora and dora
    max_steps: int = 40  # optimizer steps per method
    batch_size: int = 8  # rows per step
    max_length: int = 256  # tokens per row
    seed: int = 0  # data order and init
    latency_tokens: int = 16  # tokens generated per latency measurement
    jobs: int = 1  # training runs at a time (each child gets cpu_count / jobs threads)
    lr: dict[str, float] = dataclasses.field(default_factory=dict)  # overrides of DEFAULT_LR


def parse_methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise SlimtuneError(
            f"--methods {text!r}: unknown method {unknown[0] if unknown else '(none)'!r}; "
            f"methods: {', '.join(METHODS)}"
        )
    return names


def parse_ranks(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        ranks = tuple(int(r) for r in text.split(",") if r.strip())
    except ValueError:
        ranks = (0,)
    if not ranks or any(r <= 0 for r in ranks):
        raise SlimtuneError(
            f"--sweep-ranks {text!r}: give comma-separated integers > 0, e.g. 1,2,8,64"
        )
    return ranks


def jobs(settings: CompareSettings) -> list[dict[str, Any]]:
    """One job per run: base, each method, each extra LoRA rank."""
    runs = [{"label": "base", "method": "base", "rank": None}]
    runs += [{"label": m, "method": m, "rank": settings.rank} for m in settings.methods]
    runs += [
        {"label": f"lora-r{r}", "method": "lora", "rank": r}
        for r in settings.ranks
        if not (r == settings.rank and "lora" in settings.methods)
    ]
    return runs


# ----------------------------------------------------------------------------- measurement


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or resident memory sampled on the CPU."""

    def __init__(self, device: torch.device, every_s: float = 0.01) -> None:
        self.device, self.every_s, self.peak_bytes = device, every_s, 0
        self._stop = threading.Event()

    @staticmethod
    def rss_bytes() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


@torch.no_grad()
def ms_per_token(model, prompt_ids: list[int], tokens: int) -> float:
    """Wall time per generated token of one greedy generation (KV cache, batch 1)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                   min_new_tokens=tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000 / tokens


def interleaved_latency(
    models: dict[str, Any], prompt_ids: list[int], tokens: int, rounds: int = 5
) -> dict[str, float]:
    """Fastest ms per token of each model over `rounds`, the models taking turns (the order
    reversed every round) so that whatever else the machine does hits them alike."""
    for model in models.values():  # warm-up
        ms_per_token(model, prompt_ids, 2)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(rounds):
        for name in list(models)[:: 1 if i % 2 == 0 else -1]:
            times[name].append(ms_per_token(models[name], prompt_ids, tokens))
    return {name: min(values) for name, values in times.items()}


def step_seconds(model, batch: dict[str, torch.Tensor]) -> float:
    """Wall time of one training forward+backward (the trainer's loss) on `batch`."""
    from slimtune.training.loss import causal_lm_loss

    model.train()
    start = time.perf_counter()
    loss, count = causal_lm_loss(model, batch)
    (loss / count).backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def interleaved_train_speed(models: dict[str, Any], batch: dict, rounds: int = 3) -> dict:
    """Tokens per second of one forward+backward per model, fastest of `rounds`, interleaved."""
    tokens = int(batch["attention_mask"].sum())
    for model in models.values():  # warm-up
        step_seconds(model, batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(rounds):
        for name in list(models)[:: 1 if i % 2 == 0 else -1]:
            times[name].append(step_seconds(models[name], batch))
    for model in models.values():
        model.eval()
    return {name: tokens / min(values) for name, values in times.items()}


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so that resident memory measured
    during training does not count weights dropped before it (e.g. the fp32 copy that
    QLoRA quantized away)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- one run


def run_job(job: dict[str, Any], settings: CompareSettings, out: Path) -> dict[str, Any]:
    """Train (unless base), evaluate and time one method; runs inside the child process."""
    from slimtune.config import TrainConfig
    from slimtune.evaluate import evaluate, load_for_eval
    from slimtune.models import load_model
    from slimtune.training.loop import resolve_device, train
    from slimtune.training.setup import prepare_method

    model, tokenizer = load_model(settings.model)
    torch.manual_seed(settings.seed)
    method, result = job["method"], {"label": job["label"], "method": job["method"]}
    total = sum(p.numel() for p in model.parameters())
    if method == "base":
        result.update(trainable_params=0, total_params=total, extra_context_tokens=0)
    else:
        options = {"model": settings.model, "base_model": settings.model, "rank": job["rank"]}
        if method in ("lora", "qlora", "dora"):  # the same layers for all three (QLoRA's choice)
            options["target_modules"] = "all-linear"
            options["alpha"] = 2 * job["rank"]  # scaling 2 at every rank of the sweep
        model, save_fn = prepare_method(model, method, options)
        release_freed_memory()
        lr = settings.lr.get(method, DEFAULT_LR[method])
        config = TrainConfig(max_steps=settings.max_steps, batch_size=settings.batch_size,
                             max_length=settings.max_length, lr=lr, seed=settings.seed,
                             save_every=0, warmup_steps=max(1, settings.max_steps // 10))  # fmt: skip
        device, _ = resolve_device(config)
        with PeakMemory(device) as peak:
            summary = train(model, tokenizer, settings.data, config, out, save_fn=save_fn,
                            overwrite=True, quiet=True, run_config={"method": method})  # fmt: skip
        result.update(
            lr=lr, rank=job["rank"] if method in ("lora", "qlora", "dora") else None,
            trainable_params=summary["trainable_params"], total_params=summary["total_params"],
            peak_train_memory_mb=peak.peak_bytes / 2**20, run_tokens_per_s=summary["tokens_per_s"],
            first_loss=summary["first_loss"], final_loss=summary["final_loss"],
            adapter_bytes=dir_bytes(out / "adapter"),
            extra_context_tokens=getattr(model, "num_virtual_tokens", 0),
        )  # fmt: skip
    model.eval()
    heldout = load_for_eval(Path(settings.eval_data), tokenizer, settings.max_length, True)
    scores = evaluate(model, tokenizer, heldout, max_length=settings.max_length, batch_size=8)
    result.update(heldout_loss=scores["loss"], exact_match=scores.get("exact_match"))
    result["device"] = str(next(model.parameters()).device)
    result["threads"] = torch.get_num_threads()
    result["load_average"] = os.getloadavg()[0]  # other work on the machine skews timings
    return result


def latency_job(labels: list[str], settings: CompareSettings, runs_dir: Path) -> dict:
    """ms per token of the base model and every method (unmerged, then merged), one process."""
    import copy

    from slimtune.adapter_dir import load_adapter
    from slimtune.adapters.named import merge
    from slimtune.evaluate import exact_match_pairs, load_for_eval
    from slimtune.models import load_model
    from slimtune.quant.linear import quantize_model
    from slimtune.training.data import collate, load_dataset

    base, tokenizer = load_model(settings.model)
    models: dict[str, Any] = {}
    for label in labels:
        directory = runs_dir / label / "adapter"
        if label == "base":
            models[label] = base
        elif label == "full":
            models[label] = load_model(directory)[0]
        else:
            model = copy.deepcopy(base)
            if label == "qlora":
                quantize_model(model, "nf4", skip=["lm_head"])
            models[label] = load_adapter(model, directory).eval()
    heldout = load_for_eval(Path(settings.eval_data), tokenizer, settings.max_length, True)
    prompt = exact_match_pairs(heldout, tokenizer)[0][0] if heldout.format != "text" else [0] * 16
    train_data = load_dataset(settings.data, tokenizer, settings.max_length, quiet=True)
    batch = collate(train_data.examples[: settings.batch_size], pad_id=0)
    trained = {k: v for k, v in models.items() if k != "base"}
    speed = interleaved_train_speed(trained, batch)
    unmerged = interleaved_latency(models, prompt, settings.latency_tokens)
    mergeable = {k: merge(v) for k, v in models.items() if k in MERGEABLE}
    merged = interleaved_latency({"base": base, **mergeable}, prompt, settings.latency_tokens)
    return {"unmerged": unmerged, "merged": merged, "train_tokens_per_s": speed,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}  # fmt: skip


def child_main(job_file: str) -> None:
    """Entry point of the child process: python -c '…child_main(job.json)'."""
    spec = json.loads(Path(job_file).read_text())
    settings = CompareSettings(**{**spec["settings"], "methods": tuple(spec["settings"]["methods"]),
                                  "ranks": tuple(spec["settings"]["ranks"])})  # fmt: skip
    out = Path(spec["out"])
    if spec["job"]["method"] == "latency":
        result = latency_job(spec["job"]["labels"], settings, out.parent)
    else:
        result = run_job(spec["job"], settings, out)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def run_child(job: dict[str, Any], settings: CompareSettings, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    job_file = out / "job.json"
    spec = {"job": job, "settings": dataclasses.asdict(settings), "out": str(out)}
    job_file.write_text(json.dumps(spec, indent=2) + "\n")
    code = f"from slimtune.compare.run import child_main; child_main({str(job_file)!r})"
    env = dict(os.environ)
    if settings.jobs > 1 and job["method"] != "latency":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // settings.jobs))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise SlimtuneError(f"compare: the {job['label']} run failed: {tail}")
    return json.loads((out / "result.json").read_text())


# ----------------------------------------------------------------------------- all runs


def compare(
    settings: CompareSettings, out_dir: str | Path, *, quiet: bool = False, keep_runs: bool = False
) -> dict:
    """Run every method, then write DIR/report.json, DIR/report.md and the charts.

    DIR/runs/<label>/ (each run's directory) is removed at the end unless keep_runs.

    Returns:
        The report: {"settings": …, "runs": [one result per run]}.
    """
    from slimtune.compare.report import write_report

    for path in (settings.data, settings.eval_data):
        if not Path(path).is_file():
            raise SlimtuneError(f"compare: data file {path} does not exist")
    out = Path(out_dir)
    todo = jobs(settings)

    def one(job: dict[str, Any]) -> dict[str, Any]:
        began = time.perf_counter()
        result = run_child(job, settings, out / "runs" / job["label"])
        if not quiet:
            took = time.perf_counter() - began
            print(f"{job['label']} done in {took:.0f} s", file=sys.stderr, flush=True)
        return result

    if not quiet:
        print(f"{len(todo)} runs, {settings.jobs} at a time …", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        runs = list(pool.map(one, todo))
    labels = [r["label"] for r in runs if r["label"] in ("base", *settings.methods)]
    if not quiet:
        print(f"latency of {', '.join(labels)} (interleaved) …", file=sys.stderr, flush=True)
    job = {"label": "latency", "method": "latency", "labels": labels, "rank": None}
    latency = run_child(job, settings, out / "runs" / "latency")
    for run in runs:
        if run["label"] in latency["train_tokens_per_s"]:
            run["train_tokens_per_s"] = latency["train_tokens_per_s"][run["label"]]
        if run["label"] in latency["unmerged"]:
            run["ms_per_token"] = latency["unmerged"][run["label"]]
        if run["label"] in latency["merged"] and run["label"] != "base":
            run["merged_ms_per_token"] = latency["merged"][run["label"]]
            run["base_ms_per_token_merged_pass"] = latency["merged"]["base"]
    report = {"settings": dataclasses.asdict(settings), "runs": runs}
    report["settings"]["lr"] = {m: settings.lr.get(m, DEFAULT_LR[m]) for m in METHODS}
    report["timing"] = {"threads": latency["threads"], "load_average": latency["load_average"]}
    write_report(report, out)
    if not keep_runs:
        shutil.rmtree(out / "runs", ignore_errors=True)
    return report
