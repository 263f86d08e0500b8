"""Merging an adapter into its base one tensor at a time, so that `slimtune merge` and
`slimtune export --format safetensors` of an 8B model need the host memory of about one
tensor (one layer's weight, twice), not of the whole model in float32.

    adapter DIR ─► read once ─► the method's own loader puts it on a meta-device skeleton
                                of the base (its checks, its layers; no base weight in memory)
    base *.safetensors ─► one weight ─► float32, on the GPU when there is one
        ─► QLoRA, --into trained: W0 ← dequantize(quantize(W0)), as quant.linear.trained_base
        ─► its adapter layer's own merge(), given just this weight:
               LoRA  W0 + s·B A      DoRA  m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row
               IA3   W0's rows (or columns, feed-forward) × l, an output-scaled bias × l
           modules_to_save: the adapter's trained copy replaces the tensor
        ─► the output dtype ─► appended to its shard file (header first: shapes are known)
    config.json, generation_config.json (save_pretrained with no tensors), index, tokenizer

The shards, their names and model.safetensors.index.json come from transformers' own split
of the merged model's state dict, in its saving order, and each shard has the bytes
safetensors' `save_file` writes; so the directory is the one `save_pretrained` writes after
the in-memory merge (slimtune.cli.merge.merged_model). That path stays for whatever
`streamed_merge` declines (it returns None): prompt tuning and bottleneck adapters (they add
computation, not weights), adapter biases, adapters on tied weights, bitsandbytes
directories and checkpoints whose tensor names transformers converts.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from slimtune.weights import release_freed_memory

AUTO_CLASSES = {
    None: "AutoModelForCausalLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}
STREAMED_TYPES = ("LORA", "IA3")  # peft_type of the methods whose layers merge into weights
WEIGHTS_PATTERN = "model{suffix}.safetensors"  # transformers' shard names
ADAPTER_NAME = "default"  # the name load_adapter gives the adapter it reads


def stored_dtype(directory: Path) -> torch.dtype:
    """The dtype a transformers directory stores its weights in (config.json's dtype)."""
    config = json.loads((directory / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if name in ("float32", "float16", "bfloat16") else torch.float32


def merge_device() -> torch.device:
    """Where the merge arithmetic runs: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_pretrained_shard_size() -> int | str:
    """The shard size `save_pretrained` uses when given none (what `slimtune merge` writes)."""
    from transformers import PreTrainedModel

    return inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default


def read_tokenizer(directory: Path, adapter_dir: str | Path | None):
    """The base's tokenizer (None if it has none), with the adapter's chat template if any."""
    import transformers

    from slimtune.training.templates import adapter_chat_template

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError):
        return None  # a model directory without a tokenizer merges all the same
    adapter_chat_template(tokenizer, adapter_dir)  # trained with --chat-template
    return tokenizer


class _CapturedCopies(TorchFunctionMode):
    """Records what a loader copies into meta-device tensors: the adapter's own values."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[int, tuple[Tensor, Tensor]] = {}  # id(target) -> (target, value)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is Tensor.copy_ and args[0].is_meta and not args[1].is_meta:
            self.values[id(args[0])] = (args[0], args[1].detach().to(args[0].dtype))
        return func(*args, **(kwargs or {}))

    def value(self, target: Tensor) -> Tensor | None:
        found = self.values.get(id(target))
        return found[1] if found is not None and found[0] is target else None


@dataclass
class StreamedMerge:
    """What writing the merged directory needs, all read before the first base weight."""

    directory: Path  # the base's transformers directory
    files: dict[str, Path]  # tensor name -> the safetensors file holding it
    plain: nn.Module  # the merged model's skeleton (meta device, output dtype)
    layers: dict[str, nn.Module]  # module name -> adapter layer (meta base, adapter on device)
    dtype: torch.dtype  # what floating-point tensors are written in
    device: torch.device  # where the merge arithmetic runs
    tokenizer: Any = None
    requantize: dict | None = None  # QLoRA --into trained: the quantization to redo
    requantized: set[str] = field(default_factory=set)  # the linear layers it applies to
    adapter_name: str = ADAPTER_NAME
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _pending: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def read(self, key: str) -> Tensor:
        """One base tensor, as stored."""
        from safetensors import safe_open

        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_tensor(key)

    def base_tensor(self, key: str, module: str, device: torch.device) -> Tensor:
        """A base tensor as the in-memory merge holds it: float32 (from_pretrained's dtype),
        re-quantized for a QLoRA adapter merged --into trained."""
        tensor = self.read(key)
        if not tensor.is_floating_point():
            return tensor
        if self.requantize is not None and module in self.requantized and key == f"{module}.weight":
            from slimtune.quant.linear import requantized_weight

            return requantized_weight(tensor.to(self.device).float(), self.requantize)
        return tensor.to(device).float()

    def output(self, tensor: Tensor) -> Tensor:
        """A tensor as written: the output dtype (floating point), contiguous, on the CPU."""
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor.detach().to("cpu").contiguous()

    def merged(self, key: str) -> Tensor:
        """The merged model's tensor `key`, on the CPU in its output dtype."""
        release_freed_memory()  # the tensors made for the previous key
        if key in self._pending:
            return self._pending.pop(key)
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):  # the adapter layer holding `key`, if any
            name = ".".join(parts[:i])
            if name in self.layers:
                return self._from_layer(name, ".".join(parts[i:]), key)
        module = key.rpartition(".")[0]
        tensor = self.read(key)
        if tensor.dtype == self.dtype and module not in self.requantized:
            return tensor.contiguous()  # float32 and back is the identity
        return self.output(self.base_tensor(key, module, torch.device("cpu")))

    def _from_layer(self, name: str, rest: str, key: str) -> Tensor:
        from slimtune.adapters.layers import ModulesToSaveWrapper

        layer = self.layers[name]
        if isinstance(layer, ModulesToSaveWrapper):  # the trained copy replaces the module
            return self.output(layer.modules_to_save[self.adapter_name].state_dict()[rest])
        base = layer.base_layer
        attrs = [attr for attr, p in base._parameters.items() if p is not None]
        for attr in attrs:  # the module's weight (and bias): one module's tensors at a time
            value = self.base_tensor(f"{name}.{attr}", name, self.device)
            base._parameters[attr] = nn.Parameter(value, requires_grad=False)
        layer.merge([self.adapter_name])  # the layer's own merge, as merge_and_unload
        self._pending = {f"{name}.{attr}": self.output(base._parameters[attr]) for attr in attrs}
        for attr in attrs:  # back to the meta device: the layer holds no base memory
            base._parameters[attr] = nn.Parameter(base._parameters[attr].to("meta"), False)
        return self._pending.pop(key)

    def state_items(self, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
        """(name, merged tensor in `dtype`), made one at a time, in the merged model's
        state-dict order, without what save_pretrained leaves out (tied duplicates)."""
        saved = saved_state(self.plain)
        for key in self.plain.state_dict():
            if key in saved:
                yield key, self.merged(key).to(dtype)

    def write(self, out: Path, max_shard_size: int | str | None = None) -> None:
        """Write config, generation config, shards and index into the existing directory `out`
        (the tokenizer is the caller's: `slimtune export` requires one, `merge` does not)."""
        from huggingface_hub import split_torch_state_dict_into_shards

        self.plain.save_pretrained(out, state_dict={})  # config files exactly as transformers
        state = saved_state(self.plain)  # (meta tensors: names, shapes, output dtypes)
        split = split_torch_state_dict_into_shards(
            state,
            filename_pattern=WEIGHTS_PATTERN,
            max_shard_size=max_shard_size or save_pretrained_shard_size(),
        )
        with torch.no_grad():
            for filename, names in split.filename_to_tensors.items():
                specs = {name: state[name] for name in names}
                write_safetensors(out / filename, specs, self.merged, {"format": "pt"})
        self._handles.clear()
        if split.is_sharded:
            index = {
                "metadata": {"total_parameters": self.plain.num_parameters(), **split.metadata},
                "weight_map": split.tensor_to_filename,
            }
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (out / "model.safetensors.index.json").write_text(text, encoding="utf-8")


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(
    path: Path, specs: dict[str, Tensor], tensor: Callable[[str], Tensor], metadata: dict
) -> None:
    """A safetensors file whose tensors are made one at a time by `tensor(name)`, each
    written as soon as it is made, with the bytes `safetensors.torch.save_file` writes.

        8-byte header length ─ JSON header (names sorted: dtype, shape, data offsets; padded
        with spaces to 8 bytes) ─ each tensor's bytes, in the header's order

    `specs` gives each name's dtype and shape (meta tensors). safetensors orders a file of
    several dtypes by dtype first; such a shard (rare: integer buffers) is written whole.
    """
    from safetensors.torch import save_file

    if len({spec.dtype for spec in specs.values()}) > 1:
        save_file({name: tensor(name) for name in specs}, str(path), metadata=metadata)
        return
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(specs):
        spec = specs[name]
        size = spec.numel() * spec.element_size()
        entry = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape)}
        header[name] = entry | {"data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in sorted(specs):
            value = tensor(name)
            if value.dtype != specs[name].dtype or value.shape != specs[name].shape:
                raise RuntimeError(
                    f"{name}: made {value.dtype} {tuple(value.shape)}, not {specs[name]}"
                )
            f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy())
            del value


def saved_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict `save_pretrained` writes for the model `from_pretrained` gave the
    in-memory path: without ignored keys and tied duplicates, in transformers' saving order."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    model._weight_conversions = []  # from_pretrained's record: no name needed converting
    return revert_weight_conversion(model, state)  # (which sorts the keys for saving)


def streamed_merge(
    model_spec: str,
    adapter_dir: str | Path | None,
    into: str = "trained",
    dtype: torch.dtype | None = None,
) -> StreamedMerge | None:
    """Read the adapter and the base's layout (no weights) for a streamed merge.

    Args:
        model_spec: the --model argument (a transformers directory, a GGUF, a built-in name).
        adapter_dir: a PEFT adapter directory, or None to copy the base as it is (in `dtype`).
        into: "trained" (QLoRA adapters merge into the weights they trained on) or "original".
        dtype: what floating-point tensors are written in (default: the stored dtype).

    Returns:
        The plan to `write`, or None where the in-memory path must merge (see the module
        docstring). A bad adapter is a SlimtuneError, with the in-memory path's message.
    """
    import transformers
    from safetensors import SafetensorError

    from slimtune.adapter_dir import read_adapter_config, read_adapter_tensors
    from slimtune.models import model_directory
    from slimtune.quant.linear import quantizable_linears, quantization_record
    from slimtune.weights import _key_mismatch, _skeleton, is_bnb_4bit, weight_files

    transformers.utils.logging.disable_progress_bar()  # one line per outcome, as every command
    config_json, tensors, metadata = {}, {}, {}
    if adapter_dir is not None:  # the adapter first, as the in-memory path reads it
        config_json = read_adapter_config(adapter_dir)
        tensors, metadata = read_adapter_tensors(adapter_dir)
        if config_json.get("peft_type") not in STREAMED_TYPES:
            return None  # prompt tuning, bottleneck adapters: not weights to merge into
        if config_json.get("bias", "none") != "none":
            return None  # adapter biases: the in-memory path
    record = quantization_record(metadata) if into == "trained" else None
    directory = model_directory(model_spec)
    auto = AUTO_CLASSES.get(config_json.get("task_type"), "AutoModelForCausalLM")
    try:
        files = weight_files(directory)
        dtype = dtype or stored_dtype(directory)
        if not files or is_bnb_4bit(directory):
            return None  # no safetensors (the in-memory path says why) or 4-bit codes
        plain = _skeleton(directory, dtype, auto).to(dtype)  # as model.to(dtype) before saving
    except (OSError, ValueError, KeyError, SafetensorError):
        return None  # the in-memory path names what is wrong with the directory
    if _key_mismatch(plain, files, {}) or _converts_names(plain):
        return None  # tensor names that transformers renames while loading or saving
    layers = {}
    if adapter_dir is not None:
        layers = _adapter_layers(
            _skeleton(directory, torch.float32, auto),
            adapter_dir,
            (config_json, tensors, metadata),
        )
        if layers is None:
            return None
    return StreamedMerge(
        directory=directory,
        files=files,
        plain=plain,
        layers=layers,
        dtype=dtype,
        device=merge_device(),
        tokenizer=read_tokenizer(directory, adapter_dir),
        requantize=record,
        requantized=set(quantizable_linears(plain, record["skip"])) if record else set(),
    )


def _converts_names(model: nn.Module) -> bool:
    from transformers.conversion_mapping import get_model_conversion_mapping

    return bool(get_model_conversion_mapping(model, add_legacy=False))


def _adapter_layers(
    skeleton: nn.Module, adapter_dir: str | Path, contents: tuple[dict, dict, dict]
) -> dict[str, nn.Module] | None:
    """The adapter loaded onto a float32 meta skeleton (as onto the model from_pretrained
    gives the in-memory path): {module name: adapter layer}, the adapter's tensors real and
    on the merge device; None for a layout the streamed merge does not cover."""
    from slimtune.adapter_dir import load_adapter_read
    from slimtune.adapters.layers import ModulesToSaveWrapper, is_adapter_layer, is_mergeable

    captured = _CapturedCopies()
    with captured:  # the loader's checks and error messages, unchanged
        skeleton = load_adapter_read(skeleton, adapter_dir, *contents)
    layers = {n: m for n, m in skeleton.named_modules() if n and is_adapter_layer(m)}
    device = merge_device()
    for name, layer in layers.items():
        if not is_mergeable(layer) or any(name.startswith(f"{o}.") for o in layers):
            return None  # a layer inside another one: the in-memory path
        if isinstance(layer, ModulesToSaveWrapper):
            base, own = layer.original_module, [layer.modules_to_save[ADAPTER_NAME]]
        else:
            base = layer.base_layer
            own = [child for key, child in layer.named_children() if key != "base_layer"]
        if _shared(skeleton, name, base) or not all(_fill(m, captured, device) for m in own):
            return None  # tied weights (merging unties them), or tensors the file lacks
    return layers


def _shared(model: nn.Module, name: str, base: nn.Module) -> bool:
    """Whether a parameter of `base` (inside layer `name`) is also used elsewhere (tied)."""
    own = {id(p) for p in base.parameters()}
    return any(
        id(p) in own and not n.startswith(f"{name}.")
        for n, p in model.named_parameters(remove_duplicate=False)
    )


def _fill(module: nn.Module, captured: _CapturedCopies, device: torch.device) -> bool:
    """Put the captured adapter values in place of `module`'s meta tensors (False: one is
    missing)."""
    for owner in module.modules():
        for store in (owner._parameters, owner._buffers):
            for attr, tensor in list(store.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                value = captured.value(tensor)
                if value is None:
                    return False
                value = value.to(device)
                store[attr] = nn.Parameter(value, False) if store is owner._parameters else value
    return True
