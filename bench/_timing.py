"""Shared pieces of the slimtune-vs-PEFT step benches (bench/lora_layer.py, bench/dora.py).

`median_step_times` runs one forward+backward per model per repetition, alternating the
order each repetition so that machine noise hits every model alike, and returns the
median seconds per step of each model (warm-up repetitions are not counted).
"""

from __future__ import annotations

import statistics
import time

import torch

# SmolLM2-135M's architecture (its config.json): timing depends on shapes, not on values
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0,
)  # fmt: skip


def step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """One causal-LM forward+backward on `ids` (B, T), then drop the gradients."""
    model(input_ids=ids, labels=ids).loss.backward()
    for param in model.parameters():
        param.grad = None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_step_times(
    models: dict[str, torch.nn.Module], ids: torch.Tensor, device: str, warmup: int, reps: int
) -> dict[str, float]:
    """Median seconds per `step` of each model, timed interleaved (order alternates)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(warmup + reps):
        order = list(models) if rep % 2 == 0 else list(models)[::-1]
        for name in order:
            sync(device)
            start = time.perf_counter()
            step(models[name], ids)
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def device_name(device: str) -> str:
    """The GPU's name, or "CPU (N threads)"."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"
