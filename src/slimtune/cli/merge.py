"""`slimtune merge`: fold an adapter into its base model and write a plain transformers directory.

slimtune merge --model M --adapter DIR --out MERGED [--into trained|original] [--overwrite]

    load base M ─► prepare_base (QLoRA: which weights the adapter merges into)
                ─► load_adapter DIR ─► merge_and_unload (W = W0 + s·B A, in fp32)
                ─► save config + safetensors + tokenizer + generation config, in M's dtype

The result loads with `AutoModelForCausalLM.from_pretrained(MERGED)` and no slimtune.
Everything is checked before any weight is loaded, and the directory appears in one rename.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError

AUTO_CLASSES = {
    None: "AutoModelForCausalLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


def stored_dtype(directory: Path) -> torch.dtype:
    """The dtype a transformers directory stores its weights in (config.json's dtype)."""
    config = json.loads((directory / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if name in ("float32", "float16", "bfloat16") else torch.float32


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
    model, tokenizer = merged_model(args.model, args.adapter, args.into)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_atomic_dir(out, write)
    print(f"merged {args.adapter} into {args.model}: {out}")
    if args.into == "original":
        report_output_shift(model, args.model, args.adapter)
    return 0


def report_output_shift(merged: nn.Module, model_spec: str, adapter_dir: str | Path) -> None:
    """QLoRA merged into the original weights: print how far its outputs moved from the
    model the adapter was trained as (base quantized as recorded in the adapter)."""
    from slimtune.adapter_dir import read_adapter_metadata
    from slimtune.quant.linear import METADATA_KEY

    if METADATA_KEY not in read_adapter_metadata(adapter_dir):
        return
    trained, _ = merged_model(model_spec, adapter_dir, "trained")
    vocab = merged.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shift = (merged.float()(ids).logits - trained.float()(ids).logits).abs()
    print(
        f"outputs moved from the trained QLoRA model: max |Δlogit| {shift.max():.4g}, "
        f"mean {shift.mean():.4g} on 64 probe tokens (--into trained merges without this shift)"
    )
