"""Every method side by side: the same data and validation rows, tuned, trained to a plateau.

    carve validation rows from the training data (DIR/runs/data/)
    round 1: base once; each method (and each LoRA rank of `ranks`) at each lr of the sweep
    round 2: each one again at its best lr (lowest validation loss), once per further seed
    each run, in a fresh child process:
        load the model ─► add the method ─► train, validating every eval_every steps, until
        the validation loss stops improving (peak memory sampled meanwhile)
        ─► held-out loss and exact match on each held-out split ─► RUN/result.json
    then, in one process: ms per generated token (unmerged, then merged) and training tokens/s
    then DIR/report.json, DIR/report.md and the charts (report.py, charts.py)

A child process per run keeps the measurements apart: the peak memory of one run is not the
high-water mark left by another, and nothing one method patches leaks into the next. "base"
is the untouched model (no training), the reference for quality and latency. On the CPU,
memory is the process's resident memory sampled during training; on CUDA, the peak memory
allocated by PyTorch.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from slimtune.compare.measure import (
    PeakMemory,
    dir_bytes,
    hardware,
    interleaved_latency,
    interleaved_train_speed,
)
from slimtune.compare.settings import (
    MERGEABLE,
    RANKED,
    CompareSettings,
    Plateau,
    jobs,
    run_name,
    seed_jobs,
)
from slimtune.errors import SlimtuneError
from slimtune.weights import release_freed_memory

# ----------------------------------------------------------------------------- one run


def _device(settings: CompareSettings) -> torch.device:
    from slimtune.config import TrainConfig
    from slimtune.training.loop import resolve_device

    return resolve_device(TrainConfig(device=settings.device))[0]


def _curve(out: Path) -> list[list[float]]:
    """[[step, validation loss], …] from RUN/metrics.jsonl."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r]


