"""Measuring a run: peak memory, latency per generated token, training throughput.

Timings interleave the models (each round in the reverse order of the last) inside one
process, so that whatever else the machine does hits them alike; each figure keeps the
fastest round and the spread over rounds.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import torch


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


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def hardware(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: processor, core count, accelerator, torch."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    found = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        found.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1))
    return found
