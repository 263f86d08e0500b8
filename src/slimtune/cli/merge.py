"""`slimtune merge`: fold an adapter into its base model and write a plain transformers directory.

slimtune merge --model M --adapter DIR --out MERGED [--into trained|original] [--overwrite]

    load base M ─► prepare_base (QLoRA: which weights the adapter merges into)
                ─► load_adapter DIR ─► merge_and_unload (W = W0 + s·B A, in fp32)
                ─► save config + safetensors + tokenizer + generation config, in M's dtype

The result loads with `AutoModelForCausalLM.from_pretrained(MERGED)` and no slimtune.
Everything is checked before any weight is loaded, and the directory appears in one rename.
LoRA, DoRA and IA3 adapters merge one tensor at a time (slimtune.export.streamed_merge, on the
GPU when there is one); what that path does not cover loads the whole model (merged_model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.export.streamed_merge import AUTO_CLASSES, stored_dtype, streamed_merge

__all__ = ["AUTO_CLASSES", "merged_model", "prepare_base", "run", "stored_dtype"]


def prepare_base(model: nn.Module, adapter_dir: str | Path, into: str) -> nn.Module:
    """Turn the loaded base into the weights the adapter merges into.

    `into="original"` merges into the full-precision weights as loaded. `into="trained"`
    (the default) merges into the weights the adapter was trained on: the same as the
    original unless the adapter's metadata names a quantization (QLoRA), in which case the
    quantization step (slimtune.quant) replaces the base weights by their dequantized form.
    """
    from slimtune.adapter_dir import read_adapter_metadata

    if into == "original":
        return model
    metadata = read_adapter_metadata(adapter_dir)
    try:  # (model, header metadata) -> model, provided by the quantization code
        from slimtune.quant.linear import trained_base
    except ImportError:
        return model
    return trained_base(model, metadata)


def _load_base(spec: str, task_type: str | None) -> tuple[nn.Module, object | None, torch.dtype]:
    import transformers

    from slimtune.models import model_directory

    transformers.utils.logging.disable_progress_bar()  # one line per outcome, as every command
    directory = model_directory(spec)
    auto = getattr(transformers, AUTO_CLASSES.get(task_type, "AutoModelForCausalLM"))
    from safetensors import SafetensorError

    try:
        model = auto.from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as exc:
        raise SlimtuneError(f"model {spec}: cannot load ({str(exc).splitlines()[0]})") from exc
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a model directory without a tokenizer merges all the same
    return model.eval(), tokenizer, stored_dtype(directory)


def merged_model(model_spec: str, adapter_dir: str | Path, into: str = "trained"):
    """(plain merged model in the source dtype, tokenizer or None)."""
    from slimtune.adapter_dir import load_adapter, read_adapter_config, read_adapter_tensors
    from slimtune.adapters.named import merge_and_unload
    from slimtune.training.templates import adapter_chat_template

    config_json = read_adapter_config(adapter_dir)
    read_adapter_tensors(
        adapter_dir
    )  # a corrupt or pickled file is refused before loading the model
    model, tokenizer, dtype = _load_base(model_spec, config_json.get("task_type"))
    adapter_chat_template(tokenizer, adapter_dir)  # trained with --chat-template
    model = prepare_base(model, adapter_dir, into)
    model = merge_and_unload(load_adapter(model, adapter_dir))
    return model.to(dtype), tokenizer


def run(args: argparse.Namespace) -> int:
    from slimtune.atomic import prepare_out_dir, write_atomic_dir

    out = prepare_out_dir(args.out, args.overwrite)
    if args.into == "original":
        from slimtune.adapter_dir import read_adapter_metadata
        from slimtune.quant.linear import METADATA_KEY

        if METADATA_KEY not in read_adapter_metadata(args.adapter):
            raise SlimtuneError(
                f"--into original needs a QLoRA adapter: {args.adapter} trained on an "
                "unquantized base, so its trained and original weights are the same"
            )
    streamed = streamed_merge(args.model, args.adapter, args.into)
    if streamed is not None:  # one tensor at a time
        model, tokenizer = None, streamed.tokenizer
    else:  # a method or layout the streamed merge does not cover: the whole model in memory
        model, tokenizer = merged_model(args.model, args.adapter, args.into)

    def write(tmp: Path) -> None:
        if streamed is not None:
            streamed.write(tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_atomic_dir(out, write)
    print(f"merged {args.adapter} into {args.model}: {out}")
    if args.into == "original":
        report_output_shift(model if model is not None else out, args.model, args.adapter)
    return 0


def report_output_shift(merged: nn.Module | Path, model_spec: str, adapter_dir: str | Path) -> None:
    """QLoRA merged into the original weights: print how far its outputs moved from the
    model the adapter was trained as (base quantized as recorded in the adapter).

    `merged` is the merged model, or the directory it was written to (a streamed merge):
    this probe loads the models it compares, which the merge itself did not need.
    """
    from slimtune.adapter_dir import read_adapter_config, read_adapter_metadata
    from slimtune.quant.linear import METADATA_KEY

    if METADATA_KEY not in read_adapter_metadata(adapter_dir):
        return
    if isinstance(merged, Path):
        import transformers

        task_type = read_adapter_config(adapter_dir).get("task_type")
        auto = getattr(transformers, AUTO_CLASSES.get(task_type, "AutoModelForCausalLM"))
        merged = auto.from_pretrained(merged, dtype=torch.float32).eval()
    trained, _ = merged_model(model_spec, adapter_dir, "trained")
    vocab = merged.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shift = (merged.float()(ids).logits - trained.float()(ids).logits).abs()
    print(
        f"outputs moved from the trained QLoRA model: max |Δlogit| {shift.max():.4g}, "
        f"mean {shift.mean():.4g} on 64 probe tokens (--into trained merges without this shift)"
    )
