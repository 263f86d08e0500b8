"""Bottleneck adapters against hand-written PyTorch: the formula, and zero W_up = base model."""

import copy

import pytest
import torch

import slimtune as st
from slimtune.config import BottleneckConfig
from slimtune.errors import SlimtuneError
from slimtune.methods.bottleneck import BottleneckLayer, bottleneck
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama


def tiny(kind: str):
    builders = {"llama": tiny_llama, "gpt2": tiny_gpt2}
    return builders.get(kind, tiny_bert)()


# the sub-layers whose output the paper adapts, named independently of slimtune's defaults
SUBLAYERS = {
    "llama": lambda n: n.endswith(("self_attn", "mlp")),
    "gpt2": lambda n: n.endswith((".attn", ".mlp")),
    "bert": lambda n: n.endswith(
        ("attention.output.dense", "layer.0.output.dense", "layer.1.output.dense")
    ),
}


def output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_pure_function_is_the_formula():
    torch.manual_seed(0)
    h, wd, bd, wu, bu = (
        torch.randn(2, 3, 8),
        torch.randn(4, 8),
        torch.randn(4),
        torch.randn(8, 4),
        torch.randn(8),
    )
    expected = h + (torch.tanh(h @ wd.T + bd) @ wu.T + bu)
    torch.testing.assert_close(bottleneck(h, wd, bd, wu, bu, torch.tanh), expected)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_zero_up_projection_leaves_the_model_unchanged(kind):
    base = tiny(kind)
    ids = torch.randint(0, 64, (2, 7))
    expected = output(base, ids)
    model = st.add_adapter(copy.deepcopy(base), BottleneckConfig(bottleneck_size=4))
    torch.testing.assert_close(output(model, ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_adapted_model_equals_hooks_computing_the_formula_by_hand(kind):
    base = tiny(kind)
    model = st.add_adapter(
        copy.deepcopy(base), BottleneckConfig(bottleneck_size=4, non_linearity="gelu")
    )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}
    assert sorted(layers) == sorted(n for n, _ in base.named_modules() if SUBLAYERS[kind](n))
    torch.manual_seed(1)
    for layer in layers.values():
        for p in layer.adapters["default"].parameters():
            p.data.normal_(0, 0.1)

    def hook_for(adapter):
        def hook(module, args, out):
            def f(h):
                z = torch.nn.functional.gelu(
                    h @ adapter.adapter_down.weight.T + adapter.adapter_down.bias
                )
                return h + z @ adapter.adapter_up.weight.T + adapter.adapter_up.bias

            return (f(out[0]), *out[1:]) if isinstance(out, tuple) else f(out)

        return hook

    for name, layer in layers.items():
        base.get_submodule(name).register_forward_hook(hook_for(layer.adapters["default"]))
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(output(model, ids), output(base, ids))


def test_only_adapters_train_and_files_round_trip(tmp_path):
    model = st.add_adapter(tiny("llama"), BottleneckConfig(bottleneck_size=4))
    trainable, _ = st.trainable_parameters(model)
    # 2 layers x 2 sub-layers x (d*m + m + m*d + d), d=32, m=4
    assert trainable == 2 * 2 * (32 * 4 + 4 + 4 * 32 + 32)
    for layer in (m for m in model.modules() if isinstance(m, BottleneckLayer)):
        layer.adapters["default"].adapter_up.weight.data.normal_()
    st.save_adapter(model, tmp_path / "a")
    loaded = st.load_adapter(tiny("llama"), tmp_path / "a")
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(output(loaded, ids), output(model, ids), rtol=0, atol=0)
    with st.disable_adapter(loaded):
        torch.testing.assert_close(output(loaded, ids), output(tiny("llama"), ids))


def test_bad_input():
    with pytest.raises(SlimtuneError, match="bottleneck_size"):
        BottleneckConfig(bottleneck_size=0)
    with pytest.raises(SlimtuneError, match="cannot be merged"):
        st.merge(st.add_adapter(tiny("llama"), BottleneckConfig(bottleneck_size=2)))
