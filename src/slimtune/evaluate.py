"""Evaluation and generation: loss, perplexity, exact match, streamed text.

    loss        = Σ -log p(label token) / number of label tokens      (nats per token)
    perplexity  = exp(loss)
    exact match = share of rows whose greedy continuation, whitespace-trimmed,
                  starts with the reference completion, whitespace-trimmed

Text longer than the window (max_length) is scored with a sliding window: windows
start every `stride` tokens and each scores only the tokens the previous one did
not, with up to max_length - stride tokens of context before them:

    tokens   0 ────────────── L
    window 1 [=========]              scores 0 .. L/2+L/2
    window 2      [....=====]         context (....), scores (=====)
    window 3           [....=====]
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.training.data import (
    IGNORE_INDEX,
    Dataset,
    Example,
    encode,
    end_token_id,
    load_dataset,
    render,
    truncate_examples,
    truncation_note,
)
from slimtune.training.loss import dataset_loss


def sliding_windows(example: Example, max_length: int, stride: int) -> list[Example]:
    """Windows of at most max_length tokens; each scores only tokens not scored before."""
    ids, labels = example.input_ids, example.labels
    if len(ids) <= max_length:
        return [example]
    windows, scored = [], 0  # scored: tokens [0, scored) already have their loss
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        context = max(0, scored - begin)  # leading tokens scored by an earlier window
        window_labels = [IGNORE_INDEX] * context + labels[begin + context : end]
        windows.append(Example(ids[begin:end], window_labels, example.line))
        scored = end
        if end == len(ids):
            break
    return windows


def exact_match_pairs(data: Dataset, tokenizer) -> list[tuple[list[int], str]]:
    """(prompt token ids, reference) per row: prompt/completion rows, or the last
    assistant turn of a messages row after the chat-rendered conversation before it."""
    pairs = []
    for row in data.rows:
        if data.format == "prompt_completion":
            pairs.append((encode(tokenizer, row["prompt"], special=True), row["completion"]))
        elif data.format == "messages":
            turns = row["messages"]
            last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
            prompt = render(tokenizer, turns[:last], generation_prompt=True)
            pairs.append((encode(tokenizer, prompt), turns[last]["content"]))
    return pairs


@torch.no_grad()
def greedy_continuations(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: list[int],
    batch_size: int = 8,
) -> list[str]:
    """Greedy continuation of each prompt (left-padded batches of similar length)."""
    device = next(model.parameters()).device
    eos = end_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(max_new_tokens[i] for i in rows),
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        for r, i in enumerate(rows):
            new = generated[r, width : width + max_new_tokens[i]]  # its own budget
            out[i] = tokenizer.decode(new, skip_special_tokens=True)
    model.train(was_training)
    return out


def exact_match(
    model: nn.Module, tokenizer, data: Dataset, batch_size: int = 8
) -> tuple[float, list[dict[str, str]]]:
    """(share of rows matched, [{prompt, reference, prediction, match}]) of a data set."""
    pairs = exact_match_pairs(data, tokenizer)
    budgets = [len(encode(tokenizer, ref)) + 2 for _, ref in pairs]
    predictions = greedy_continuations(model, tokenizer, [p for p, _ in pairs], budgets, batch_size)
    rows = []
    for (prompt, reference), prediction in zip(pairs, predictions, strict=True):
        match = prediction.strip().startswith(reference.strip())
        text = tokenizer.decode(prompt, skip_special_tokens=False)
        rows.append(
            {"prompt": text, "reference": reference, "prediction": prediction, "match": match}
        )
    return sum(r["match"] for r in rows) / max(len(rows), 1), rows


def evaluate(
    model: nn.Module,
    tokenizer,
    data: Dataset | str | Path,
    *,
    max_length: int = 1024,
    stride: int | None = None,
    batch_size: int = 8,
    with_exact_match: bool | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Loss, perplexity and (for prompt/completion and messages data) exact match.

    Args:
        model: a causal LM (adapters included).
        tokenizer: its tokenizer.
        data: a data file (any format of `slimtune.data`) or a loaded Dataset.
        max_length: the window; longer text is scored with a sliding window, longer
            prompt/completion and messages rows are cut as in training.
        stride: the sliding window's step (default max_length // 2).
        batch_size: rows per forward pass.
        with_exact_match: None: whenever the data has references (prompt/completion, messages).
        quiet: no line about truncated rows.

    Returns:
        {"rows", "tokens", "loss", "perplexity"} and, with references, "exact_match"
        (a share in [0, 1]) and "examples" (prompt, reference, prediction, match).
    """
    if not isinstance(data, Dataset):
        data = load_for_eval(Path(data), tokenizer, max_length, quiet)
    windows = [
        w
        for ex in data.examples
        for w in sliding_windows(ex, max_length, stride or max(1, max_length // 2))
    ]
    loss = dataset_loss(model, windows, batch_size)
    tokens = sum(sum(1 for x in w.labels[1:] if x != IGNORE_INDEX) for w in windows)
    result: dict[str, Any] = {
        "data": data.path,
        "format": data.format,
        "rows": len(data.examples),
        "tokens": tokens,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
    }
    has_refs = data.format in ("prompt_completion", "messages")
    if has_refs if with_exact_match is None else with_exact_match:
        result["exact_match"], result["examples"] = exact_match(model, tokenizer, data, batch_size)
    return result


def load_for_eval(path: Path, tokenizer, max_length: int, quiet: bool) -> Dataset:
    """Whole text rows and .txt files (for the sliding window); other rows cut as in training."""
    whole = 10**12 if path.suffix == ".txt" else max_length
    data = load_dataset(path, tokenizer, whole, truncate=False)
    if data.format in ("prompt_completion", "messages"):
        truncate_examples(data, max_length)
        if data.truncated and not quiet:
            print(truncation_note(data, max_length))
    return data


def callback_streamer(tokenizer, callback: Callable[[str], None]):
    """A transformers streamer that hands decoded text to `callback` as it is produced."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            callback(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    raw: bool = False,
    stream: Callable[[str], None] | None = None,
    seed: int = 0,
) -> str:
    """Continue `prompt` (as a user turn of the chat template unless raw); stop at the end token.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        prompt: the user's text.
        max_new_tokens: the most tokens generated.
        temperature: 0 is greedy; above 0 samples from softmax(logits / temperature).
        raw: continue the text as given, without the chat template.
        stream: called with each piece of decoded text as it is produced.
        seed: fixes sampling.

    Returns:
        The generated text (without the prompt and the end token).
    """
    chat = not raw and getattr(tokenizer, "chat_template", None)
    text = render(tokenizer, [{"role": "user", "content": prompt}], True) if chat else prompt
    ids = torch.tensor([encode(tokenizer, text, special=not chat)])
    device = next(model.parameters()).device
    eos = end_token_id(tokenizer)
    torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    model.eval()
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        streamer=callback_streamer(tokenizer, stream) if stream else None,
        **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# ----------------------------------------------------------------------------- loading
# (eval, generate and the web app's chat load a model and adapter the same way)


def load_for_inference(
    model_spec: str, adapter: str | None, quantize: str | None = None, force: bool = False
):
    """(model, tokenizer): the base model, quantized as the adapter trained (or as --quant,
    see inference_quantization), with the adapter loaded."""
    from slimtune.models import inference_placement, load_model, ready_for_gpu_inference

    if adapter is not None and not Path(adapter).is_dir():
        raise SlimtuneError(f"--adapter {adapter} is not a directory (give RUN/adapter)")
    record = inference_quantization(quantize, trained_quantization(adapter), force)
    placement = inference_placement((record or {}).get("dtype"))  # a GPU when there is one
    if record:  # quantized as each weight arrives: no full-precision copy, on the GPU either
        from slimtune.quant.linear import quantization_settings

        options = quantization_settings(record)
        placement = {**placement, "quantize": record["quant"], "quant_options": options}
    model, tokenizer = load_model(model_spec, **placement)
    if adapter is not None:
        from slimtune.adapter_dir import load_adapter
        from slimtune.training.templates import adapter_chat_template

        model = load_adapter(model, adapter)
        adapter_chat_template(tokenizer, adapter)  # trained with --chat-template
    if "device" in placement:
        ready_for_gpu_inference(model, placement["dtype"])
    model.eval()
    return model, tokenizer


def trained_quantization(adapter: str | None) -> dict[str, Any] | None:
    """How the base of a QLoRA adapter was quantized in training (from its file's metadata)."""
    if adapter is None:
        return None
    from slimtune.adapter_dir import read_adapter_metadata
    from slimtune.quant.linear import METADATA_KEY

    text = read_adapter_metadata(adapter).get(METADATA_KEY)
    return json.loads(text) if text else None


def inference_quantization(
    quant: str | None, trained: dict[str, Any] | None, force: bool
) -> dict[str, Any] | None:
    """How to quantize the base for eval: as the adapter's metadata says it trained (QLoRA).

    `--quant` that names another quantization than the recorded one measures a model that
    was never trained; it is refused unless `--force` confirms it. `--quant` on an adapter
    trained on an unquantized base (or on no adapter) quantizes the base as asked.
    """
    if force and (quant is None or trained is None or trained["quant"] == quant):
        raise SlimtuneError(
            "--force confirms a --quant that differs from the adapter's recorded "
            "quantization; here there is none to confirm"
        )
    if quant is None or (trained is not None and trained["quant"] == quant):
        return trained  # the recorded settings (block size, double quantization) too
    if trained is None:
        return {"quant": quant, "skip": ["lm_head"]}
    if not force:
        raise SlimtuneError(
            f"--quant {quant}: this adapter was trained on a {trained['quant']} base (its "
            f"metadata records it), so {quant} would score another model; leave --quant out "
            "to use the recorded one, or add --force to score it anyway"
        )
    return {"quant": quant, "skip": trained.get("skip", ["lm_head"])}
