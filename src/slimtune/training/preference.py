"""Preference data: pairs of a chosen and a rejected answer to one prompt, in TRL's formats.

    {"prompt": P, "chosen": C, "rejected": R}        strings: P + C + eos, loss on C + eos
    {"prompt": [msg…], "chosen": [msg…], "rejected": [msg…]}   conversational: the chat
                                                     template of P + C; loss on C's assistant turns
    {"chosen": …, "rejected": …}                     implicit prompt: the part both share (whole
                                                     turns of two conversations, or the common
                                                     start of two strings) is the prompt

The format is set by the first row and checked on every row. Each pair is tokenized with
the SFT data's own helpers (data.py), so an answer is labelled exactly as a completion or an
assistant turn is in supervised training:

    chosen    ids = tok(P) + tok(C) + [eos]     labels = -100 … C eos
    rejected  ids = tok(P) + tok(R) + [eos]     labels = -100 … R eos

A batch of B pairs is one (2B, T) batch, the chosen rows first (`collate_pairs`).
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
from slimtune.training.data import (
    IGNORE_INDEX,
    Example,
    batch_order,
    collate,
    tokenize_messages,
    tokenize_prompt_completion,
)
from slimtune.training.formats import check_turns

ACCEPTED = (
    '{"prompt", "chosen", "rejected"} (strings, or message lists) or {"chosen", "rejected"} '
    "(the prompt is the part they share)"
)


@dataclass
class PreferencePair:
    """One tokenized pair: the prompt with the chosen answer, and with the rejected one."""

    chosen: Example
    rejected: Example
    line: int = 0  # line of the source file (1-based)

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


@dataclass
class PreferenceData:
    """The tokenized pairs of one file."""

    path: str
    format: str  # "strings", "conversational", "implicit strings" or "implicit conversational"
    pairs: list[PreferencePair]
    rows: list[dict[str, Any]]  # the rows as read (prompt made explicit)
    truncated: int = 0  # pairs with a side cut to max_length
    dropped: int = 0  # pairs left without an answer token after the cut

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def examples(self) -> list[Example]:
        """Every tokenized side, chosen and rejected (a batch of B pairs holds 2B rows)."""
        return [side for pair in self.pairs for side in (pair.chosen, pair.rejected)]


# ---------------------------------------------------------------- reading and checking rows


def read_pairs(path: str | Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """The format and the (line, row with an explicit prompt) pairs of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"data file {path} does not exist")
    rows, fmt = [], None
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SlimtuneError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SlimtuneError(f"{where}: not valid JSON ({exc.msg})") from None
            found = row_format(row, where)
            if fmt is not None and found != fmt:
                raise SlimtuneError(
                    f"{where}: this row's format is {found}, the file's ({fmt}) is set by its "
                    "first row; one format per file"
                )
            fmt = found
            rows.append((number, explicit_prompt(row, where)))
    if not rows:
        raise SlimtuneError(f"{path} is empty: give one JSON object per line, {ACCEPTED}")
    return fmt, rows


