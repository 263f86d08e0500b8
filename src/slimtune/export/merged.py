"""A merged transformers directory: sharded safetensors, config, generation config, tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

from slimtune.atomic import atomic_dir, check_free
from slimtune.export.streamed_merge import StreamedMerge

DEFAULT_SHARD_SIZE = "2GB"  # safetensors shards above this size


def export_safetensors(
    model,
    tokenizer,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_size=DEFAULT_SHARD_SIZE,
) -> Path:
    """A plain transformers directory: sharded safetensors, config, generation config, tokenizer.

    `model` is a merged, plain transformers model, or a StreamedMerge, which writes the
    merged tensors one at a time; the directory loads with
    `AutoModelForCausalLM.from_pretrained(out)` with no slimtune installed.
    """
    out = Path(out)
    check_free(out, overwrite)
    with atomic_dir(out) as tmp:
        if isinstance(model, StreamedMerge):
            model.write(tmp, max_shard_size)
        else:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return out
