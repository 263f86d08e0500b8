"""Training data: JSONL rows or a .txt file, tokenized with a loss mask, batched by length.

Formats (detected from the first row of a JSONL file, then checked on every row):

    {"prompt": P, "completion": C}   ids = tok(P) + tok(C) + [eos]     loss on C + eos
    {"messages": [{"role", "content"}, …]}  the tokenizer's chat template; loss on each
                                     assistant turn's content and its end token
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

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtune.errors import SlimtuneError

IGNORE_INDEX = -100
FORMATS = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}
ACCEPTED = '{"prompt", "completion"}, {"messages": [...]} or {"text"}'


@dataclass
class Example:
    """One tokenized row: input ids and labels of the same length (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]
    line: int = 0  # line of the source file (1-based; 0 for packed .txt chunks)


@dataclass
class Dataset:
    """Tokenized examples of one file, with what happened while reading it."""

    path: str
    format: str  # "prompt_completion", "messages", "text" or "txt"
    examples: list[Example]
    rows: list[dict[str, Any]]  # the raw rows (empty for .txt)
    truncated: int = 0  # rows cut to max_length
    dropped: int = 0  # rows left without a loss token after the cut

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_label_tokens(self) -> int:
        return sum(sum(1 for x in ex.labels if x != IGNORE_INDEX) for ex in self.examples)


# ---------------------------------------------------------------- reading and checking rows


def read_rows(path: str | Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """The format and the (line number, row) pairs of a JSONL file; every row is checked."""
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"data file {path} does not exist")
    rows: list[tuple[int, dict[str, Any]]] = []
    fmt = None
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SlimtuneError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            fmt = fmt or detect_format(row, path, number)
            check_row(row, fmt, path, number)
            rows.append((number, row))
    if not rows:
        raise SlimtuneError(f"{path} is empty: give one JSON object per line, {ACCEPTED}")
    return fmt, rows


def detect_format(row: Any, path: Path, line: int) -> str:
    if isinstance(row, dict):
        for fmt, keys in FORMATS.items():
            if all(key in row for key in keys):
                return fmt
    found = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise SlimtuneError(f"{path}:{line}: a row has {found}; accepted rows: {ACCEPTED}")


def check_row(row: Any, fmt: str, path: Path, line: int) -> None:
    """The row has its format's fields (strings, or a messages list) and no other format's."""
    where = f"{path}:{line}"
    if not isinstance(row, dict):
        raise SlimtuneError(f"{where}: a row must be a JSON object, not {type(row).__name__}")
    missing = [key for key in FORMATS[fmt] if key not in row]
    others = [k for f, keys in FORMATS.items() if f != fmt for k in keys if k in row]
    others = [key for key in others if key not in FORMATS[fmt]]
    if missing or others:
        raise SlimtuneError(
            f"{where}: fields {sorted(row)} do not match the file's format "
            f"{{{', '.join(map(repr, FORMATS[fmt]))}}} (set by its first row); one format per file"
        )
    if fmt == "messages":
        check_messages(row["messages"], where)
        return
    for key in FORMATS[fmt]:
        if not isinstance(row[key], str):
            raise SlimtuneError(f"{where}: field {key!r} must be a string")


def check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise SlimtuneError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise SlimtuneError(f"{where}: each message needs a string 'content' and a 'role'")
        if turn.get("role") not in ("system", "user", "assistant", "tool"):
            raise SlimtuneError(
                f"{where}: role {turn.get('role')!r} is not one of system, user, assistant, tool"
            )
    if not any(turn["role"] == "assistant" for turn in messages):
        raise SlimtuneError(f"{where}: a messages row needs at least one assistant turn to learn")


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
            "messages data needs a tokenizer with a chat template; this one has none"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def tokenize_messages(tokenizer, messages: list[dict[str, str]]) -> Example:
    """The chat template's text, cut around each assistant turn; loss on turns + end token.

    For assistant turn i the text before it is render(messages[:i], generation prompt);
    its content follows, then the template's end token (added if the template has none).
    """
    eos, eos_text = end_token_id(tokenizer), tokenizer.eos_token
    full = render(tokenizer, messages, generation_prompt=False)
    ids: list[int] = []
    labels: list[int] = []
    done = 0  # characters of `full` already tokenized
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], generation_prompt=True)
        content = turn["content"].strip()
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


def tokenize_row(tokenizer, row: dict[str, Any], fmt: str) -> Example:
    if fmt == "prompt_completion":
        return tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"])
    if fmt == "messages":
        return tokenize_messages(tokenizer, row["messages"])
    return tokenize_text(tokenizer, row["text"])


def pack_text_file(tokenizer, path: Path, max_length: int) -> list[Example]:
    """A .txt file as one token stream (+ eos), cut into max_length chunks; loss everywhere."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise SlimtuneError(f"{path} is empty: give some text to learn from")
    ids = encode(tokenizer, text, special=True) + [end_token_id(tokenizer)]
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [Example(chunk, list(chunk)) for chunk in chunks if len(chunk) > 1]


def load_dataset(
    path: str | Path, tokenizer, max_length: int, *, truncate: bool = True, quiet: bool = False
) -> Dataset:
    """Read, check and tokenize a data file; rows longer than max_length are cut (and counted).

    Args:
        path: a .jsonl file (any of the three row formats) or a .txt file.
        tokenizer: a transformers tokenizer with an end token (and a chat template for messages).
        max_length: the most tokens a row keeps; a .txt file is packed into chunks of this size.
        truncate: False keeps full rows (evaluation with a sliding window over long text).
        quiet: no line about truncated rows.
    """
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise SlimtuneError(f"data file {path} does not exist")
        return Dataset(str(path), "txt", pack_text_file(tokenizer, path, max_length), [])
    fmt, rows = read_rows(path)
    examples = []
    for number, row in rows:
        example = tokenize_row(tokenizer, row, fmt)
        example.line = number
        examples.append(example)
    data = Dataset(str(path), fmt, examples, [row for _, row in rows])
    if truncate:
        truncate_examples(data, max_length)
        if data.truncated and not quiet:
            print(truncation_note(data, max_length))
    return data


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
    """Right-padded input_ids, attention_mask and labels, (B, T) each."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
