"""Use a fine-tuned model in llama.cpp and Ollama: a GGUF model (+ Modelfile) or a GGUF LoRA.

    adapter + base ──merge──► W = W0 + (alpha/r) B A ──┬─► safetensors directory (transformers, vLLM)
                                                       └─► model.gguf + Modelfile (llama.cpp, Ollama)
    adapter alone ─────────────────────────────────────────► adapter.gguf (llama.cpp --lora)

Every file is written under a temporary name and renamed into place, so a failed export leaves
nothing half-written, and nothing existing is replaced without `overwrite=True`. The GGUF writing
itself (tensor names, rope permutation, Q8_0, tokenizer metadata) lives in `gguf_file.py`; the
Ollama Modelfile in `ollama.py`; the merged transformers directory in `merged.py`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from slimtune.atomic import atomic_file, check_free
from slimtune.errors import SlimtuneError
from slimtune.export import gguf_file as gg
from slimtune.export.gguf_arch import add_hyperparameters, family_of, model_tensors
from slimtune.export.gguf_vocab import add_tokenizer, copy_tokenizer_fields
from slimtune.export.ollama import modelfile
from slimtune.export.quantize import LLAMACPP_TYPES, needs_llamacpp, quantize_gguf, require_llamacpp
from slimtune.export.streamed_merge import StreamedMerge

MODEL_DTYPES = (*gg.DTYPES, *LLAMACPP_TYPES)  # what --format gguf takes; gguf-lora: gg.DTYPES


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def gguf_paths(out: str | os.PathLike, default_name: str) -> Path:
    """`--out x.gguf` is the file itself; any other `--out` is a directory to put it in."""
    out = Path(out)
    return out if out.suffix == ".gguf" else out / default_name


def modelfile_path(out: str | os.PathLike) -> Path:
    """DIR/Modelfile for a directory `--out`; x.Modelfile beside an explicit x.gguf."""
    out = Path(out)
    return out.with_suffix(".Modelfile") if out.suffix == ".gguf" else out / "Modelfile"


def output_paths(fmt: str, out: str | os.PathLike) -> list[Path]:
    """Every path an export of format `fmt` to `out` writes (to check before any work)."""
    if fmt == "safetensors":
        return [Path(out)]
    if fmt in ("gguf", "ollama"):
        return [gguf_paths(out, "model.gguf"), modelfile_path(out)]
    return [gguf_paths(out, "adapter.gguf")]


def ollama_commands(out: str | os.PathLike) -> list[str]:
    """`ollama create NAME -f Modelfile` and `ollama run NAME` for an export to `out`."""
    import re
    import shlex

    out = Path(out)
    stem = out.stem if out.suffix == ".gguf" else out.resolve().name
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    return [
        f"ollama create {name} -f {shlex.quote(str(modelfile_path(out)))}",
        f"ollama run {name}",
    ]


# --- GGUF model ---------------------------------------------------------------------------


def write_gguf(
    model,
    tokenizer,
    path: Path,
    *,
    dtype: str = "f16",
    source_gguf: Path | None = None,
    say: Callable[[str], None] = _say,
) -> None:
    """Write `model` (a plain transformers model of a gguf_arch.FAMILIES family, or a
    StreamedMerge, whose merged tensors are made and written one at a time) at `path`."""
    from gguf import GGUFWriter

    if dtype not in gg.DTYPES:
        raise SlimtuneError(f"GGUF dtype {dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
    if isinstance(model, StreamedMerge):  # its skeleton: config and shapes, no weights
        model, tensors = model.plain, model.state_items(torch.float32)
    else:
        tensors = model.state_dict()
    config = model.config
    arch = family_of(config).arch
    writer = GGUFWriter(path, arch, use_temp_file=True)  # encoded tensors spill to disk, not RAM
    writer.add_type("model")
    writer.add_name(Path(getattr(config, "_name_or_path", "") or "model").name or "model")
    writer.add_file_type(gg.file_type(dtype))
    writer.add_quantization_version(2)
    add_hyperparameters(writer, config)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    if source_gguf is not None:
        copy_tokenizer_fields(writer, source_gguf, getattr(tokenizer, "chat_template", None))
    else:
        add_tokenizer(writer, tokenizer, config, n_vocab, say)
    gg.add_tensors(writer, model_tensors(tensors, config), dtype, say)
    _finish(writer)


def _finish(writer) -> None:
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def export_gguf(
    model,
    tokenizer,
    out: str | os.PathLike,
    *,
    dtype: str = "f16",
    overwrite: bool = False,
    source_gguf: str | os.PathLike | None = None,
    say: Callable[[str], None] = _say,
) -> Path:
    """Write `out` (a .gguf path, or a directory for model.gguf) and an Ollama Modelfile beside it
    (DIR/Modelfile, or x.Modelfile for `out` = x.gguf).

    Args:
        model: a plain (merged) transformers model of a family in gguf_file.ARCHITECTURES.
        tokenizer: its tokenizer (byte-level BPE or SentencePiece); ignored with `source_gguf`.
        dtype: f32, f16, bf16 or q8_0 for the 2-D weights (1-D norms and biases stay f32),
            written by slimtune; or a llama.cpp type (q4_k_m, q5_k_m, q6_k, q4_0, ...: see
            quantize.LLAMACPP_TYPES), an f16 file quantized by llama.cpp's own quantizer.
        source_gguf: the GGUF the model was loaded from; its tokenizer metadata is copied verbatim.
        say: where the one-line notes go (a q8_0 fallback, an unknown chat template, sizes).

    Returns:
        The path of the GGUF file.
    """
    path = gguf_paths(out, "model.gguf")
    model_file = modelfile_path(out)
    for target in (path, model_file):
        check_free(target, overwrite)
    if needs_llamacpp(dtype):
        require_llamacpp(dtype)
    elif dtype not in gg.DTYPES:
        raise SlimtuneError(f"GGUF dtype {dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
    with atomic_file(path) as tmp:
        if needs_llamacpp(dtype):
            _write_quantized(model, tokenizer, tmp, dtype, source_gguf, say)
        else:
            write_gguf(model, tokenizer, tmp, dtype=dtype, say=say, source_gguf=source_gguf)
    text = modelfile(f"./{path.name}", say=say, **chat_metadata(path))
    with atomic_file(model_file) as tmp:
        tmp.write_text(text)
    return path


def _write_quantized(model, tokenizer, tmp: Path, dtype: str, source_gguf, say) -> None:
    """f16 GGUF beside `tmp`, then llama.cpp's quantizer into `tmp`; says both sizes."""
    f16 = tmp.with_name(tmp.name + ".f16")
    try:
        write_gguf(model, tokenizer, f16, dtype="f16", say=say, source_gguf=source_gguf)
        quantize_gguf(f16, tmp, dtype)
        say(f"{dtype}: {_mib(tmp)} (the f16 file it was quantized from: {_mib(f16)})")
    finally:
        f16.unlink(missing_ok=True)


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def chat_metadata(path: Path) -> dict:
    """The Modelfile's inputs as a GGUF file states them: chat template, EOS and BOS text,
    whether llama.cpp adds BOS itself."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key: str):
        return fields[key].contents() if key in fields else None

    def token(kind: str) -> str | None:
        token_id = value(f"tokenizer.ggml.{kind}_token_id")
        tokens = fields.get("tokenizer.ggml.tokens")
        return None if token_id is None or tokens is None else tokens.contents(int(token_id))

    add_bos = value("tokenizer.ggml.add_bos_token")
    return {
        "jinja": value("tokenizer.chat_template"),
        "eos_token": token("eos"),
        "bos_token": token("bos"),
        "add_bos": value("tokenizer.ggml.model") == "llama" if add_bos is None else bool(add_bos),
    }


# --- GGUF LoRA adapter --------------------------------------------------------------------


def read_peft_lora(adapter_dir: str | os.PathLike) -> tuple[dict, dict]:
    """(adapter_config, tensors) of a PEFT LoRA directory (safetensors only)."""
    from slimtune.adapter_dir import read_adapter_config, read_adapter_tensors

    adapter_config = read_adapter_config(adapter_dir)
    kind = "DORA" if adapter_config.get("use_dora") else adapter_config.get("peft_type", "LORA")
    if kind != "LORA":
        raise SlimtuneError(f"gguf-lora needs a LoRA adapter; {adapter_dir} holds a {kind} adapter")
    tensors, _ = read_adapter_tensors(adapter_dir)
    return adapter_config, tensors


def export_gguf_lora(
    adapter_dir: str | os.PathLike,
    config,
    out: str | os.PathLike,
    *,
    dtype: str = "f16",
    overwrite: bool = False,
    say: Callable[[str], None] = _say,
) -> Path:
    """The adapter alone as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora out`).

    Args:
        adapter_dir: a PEFT LoRA directory (what slimtune and PEFT save).
        config: the base model's transformers config (architecture, head counts).
        out: a .gguf path, or a directory for adapter.gguf.
        dtype: f32, f16, bf16 or q8_0 for the A and B matrices.
    """
    from gguf import GGUFWriter

    path = gguf_paths(out, "adapter.gguf")
    check_free(path, overwrite)
    if dtype not in gg.DTYPES:
        raise SlimtuneError(
            f"--format gguf-lora writes {', '.join(gg.DTYPES)}; --dtype {dtype} is for a whole "
            "model (--format gguf)"
        )
    adapter_config, tensors = read_peft_lora(adapter_dir)
    alpha, lora = gg.lora_tensors(tensors, adapter_config, config)
    arch = family_of(config).arch
    with atomic_file(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        writer.add_file_type(gg.file_type(dtype))
        gg.add_tensors(writer, iter(lora), dtype, say)
        _finish(writer)
    return path
