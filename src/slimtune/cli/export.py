"""`slimtune export`: the merged model as safetensors or GGUF, or the adapter as a GGUF LoRA.

slimtune export --model M --adapter RUN/adapter --format safetensors --out merged/
slimtune export --model M --adapter RUN/adapter --format gguf --dtype q8_0 --out model.gguf
slimtune export --model M --adapter RUN/adapter --format gguf --dtype q4_k_m --out out/
slimtune export --model M --adapter RUN/adapter --format gguf-lora --out adapter.gguf
slimtune export --model M --adapter RUN/adapter --format ollama --dtype q4_k_m --out my-model/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from slimtune.atomic import check_free
from slimtune.errors import SlimtuneError
from slimtune.export.gguf import export_gguf, export_gguf_lora, ollama_commands, output_paths
from slimtune.export.merged import export_safetensors

SAFETENSORS_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def merged_model(model_spec: str, adapter: str | None):
    """(plain transformers model, tokenizer as the source has it), the adapter merged in.

    With an adapter this is `slimtune merge`'s path (QLoRA adapters merge into the weights
    they were trained on); the model comes back in the dtype its checkpoint stores.
    """
    from transformers import AutoTokenizer

    from slimtune.cli.merge import merged_model as merge_adapter
    from slimtune.models import load_model, model_directory

    if adapter is not None:
        model, tokenizer = merge_adapter(model_spec, adapter)
        if tokenizer is None:
            raise SlimtuneError(f"model {model_spec} has no tokenizer to export with it")
        return model, tokenizer
    model, _ = load_model(model_spec, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_directory(model_spec))


def _source_gguf(model_spec: str) -> Path | None:
    from slimtune.models import resolve_model_path

    path = resolve_model_path(model_spec)
    return path if path.suffix == ".gguf" else None


def _safetensors_dtype(args: argparse.Namespace) -> torch.dtype:
    """--dtype if given, else the dtype the source checkpoint was stored in."""
    if args.dtype is None:
        from slimtune.cli.merge import stored_dtype
        from slimtune.models import model_directory

        return stored_dtype(model_directory(args.model))
    if args.dtype not in SAFETENSORS_DTYPES:
        raise SlimtuneError(
            f"--dtype {args.dtype} is for GGUF; safetensors takes {', '.join(SAFETENSORS_DTYPES)}"
        )
    return SAFETENSORS_DTYPES[args.dtype]


def _merged_source(args: argparse.Namespace, dtype: torch.dtype | None):
    """(a StreamedMerge, its tokenizer): the merge made one tensor at a time, in `dtype`; or,
    for what it does not cover, (the merged model in memory, in `dtype`, its tokenizer).
    `dtype` None: the stored dtype, as float32 for GGUF's encodings."""
    from slimtune.export.streamed_merge import streamed_merge

    streamed = streamed_merge(args.model, args.adapter, dtype=dtype)
    if streamed is not None and streamed.tokenizer is not None:
        return streamed, streamed.tokenizer
    model, tokenizer = merged_model(args.model, args.adapter)  # (says what is missing)
    return model.to(dtype or torch.float32), tokenizer


def _check(args: argparse.Namespace):
    """Everything that can be refused before loading weights; returns the model's config."""
    from transformers import AutoConfig

    from slimtune.export.gguf_arch import family_of
    from slimtune.export.quantize import needs_llamacpp, require_llamacpp
    from slimtune.models import model_directory

    for path in output_paths(args.format, args.out):
        check_free(path, args.overwrite)
    if args.format == "gguf-lora" and args.adapter is None:
        raise SlimtuneError("--format gguf-lora exports an adapter: give --adapter DIR")
    if args.format == "safetensors" and args.dtype is not None:
        _safetensors_dtype(args)
    if args.dtype is not None and needs_llamacpp(args.dtype):
        if args.format == "gguf-lora":
            raise SlimtuneError(
                f"--dtype {args.dtype} is for a whole model (--format gguf); gguf-lora writes "
                "f32, f16, bf16 or q8_0"
            )
        require_llamacpp(args.dtype)
    config = AutoConfig.from_pretrained(model_directory(args.model))
    if args.format != "safetensors":
        family_of(config)
    return config


def run(args: argparse.Namespace) -> int:
    config = _check(args)
    if args.format == "gguf-lora":
        path = export_gguf_lora(
            args.adapter, config, args.out, dtype=args.dtype or "f16", overwrite=args.overwrite
        )
    elif args.format in ("gguf", "ollama"):
        model, tokenizer = _merged_source(args, dtype=None)  # the GGUF encodings start from fp32
        path = export_gguf(
            model,
            tokenizer,
            args.out,
            dtype=args.dtype or "f16",
            overwrite=args.overwrite,
            source_gguf=_source_gguf(args.model),
        )
    else:
        model, tokenizer = _merged_source(args, _safetensors_dtype(args))
        path = export_safetensors(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {path}")
    if args.format == "ollama":
        print("\n".join(ollama_commands(args.out)))
    return 0
