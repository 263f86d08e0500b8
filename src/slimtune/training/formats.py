"""Row formats: the data shapes users bring from TRL, LLaMA-Factory and Axolotl, each turned
into one of the three kinds of row the tokenizer knows (prompt/completion, messages, text).

    format          a row                                                    becomes (kind)
    prompt_completion {"prompt": str, "completion": str}                     itself
    conversational  {"prompt": [message…], "completion": [message…]}  (TRL)  messages; loss on
                                                                             the completion's turns
    messages        {"messages": [{"role", "content"}, …]}                   itself
    alpaca          {"instruction", "input"?, "output", "system"?}           messages: system?,
                                                                             user (instruction
                                                                             + "\\n" + input),
                                                                             assistant (output)
    sharegpt        {"conversations": [{"from": human|gpt|system, "value"}]} messages
    text            {"text": str}                                            itself

A file's format is the first in `FORMATS` whose `matches` accepts its first row; every row
is then checked against it (`check_row`), so one file holds one format. Fields that belong
to no format (an "id", a "source") are ignored. Adding a format is one `RowFormat` in the
table: its required keys, a check that raises a SlimtuneError naming `where`, and a
conversion to a row of its kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slimtune.errors import SlimtuneError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
Row = dict[str, Any]


@dataclass(frozen=True)
class RowFormat:
    """One data format: how to recognise, check and convert its rows."""

    name: str
    keys: tuple[str, ...]  # fields every row has; they identify the format
    kind: str  # what convert returns: "prompt_completion", "messages" or "text"
    check: Callable[[Row, str], None]  # raises SlimtuneError("{where}: …") on a bad row
    convert: Callable[[Row], Row]  # a checked row -> a row of `kind`
    matches: Callable[[Row], bool] = lambda row: True  # beyond having `keys`
    optional: tuple[str, ...] = ()  # fields it may have besides `keys`


# ---------------------------------------------------------------- checks


def check_strings(row: Row, where: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if not isinstance(row[key], str):
            raise SlimtuneError(f"{where}: field {key!r} must be a string")


def check_turns(messages: list, where: str) -> None:
    """Every turn is a dict with a string 'content' and a known 'role'."""
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise SlimtuneError(f"{where}: each message needs a string 'content' and a 'role'")
        if turn.get("role") not in ROLES:
            raise SlimtuneError(
                f"{where}: role {turn.get('role')!r} is not one of {', '.join(ROLES)}"
            )


def check_messages(messages: Any, where: str, field: str = "messages", learn: bool = True) -> None:
    """A non-empty list of {role, content} with known roles (and an assistant turn to learn)."""
    if not isinstance(messages, list) or not messages:
        raise SlimtuneError(f"{where}: {field!r} must be a non-empty list of {{role, content}}")
    check_turns(messages, where)
    if learn and not any(turn["role"] == "assistant" for turn in messages):
        raise SlimtuneError(f"{where}: a {field} row needs at least one assistant turn to learn")


def _check_prompt_completion(row: Row, where: str) -> None:
    check_strings(row, where, ("prompt", "completion"))


def _check_conversational(row: Row, where: str) -> None:
    check_messages(row["prompt"], where, "prompt", learn=False)
    check_messages(row["completion"], where, "completion")


def _check_messages(row: Row, where: str) -> None:
    check_messages(row["messages"], where)


def _check_alpaca(row: Row, where: str) -> None:
    check_strings(row, where, ("instruction", "output"))
    for key in ("input", "system"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise SlimtuneError(f"{where}: field {key!r} must be a string")


def _check_sharegpt(row: Row, where: str) -> None:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise SlimtuneError(f"{where}: 'conversations' must be a non-empty list of {{from, value}}")
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SlimtuneError(f"{where}: each conversation turn needs a string 'value'")
        if turn.get("from") not in SHAREGPT_ROLES:
            raise SlimtuneError(
                f"{where}: 'from' {turn.get('from')!r} is not one of human, gpt, system"
            )
    if not any(turn["from"] == "gpt" for turn in turns):
        raise SlimtuneError(f"{where}: a conversations row needs at least one 'gpt' turn to learn")


def _check_text(row: Row, where: str) -> None:
    check_strings(row, where, ("text",))


# ---------------------------------------------------------------- conversions


def _turns(messages: list[Row]) -> list[Row]:
    """Only role and content: extra keys (TRL's tool calls, names) are not rendered."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def alpaca_messages(row: Row) -> list[Row]:
    """LLaMA-Factory's reading: user = instruction, then "\\n" and the input when there is one."""
    user = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return [
        *system,
        {"role": "user", "content": user},
        {"role": "assistant", "content": row["output"]},
    ]


def sharegpt_messages(row: Row) -> list[Row]:
    return [
        {"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]
    ]


FORMATS: list[RowFormat] = [
    RowFormat(
        "conversational", ("prompt", "completion"), "messages", _check_conversational,
        lambda row: {"messages": _turns(row["prompt"] + row["completion"]),
                     "prompt_turns": len(row["prompt"])},
        matches=lambda row: isinstance(row["prompt"], list),
    ),
    RowFormat(
        "prompt_completion", ("prompt", "completion"), "prompt_completion",
        _check_prompt_completion, lambda row: {"prompt": row["prompt"], "completion": row["completion"]},
    ),
    RowFormat("messages", ("messages",), "messages", _check_messages,
              lambda row: {"messages": _turns(row["messages"])}),
    RowFormat("alpaca", ("instruction", "output"), "messages", _check_alpaca,
              lambda row: {"messages": alpaca_messages(row)}, optional=("input", "system")),
    RowFormat("sharegpt", ("conversations",), "messages", _check_sharegpt,
              lambda row: {"messages": sharegpt_messages(row)}),
    RowFormat("text", ("text",), "text", _check_text, lambda row: {"text": row["text"]}),
]  # fmt: skip
ACCEPTED = (
    '{"prompt", "completion"} (strings or message lists), {"messages": [...]}, '
    '{"instruction", "input"?, "output"} (Alpaca), {"conversations": [...]} (ShareGPT) or {"text"}'
)


def format_named(name: str) -> RowFormat:
    return next(fmt for fmt in FORMATS if fmt.name == name)


def detect_format(row: Any, where: str) -> RowFormat:
    """The first format whose keys the row has (and whose `matches` accepts it)."""
    if isinstance(row, dict):
        for fmt in FORMATS:
            if all(key in row for key in fmt.keys) and fmt.matches(row):
                return fmt
    found = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise SlimtuneError(f"{where}: a row has {found}; accepted rows: {ACCEPTED}")


def check_row(row: Any, fmt: RowFormat, where: str) -> None:
    """The row has its format's fields and none that identify another format."""
    if not isinstance(row, dict):
        raise SlimtuneError(f"{where}: a row must be an object, not {type(row).__name__}")
    own = fmt.keys + fmt.optional
    missing = [key for key in fmt.keys if key not in row]
    others = {k for f in FORMATS for k in f.keys if k in row and k not in own}
    if missing or others:
        raise SlimtuneError(
            f"{where}: fields {sorted(row)} do not match the file's format {fmt.name} "
            f"{{{', '.join(map(repr, fmt.keys))}}} (set by its first row); one format per file"
        )
    fmt.check(row, where)


def convert_row(row: Row, fmt: RowFormat, where: str) -> Row:
    """Check a row against `fmt` and return it as a row of `fmt.kind`."""
    check_row(row, fmt, where)
    return fmt.convert(row)