def row_format(row: Any, where: str) -> str:
    """'strings', 'conversational', 'implicit strings' or 'implicit conversational'; checked."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise SlimtuneError(f"{where}: a preference row has {found}; accepted rows: {ACCEPTED}")
    keys = ("prompt", "chosen", "rejected") if "prompt" in row else ("chosen", "rejected")
    if all(isinstance(row[key], str) for key in keys):
        kind = "strings"
    elif all(isinstance(row[key], list) for key in keys):
        kind = "conversational"
        for key in keys:
            check_messages(row[key], f"{where}: '{key}'", learn=key != "prompt")
    else:
        types = ", ".join(f"{key}: {type(row[key]).__name__}" for key in keys)
        raise SlimtuneError(
            f"{where}: {'/'.join(keys)} must all be strings or all be message lists ({types})"
        )
    if row["chosen"] == row["rejected"]:
        raise SlimtuneError(f"{where}: 'chosen' and 'rejected' are the same; nothing to prefer")
    return kind if "prompt" in row else f"implicit {kind}"


def check_messages(messages: list, where: str, learn: bool) -> None:
    if not messages:
        raise SlimtuneError(f"{where} is an empty message list")
    check_turns(messages, where)
    if learn and not any(turn["role"] == "assistant" for turn in messages):
        raise SlimtuneError(f"{where} has no assistant turn to learn")


def explicit_prompt(row: dict[str, Any], where: str) -> dict[str, Any]:
    """{prompt, chosen, rejected}: an implicit prompt is the part chosen and rejected share.

    Conversations share whole turns; strings share characters, and a space before the
    first differing character goes with the answers (TRL's extract_prompt).
    """
    if "prompt" in row:
        return {key: row[key] for key in ("prompt", "chosen", "rejected")}
    chosen, rejected = row["chosen"], row["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if isinstance(chosen, str) and shared and chosen[shared - 1] == " ":
        shared -= 1
    pair = {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    if isinstance(chosen, list):
        for key in ("chosen", "rejected"):
            if not any(turn["role"] == "assistant" for turn in pair[key]):
                raise SlimtuneError(
                    f"{where}: after the turns both share, '{key}' has no assistant turn left"
                )
    elif not pair["chosen"] or not pair["rejected"]:
        raise SlimtuneError(f"{where}: one of 'chosen' and 'rejected' starts the other")
    return pair


# ---------------------------------------------------------------- tokenizing


def tokenize_answer(tokenizer, prompt: str | list, answer: str | list) -> Example:
    """The prompt and one answer, labelled on the answer alone (its assistant turns + ends)."""
    if isinstance(prompt, str):
        return tokenize_prompt_completion(tokenizer, prompt, answer)
    example = tokenize_messages(tokenizer, prompt + answer)
    in_prompt = sum(turn["role"] == "assistant" for turn in prompt)
    return unlabel_first_turns(example, in_prompt)


def unlabel_first_turns(example: Example, turns: int) -> Example:
    """Remove the labels of the first `turns` labelled runs (assistant turns of the prompt)."""
    labels, run, inside = list(example.labels), 0, False
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            inside = False
            continue
        if not inside:
            run, inside = run + 1, True
        if run <= turns:
            labels[i] = IGNORE_INDEX
    return Example(example.input_ids, labels, example.line)


def tokenize_pair(tokenizer, row: dict[str, Any], line: int = 0) -> PreferencePair:
    chosen = tokenize_answer(tokenizer, row["prompt"], row["chosen"])
    rejected = tokenize_answer(tokenizer, row["prompt"], row["rejected"])
    chosen.line = rejected.line = line
    return PreferencePair(chosen, rejected, line)


def load_preference_data(
    path: str | Path, tokenizer, max_length: int, *, quiet: bool = False
) -> PreferenceData:
    """Read, check and tokenize a preference file; sides longer than max_length are cut.

    Args:
        path: a .jsonl file of preference rows (see the module docstring).
        tokenizer: a transformers tokenizer with an end token (and a chat template for messages).
        max_length: the most tokens each side (prompt + answer) keeps.
        quiet: no line about cut pairs.
    """
    fmt, rows = read_pairs(path)
    pairs = [tokenize_pair(tokenizer, row, number) for number, row in rows]
    data = PreferenceData(str(path), fmt, pairs, [row for _, row in rows])
    truncate_pairs(data, max_length)
    if data.truncated and not quiet:
        note = f"{data.path}: {data.truncated} of {len(rows)} pairs were longer than {max_length} tokens and were cut"
        print(note + (f" ({data.dropped} dropped: no answer left)" if data.dropped else ""))
    return data


def truncate_pairs(data: PreferenceData, max_length: int) -> None:
    """Keep the first max_length tokens of each side; drop pairs left without an answer."""
    kept, kept_rows = [], []
    for pair, row in zip(data.pairs, data.rows, strict=True):
        if pair.length > max_length:
            data.truncated += 1
            for side in (pair.chosen, pair.rejected):
                side.input_ids, side.labels = side.input_ids[:max_length], side.labels[:max_length]
        if any(
            all(x == IGNORE_INDEX for x in side.labels[1:]) for side in (pair.chosen, pair.rejected)
        ):
            data.dropped += 1
            continue
        kept.append(pair)
        kept_rows.append(row)
    data.pairs, data.rows = kept, kept_rows
    if not kept:
        raise SlimtuneError(
            f"{data.path}: no pair keeps an answer token within {max_length} tokens"
        )


# ---------------------------------------------------------------- batches


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded (2B, T) batch: the B chosen rows, then the B rejected rows."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def pair_batches(
    data: PreferenceData,
    batch_size: int,
    seed: int,
    pad_id: int,
    start: int = 0,
    group: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of pairs, epoch after epoch, from batch number `start` (as data.batches_from)."""
    lengths = [pair.length for pair in data.pairs]
    per_epoch = math.ceil(len(lengths) / batch_size)
    epoch, index = divmod(start, per_epoch)
    while True:
        for rows in batch_order(lengths, batch_size, seed, epoch, group)[index:]:
            yield collate_pairs([data.pairs[i] for i in rows], pad_id)
        epoch, index = epoch + 1, 0