def _train(model, tokenizer, job: dict, settings: CompareSettings, out: Path) -> dict:
    """Add the method, train it (until the plateau), return what the training measured."""
    from slimtune.config import TrainConfig
    from slimtune.training.loop import train
    from slimtune.training.setup import prepare_method

    method = job["method"]
    options = {"model": settings.model, "base_model": settings.model, "rank": job["rank"]}
    if method in RANKED:  # the same layers for all three (QLoRA's choice)
        options["target_modules"] = "all-linear"
        options["alpha"] = 2 * job["rank"]  # scaling 2 at every rank of the sweep
    model, save_fn = prepare_method(model, method, options)
    gc.collect()  # what preparing dropped (e.g. the weights QLoRA quantized away) leaves the
    release_freed_memory()  # process, so that the peak below counts training alone
    validate = settings.val_data is not None
    config = TrainConfig(
        max_steps=settings.max_steps, batch_size=settings.batch_size,
        max_length=settings.max_length, lr=job["lr"], seed=job["seed"], save_every=0,
        warmup_steps=max(1, min(settings.eval_every, settings.max_steps // 10)),
        eval_every=settings.eval_every if validate else 0, device=settings.device,
    )  # fmt: skip
    plateau = Plateau(settings.patience)
    with PeakMemory(_device(settings)) as peak:
        summary = train(model, tokenizer, settings.data, config, out, save_fn=save_fn,
                        eval_data=settings.val_data, overwrite=True, quiet=True,
                        run_config={"method": method}, stop_when=plateau if validate else None)  # fmt: skip
    curve = _curve(out)
    best = min(curve, key=lambda point: point[1]) if curve else [None, None]
    return model, {
        "lr": job["lr"], "seed": job["seed"], "rank": job["rank"] if method in RANKED else None,
        "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
        "peak_train_memory_mb": peak.peak_bytes / 2**20, "run_tokens_per_s": summary["tokens_per_s"],
        "first_loss": summary["first_loss"], "final_loss": summary["final_loss"],
        "steps": summary["steps"], "curve": curve, "val_loss": best[1], "plateau_step": best[0],
        "adapter_bytes": dir_bytes(out / "adapter"),
        "extra_context_tokens": getattr(model, "num_virtual_tokens", 0),
    }  # fmt: skip


def load_trained(base, method: str, run_dir: Path):
    """The model a run trained: its RUN/adapter on `base` (QLoRA's on the NF4 base), or for
    full fine-tuning the saved model itself. `base` is changed in place."""
    from slimtune.adapter_dir import load_adapter
    from slimtune.models import load_model
    from slimtune.quant.linear import quantize_model

    if method == "full":
        return load_model(run_dir / "adapter")[0]
    if method == "qlora":
        quantize_model(base, "nf4", skip=["lm_head"])
    return load_adapter(base, run_dir / "adapter")


def test_scores(model, tokenizer, settings: CompareSettings) -> dict[str, Any]:
    """Loss and exact match on every held-out split: heldout_loss, hard_exact_match, …"""
    from slimtune.evaluate import evaluate, load_for_eval

    model.eval()
    scores: dict[str, Any] = {}
    for prefix, path in (("", settings.eval_data), ("hard_", settings.hard_eval_data)):
        if path is None:
            continue
        heldout = load_for_eval(Path(path), tokenizer, settings.max_length, True)
        found = evaluate(model, tokenizer, heldout, max_length=settings.max_length, batch_size=32)
        scores[f"{prefix}heldout_loss"] = found["loss"]
        scores[f"{prefix}exact_match"] = found.get("exact_match")
    return scores


def run_job(job: dict[str, Any], settings: CompareSettings, out: Path) -> dict[str, Any]:
    """One run inside the child process: train (unless base) and, when job["test"], score the
    held-out splits; or (job["eval_of"]) score what an earlier run trained."""
    from slimtune.models import load_model

    # QLoRA trains as `slimtune train --method qlora` loads it: each weight quantized as it
    # arrives (the same NF4 bytes), so no full-precision copy counts in its peak memory
    training_qlora = job["method"] == "qlora" and not job.get("eval_of")
    model, tokenizer = load_model(settings.model, quantize="nf4" if training_qlora else None)
    torch.manual_seed(job["seed"])
    result: dict[str, Any] = {"label": job["label"], "method": job["method"]}
    if job.get("eval_of"):
        model = load_trained(model, job["method"], Path(job["eval_of"]))
        model.to(_device(settings))
    elif job["method"] == "base":
        total = sum(p.numel() for p in model.parameters())
        result.update(trainable_params=0, total_params=total, extra_context_tokens=0,
                      lr=None, seed=job["seed"], rank=None)  # fmt: skip
        model.to(_device(settings))
    else:
        model, trained = _train(model, tokenizer, job, settings, out)
        result.update(trained)
    if job.get("test", True):
        result.update(test_scores(model, tokenizer, settings))
    result["device"] = str(next(model.parameters()).device)
    result["threads"] = torch.get_num_threads()
    result["load_average"] = os.getloadavg()[0]  # other work on the machine skews timings
    result["cpu_s"] = time.process_time()  # CPU seconds of the whole run, every thread
    return result


def latency_job(dirs: dict[str, str], settings: CompareSettings) -> dict:
    """ms per token of the base model and every method (unmerged, then merged), one process."""
    import copy

    from slimtune.adapters.named import merge
    from slimtune.evaluate import exact_match_pairs, load_for_eval
    from slimtune.models import load_model
    from slimtune.training.data import collate, load_dataset

    device = _device(settings)
    base, tokenizer = load_model(settings.model)
    models = {label: base if label == "base" else load_trained(copy.deepcopy(base), label,
              Path(run_dir)) for label, run_dir in dirs.items()}  # fmt: skip
    models = {label: model.to(device).eval() for label, model in models.items()}
    heldout = load_for_eval(Path(settings.eval_data), tokenizer, settings.max_length, True)
    prompt = exact_match_pairs(heldout, tokenizer)[0][0] if heldout.format != "text" else [0] * 16
    train_data = load_dataset(settings.data, tokenizer, settings.max_length, quiet=True)
    batch = collate(train_data.examples[: settings.batch_size], pad_id=0)
    batch = {k: v.to(device) for k, v in batch.items()}
    trained = {k: v for k, v in models.items() if k != "base"}
    speed = interleaved_train_speed(trained, batch)
    unmerged = interleaved_latency(models, prompt, settings.latency_tokens)
    mergeable = {k: merge(v) for k, v in models.items() if k in MERGEABLE}
    merged = interleaved_latency({"base": base, **mergeable}, prompt, settings.latency_tokens)
    return {"unmerged": unmerged, "merged": merged, "train_tokens_per_s": speed,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
            "hardware": hardware(device), "device": str(device)}  # fmt: skip


def child_main(job_file: str) -> None:
    """Entry point of the child process: python -c '…child_main(job.json)'."""
    spec = json.loads(Path(job_file).read_text())
    fields = spec["settings"]
    for key in ("methods", "ranks", "lr_factors"):
        fields[key] = tuple(fields[key])
    settings, out = CompareSettings(**fields), Path(spec["out"])
    if spec["job"]["method"] == "latency":
        result = latency_job(spec["job"]["dirs"], settings)
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
        raise SlimtuneError(f"compare: the {run_name(job)} run failed: {tail}")
    return {**json.loads((out / "result.json").read_text()), "run": run_name(job)}


# ----------------------------------------------------------------------------- all runs


def carve_validation(data: Path, rows: int, out: Path) -> tuple[str, str]:
    """Move `rows` rows of a JSONL training file (chosen with a fixed seed, the same for every
    run) into DIR/runs/data/val.jsonl; the rest go to DIR/runs/data/train.jsonl."""
    if data.suffix != ".jsonl":
        raise SlimtuneError(f"--data {data}: validation rows are carved from .jsonl data only")
    lines = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < rows + 4:
        raise SlimtuneError(f"--data {data} has {len(lines)} rows: too few to keep {rows} apart")
    order = list(range(len(lines)))
    random.Random(1234).shuffle(order)
    val, train = sorted(order[:rows]), sorted(order[rows:])
    (out / "runs" / "data").mkdir(parents=True, exist_ok=True)
    paths = out / "runs" / "data" / "train.jsonl", out / "runs" / "data" / "val.jsonl"
    for path, picked in zip(paths, (train, val), strict=True):
        path.write_text("".join(lines[i] + "\n" for i in picked), encoding="utf-8")
    return str(paths[0]), str(paths[1])


def _run_all(todo: list[dict], settings: CompareSettings, out: Path, quiet: bool) -> list[dict]:
    def one(job: dict[str, Any]) -> dict[str, Any]:
        began = time.perf_counter()
        result = run_child(job, settings, out / "runs" / run_name(job))
        if not quiet:
            took = time.perf_counter() - began
            steps = f", {result['steps']} steps" if "steps" in result else ""
            print(f"{run_name(job)} done in {took:.0f} s{steps}", file=sys.stderr, flush=True)
        return result

    if not quiet:
        print(f"{len(todo)} runs, {settings.jobs} at a time …", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        return list(pool.map(one, todo))


def best_lrs(results: list[dict[str, Any]]) -> dict[str, float]:
    """Each config's lr with the lowest validation loss (held-out loss without validation)."""
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        if r["method"] == "base":
            continue
        score = r["val_loss"] if r.get("val_loss") is not None else r["heldout_loss"]
        if r["label"] not in best or score < best[r["label"]]["score"]:
            best[r["label"]] = {"score": score, "lr": r["lr"]}
    return {label: b["lr"] for label, b in best.items()}


def compare(
    settings: CompareSettings, out_dir: str | Path, *, quiet: bool = False, keep_runs: bool = False
) -> dict:
    """Run every method, then write DIR/report.json, DIR/report.md and the charts.

    DIR/runs/<run>/ (each run's directory) is removed at the end unless keep_runs.

    Returns:
        The report (report.json): settings, header, sweep, runs (one row per config).
    """
    from slimtune.compare.report import write_report
    from slimtune.compare.stats import build_report

    for path in (settings.data, settings.eval_data, settings.hard_eval_data):
        if path is not None and not Path(path).is_file():
            raise SlimtuneError(f"compare: data file {path} does not exist")
    if (settings.lr_factors or settings.patience) and not settings.val_rows:
        raise SlimtuneError(
            "compare: an lr sweep or a plateau needs validation rows (val_rows > 0)"
        )
    out, began = Path(out_dir), time.time()
    given_data = settings.data
    if settings.val_rows:
        train_path, val_path = carve_validation(Path(settings.data), settings.val_rows, out)
        settings = dataclasses.replace(settings, data=train_path, val_data=val_path)
    first = _run_all(jobs(settings), settings, out, quiet)
    chosen = best_lrs(first)
    winners = [r for r in first if r["method"] != "base" and r["lr"] == chosen[r["label"]]]
    evals = [] if not settings.lr_factors else [  # the sweep did not score the held-out splits
        {"label": r["label"], "method": r["method"], "rank": r["rank"], "lr": r["lr"],
         "seed": r["seed"], "eval_of": str(out / "runs" / r["run"])} for r in winners
    ]  # fmt: skip
    second = _run_all(evals + seed_jobs(settings, chosen), settings, out, quiet)
    for r, scores in zip(winners, second[: len(evals)], strict=False):
        r.update({k: v for k, v in scores.items() if "heldout" in k or "exact_match" in k})
        r["cpu_s"] += scores["cpu_s"]
    results = first + second[len(evals) :]
    timed = [r for r in first if r["label"] in ("base", *settings.methods)]
    dirs = {r["label"]: str(out / "runs" / r["run"]) for r in timed
            if r["method"] == "base" or r["lr"] == chosen[r["label"]]}  # fmt: skip
    if not quiet:
        print(f"latency of {', '.join(dirs)} (interleaved) …", file=sys.stderr, flush=True)
    job = {"label": "latency", "method": "latency", "dirs": dirs, "rank": None}
    latency = run_child(job, settings, out / "runs" / "latency")
    report = build_report(settings, results, chosen, latency)
    report["settings"]["data"] = given_data
    report["header"]["wall_time_s"] = time.time() - began
    write_report(report, out)
    if not keep_runs:
        shutil.rmtree(out / "runs", ignore_errors=True)
    return report
