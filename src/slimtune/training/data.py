"""Training data: rows of any supported file, tokenized with a loss mask, batched by length.

Files (readers.py): JSONL, CSV, Parquet, a `datasets.save_to_disk` directory, several of
them joined with commas, or a .txt file. Row formats (formats.py: Alpaca, ShareGPT, TRL's
conversational prompt/completion, …) become one of three kinds of row:

    {"prompt": P, "completion": C}   ids = tok(P) + tok(C) + [eos]     loss on C + eos
    {"messages": [{"role", "content"}, …]}  the tokenizer's chat template; loss on each
                                     assistant turn's content and its end token (turns of
                                     a conversational prompt learn nothing)
    {"text": T}                      ids = tok(T) + [eos]               loss everywhere
    file.txt                         one token stream packed into max_length chunks

A label of -100 marks a position without loss; the model predicts labels[t+1] from
the tokens up to t, so the loss mask is simply `labels != -100`:

    tokens   <|im_start|> u s e r \\n h i <|im_end|> \\n <|im_start|> a … \\n y o <|im_end|>
    labels    -100 …                                                  -100 y o <|im_end|>

Every completion and assistant turn ends with the end token, so a trained model stops.
An assistant turn is tokenized on its own, after the prompt rendered with the
generation prompt, which is exactly what the model sees when it generates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtune.errors import SlimtuneError
from slimtune.file_checks import decode_utf8
from slimtune.training.readers import read_source, split_paths

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized row: input ids and labels of the same length (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]
    line: int = 0  # line of the source file (1-based; 0 for packed .txt chunks)
    position_ids: list[int] | None = None  # packed rows (packing.py): restart at each row


@dataclass
class Dataset:
    """Tokenized examples of one file, with what happened while reading it."""

    path: str
    format: str  # kind of row: "prompt_completion", "messages", "text", "mixed" or "txt"
    examples: list[Example]
    rows: list[dict[str, Any]]  # the rows as that kind (empty for .txt)
    source: str = ""  # the file formats read, e.g. "alpaca" or "alpaca,sharegpt"
    truncated: int = 0  # rows cut to max_length
    dropped: int = 0  # rows left without a loss token after the cut

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_label_tokens(self) -> int:
        return sum(sum(1 for x in ex.labels if x != IGNORE_INDEX) for ex in self.examples)


# ---------------------------------------------------------------- tokenizing


def encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def end_token_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise SlimtuneError("the tokenizer has no end (eos) token; slimtune needs one to stop")
    return int(tokenizer.eos_token_id)


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str) -> Example:
    """tok(prompt) (with the tokenizer's BOS, if any) + tok(completion) + [eos]; loss on the latter."""
    head = encode(tokenizer, prompt, special=True)
    tail = encode(tokenizer, completion) + [end_token_id(tokenizer)]
    return Example(head + tail, [IGNORE_INDEX] * len(head) + tail)


def render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise SlimtuneError(
            "chat data (messages, Alpaca, ShareGPT) needs a chat template and this model's "
            "tokenizer has none: give --chat-template chatml, llama3 or FILE.jinja"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def tokenize_messages(tokenizer, messages: list[dict[str, str]], prompt_turns: int = 0) -> Example:
    """The chat template's text, cut around each assistant turn; loss on turns + end token.

    For assistant turn i the text before it is render(messages[:i], generation prompt);
    its content follows, then the template's end token (added if the template has none).
    The first `prompt_turns` turns are context only: their assistant turns learn nothing.
    """
    eos, eos_text = end_token_id(tokenizer), tokenizer.eos_token
    full = render(tokenizer, messages, generation_prompt=False)
    ids: list[int] = []
    labels: list[int] = []
    done = 0  # characters of `full` already tokenized
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant" or i < prompt_turns:
            continue
        content = turn["content"].strip()
        if i:
            prefix = render(tokenizer, messages[:i], generation_prompt=True)
        else:  # the assistant speaks first: the template's text up to its content
            first = render(tokenizer, messages[:1], generation_prompt=False)
            prefix = first[: first.rfind(content)]
        start = full.find(content, len(prefix)) if full.startswith(prefix) else -1
        if start < done:
            raise SlimtuneError("the chat template does not render conversations prefix by prefix")
        end = start + len(content)
        before = encode(tokenizer, full[done:start])
        answer = encode(tokenizer, full[start:end]) + [eos]
        done = end + len(eos_text) if full.startswith(eos_text, end) else end
        ids += before + answer
        labels += [IGNORE_INDEX] * len(before) + answer
    rest = encode(tokenizer, full[done:])
    return Example(ids + rest, labels + [IGNORE_INDEX] * len(rest))


def tokenize_text(tokenizer, text: str) -> Example:
    ids = encode(tokenizer, text, special=True) + [end_token_id(tokenizer)]
    return Example(ids, list(ids))


def tokenize_row(tokenizer, row: dict[str, Any], kind: str) -> Example:
    """Tokenize a converted row of `kind` (formats.py turns every format into one of three)."""
    if kind == "prompt_completion":
        return tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"])
    if kind == "messages":
        return tokenize_messages(tokenizer, row["messages"], row.get("prompt_turns", 0))
    return tokenize_text(tokenizer, row["text"])


def pack_text_file(tokenizer, path: Path, max_length: int) -> list[Example]:
    """A .txt file as one token stream (+ eos), cut into max_length chunks; loss everywhere."""
    text = decode_utf8(path.read_bytes(), path)
    if not text.strip():
        raise SlimtuneError(f"{path} is empty: give some text to learn from")
    ids = encode(tokenizer, text, special=True) + [end_token_id(tokenizer)]
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [Example(chunk, list(chunk)) for chunk in chunks if len(chunk) > 1]


def load_dataset(
    path: str | Path, tokenizer, max_length: int, *, truncate: bool = True, quiet: bool = False
) -> Dataset:
    """Read, check and tokenize data; rows longer than max_length are cut (and counted).

    Args:
        path: a .jsonl, .csv or .parquet file, a `datasets.save_to_disk` directory, several
            of them joined with commas ("a.jsonl,b.csv"), or one .txt file.
        tokenizer: a transformers tokenizer with an end token (and a chat template for chat rows).
        max_length: the most tokens a row keeps; a .txt file is packed into chunks of this size.
        truncate: False keeps full rows (evaluation with a sliding window over long text).
        quiet: no line about truncated rows.
    """
    paths = split_paths(path)
    if any(p.suffix == ".txt" for p in paths):
        if len(paths) > 1:
            raise SlimtuneError(f"--data {path}: a .txt file cannot be joined with other files")
        if not paths[0].is_file():
            raise SlimtuneError(f"data file {paths[0]} does not exist")
        return Dataset(str(path), "txt", pack_text_file(tokenizer, paths[0], max_length), [])
    examples, rows, sources = [], [], {}
    for record in read_source(path):
        sources[record.fmt.name] = True
        row = record.fmt.convert(record.row)
        example = tokenize_row(tokenizer, row, record.fmt.kind)
        example.line = record.line
        examples.append(example)
        rows.append(row)
    kinds = {kind_of(row) for row in rows}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    data = Dataset(str(path), kind, examples, rows, source=",".join(sources))
    if truncate:
        truncate_examples(data, max_length)
        if data.truncated and not quiet:
            print(truncation_note(data, max_length))
    return data


def kind_of(row: dict[str, Any]) -> str:
    """A converted row's kind: "messages", "prompt_completion" or "text"."""
    return "messages" if "messages" in row else "text" if "text" in row else "prompt_completion"


def truncate_examples(data: Dataset, max_length: int) -> None:
    """Cut rows to max_length in place; drop those left without any loss token."""
    kept, kept_rows = [], []
    for example, row in zip(data.examples, data.rows or [None] * len(data.examples), strict=True):
        if len(example.input_ids) > max_length:
            data.truncated += 1
            example.input_ids = example.input_ids[:max_length]
            example.labels = example.labels[:max_length]
        if all(x == IGNORE_INDEX for x in example.labels[1:]):
            data.dropped += 1
            continue
        kept.append(example)
        kept_rows.append(row)
    data.examples = kept
    data.rows = kept_rows if data.rows else []
    if not kept:
        raise SlimtuneError(f"{data.path}: no row has a token to learn within {max_length} tokens")


def truncation_note(data: Dataset, max_length: int) -> str:
    total = len(data.examples) + data.dropped
    note = f"{data.path}: {data.truncated} of {total} rows were longer than {max_length} tokens and were cut"
    if data.dropped:
        note += f" ({data.dropped} dropped: nothing left to learn after the cut)"
    return note


# ---------------------------------------------------------------- batches


def batch_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """The batches (lists of row indices) of one epoch, fixed by (seed, epoch).

    Rows are shuffled, then sorted by length inside windows of 64 batches and cut into
    batches, whose order is shuffled again: little padding, yet a random order.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        window = batch_size * 64
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in shuffle]
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels, (B, T) each.

    Packed examples add position_ids (B, T): each row's restart at 0, and so does the
    padding, which thereby forms a block of its own that no row attends to.
    """
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = any(ex.position_ids is not None for ex in examples)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(ex.position_ids or list(range(n)))
            positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {**batch, "position_ids": positions} if packed else batch


def batches_from(
    data: Dataset, batch_size: int, seed: int, pad_id: int, start: int = 0, group: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches, epoch after epoch, beginning at micro-batch number `start`."""
    lengths = [len(ex.input_ids) for ex in data.examples]
    per_epoch = math.ceil(len(lengths) / batch_size)
    epoch, index = divmod(start, per_epoch)
    while True:
        order = batch_order(lengths, batch_size, seed, epoch, group)
        for rows in order[index:]:
            yield collate([data.examples[i] for i in rows], pad_id)
        epoch, index = epoch + 1, 0


class DeviceBatch(dict):
    """A batch's tensors on the training device, with the host tensors they were copied from
    (`host`): counts and masks are read there, without waiting for the GPU."""

    host: dict[str, torch.Tensor]


def send(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`; a CPU tensor goes to a GPU from pinned memory without blocking the host
    (a copy from pageable memory waits for all the work queued before it)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> DeviceBatch:
    """The batch on `device`, keeping its host tensors (`DeviceBatch.host`)."""
    moved = DeviceBatch({k: send(v, device) for k, v in batch.items()})
    moved.host = batch
    return moved
