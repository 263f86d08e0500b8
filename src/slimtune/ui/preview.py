"""The first rows of a data file as the model will see them, the trained span marked.

    <|im_start|>user\\nMeet Ada …<|im_end|>\\n<|im_start|>assistant\\n<mark>Stone, Ada | …<|im_end|></mark>

Rows are tokenized exactly as training tokenizes them (slimtune.training.data); each run
of tokens with a label (loss) is wrapped in <mark>. Everything shown is HTML-escaped.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path

from slimtune.training.data import IGNORE_INDEX, Example, pack_text_file, tokenize_row
from slimtune.training.readers import read_source

KINDS = {
    "prompt_completion": "loss on the completion",
    "messages": "chat template, loss on assistant turns",
    "text": "loss everywhere",
}


@functools.lru_cache(maxsize=4)
def tokenizer_for(model: str):
    from slimtune.models import load_tokenizer

    return load_tokenizer(model)


def marked_html(tokenizer, example: Example, limit: int = 1200) -> str:
    """The row's text with the tokens that carry a loss inside <mark>."""
    pieces, group, trained = [], [], None
    for token, label in zip(example.input_ids, example.labels, strict=True):
        is_trained = label != IGNORE_INDEX
        if group and is_trained != trained:
            pieces.append((trained, group))
            group = []
        group.append(token)
        trained = is_trained
    if group:
        pieces.append((trained, group))
    out, shown = [], 0
    for is_trained, ids in pieces:
        text = tokenizer.decode(ids, skip_special_tokens=False)[: max(0, limit - shown)]
        shown += len(text)
        text = html.escape(text)
        out.append(f"<mark>{text}</mark>" if is_trained else text)
    return "".join(out) + (" …" if shown >= limit else "")


def preview(model: str, data: Path, max_length: int, rows: int = 3) -> tuple[str, str]:
    """(a line naming the format and row count, HTML of the first `rows` rows)."""
    tokenizer = tokenizer_for(model)
    if data.suffix == ".txt":
        examples = pack_text_file(tokenizer, data, max_length)
        fmt = "plain text, packed into max-length chunks (loss everywhere)"
        count = f"{len(examples)} chunks of up to {max_length} tokens"
    else:
        records = read_source(data)
        first = records[0].fmt
        fmt, count = f"{first.name} ({KINDS[first.kind]})", f"{len(records)} rows"
        examples = [
            tokenize_row(tokenizer, r.fmt.convert(r.row), r.fmt.kind) for r in records[:rows]
        ]
    blocks = [
        f'<pre class="data-row" style="white-space:pre-wrap">{marked_html(tokenizer, ex)}</pre>'
        for ex in examples[:rows]
    ]
    line = f"format: **{fmt}** · {count} · first {len(blocks)} shown, trained span marked"
    return line, "".join(blocks)
