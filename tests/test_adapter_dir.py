"""Adapter files (slimtune.io): PEFT's layout, header metadata, and every bad input."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import transformers as tf
from safetensors import safe_open

import slimtune as st
from slimtune.adapter_dir import read_adapter_config, read_adapter_metadata
from slimtune.errors import SlimtuneError

CONFIG = dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4, init_lora_weights=False)


def tiny(hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


@pytest.fixture
def saved(tmp_path):
    model = st.add_adapter(tiny(), st.LoraConfig(**CONFIG))
    st.save_adapter(
        model, tmp_path / "a", base_model_name_or_path="tiny", metadata={"slimtune.quant": "nf4"}
    )
    return tmp_path / "a"


def test_layout_keys_and_config_are_peft_s(saved, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(tiny(), peft.LoraConfig(**CONFIG))
        reference.save_pretrained(tmp_path / "peft")
    with (
        safe_open(str(saved / "adapter_model.safetensors"), "pt") as ours,
        safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as theirs,
    ):
        assert sorted(ours.keys()) == sorted(theirs.keys())
    ours_cfg, theirs_cfg = read_adapter_config(saved), read_adapter_config(tmp_path / "peft")
    assert set(theirs_cfg) <= set(ours_cfg)
    for key in (
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "bias",
        "fan_in_fan_out",
    ):
        assert ours_cfg[key] == theirs_cfg[key]
    assert sorted(ours_cfg["target_modules"]) == sorted(theirs_cfg["target_modules"])
    assert ours_cfg["base_model_name_or_path"] == "tiny"


def test_metadata_round_trips_and_peft_ignores_it(saved):
    assert read_adapter_metadata(saved) == {"slimtune.quant": "nf4"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(tiny(), saved)
    # no complaint (missing or unexpected keys, config fields); transformers' own
    # deprecation notices are not about the adapter
    complaints = [
        w for w in caught if not issubclass(w.category, FutureWarning | DeprecationWarning)
    ]
    assert complaints == [], [str(w.message) for w in complaints]
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if "lora_B" in k)
        name = key.replace("lora_B.weight", "lora_B.default.weight")
        torch.testing.assert_close(dict(loaded.named_parameters())[name], f.get_tensor(key))


def test_unknown_config_keys_warn_once_and_load(saved):
    data = json.loads((saved / "adapter_config.json").read_text())
    data["future_option"] = 1
    data["another_new_field"] = "x"
    (saved / "adapter_config.json").write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = st.load_adapter(tiny(), saved)
    ours = [w for w in caught if "adapter_config.json" in str(w.message)]
    assert len(ours) == 1 and "another_new_field, future_option" in str(ours[0].message)
    assert "default" in st.adapter_configs(model)


def test_existing_output_needs_overwrite_and_is_replaced_whole(saved):
    model = st.add_adapter(tiny(), st.LoraConfig(**{**CONFIG, "r": 3}))
    with pytest.raises(SlimtuneError, match="not empty"):
        st.save_adapter(model, saved)
    assert read_adapter_config(saved)["r"] == 2
    st.save_adapter(model, saved, overwrite=True)
    assert read_adapter_config(saved)["r"] == 3
    assert read_adapter_metadata(saved) == {}
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []


def test_missing_corrupt_and_pickled_files_are_refused(saved, tmp_path):
    with pytest.raises(SlimtuneError, match="does not exist"):
        st.load_adapter(tiny(), tmp_path / "nowhere")
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(SlimtuneError, match="truncated or damaged"):
        st.load_adapter(tiny(), saved)
    weights.unlink()
    (saved / "adapter_model.bin").write_bytes(b"\x80\x04this would be unpickled")
    with pytest.raises(SlimtuneError, match=r"pickled.*never loads.*safetensors") as info:
        st.load_adapter(tiny(), saved)
    assert "\n" not in str(info.value)
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(SlimtuneError, match="not valid JSON"):
        st.load_adapter(tiny(), saved)


def test_shapes_that_do_not_fit_name_module_and_shapes(saved):
    model = tiny(hidden=48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        SlimtuneError,
        match=r"self_attn\.(q|v)_proj .* shape \(\d+, \d+\) in the file but \(\d+, \d+\)",
    ):
        st.load_adapter(model, saved)
    assert st.adapter_configs(model) == {}  # left as it was
    assert set(model.state_dict()) == set(before)


def test_unknown_peft_type_and_target_mismatch(saved):
    data = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**data, "peft_type": "HRA"}))
    with pytest.raises(SlimtuneError, match="peft_type='HRA'"):
        st.load_adapter(tiny(), saved)
    (saved / "adapter_config.json").write_text(json.dumps({**data, "target_modules": ["c_attn"]}))
    with pytest.raises(SlimtuneError, match="matches no module.*q_proj"):
        st.load_adapter(tiny(), saved)


def test_save_without_adapter_or_bad_metadata(tmp_path):
    with pytest.raises(SlimtuneError, match="no adapter named"):
        st.save_adapter(tiny(), tmp_path / "x")
    model = st.add_adapter(tiny(), st.LoraConfig(**CONFIG))
    with pytest.raises(SlimtuneError, match="metadata"):
        st.save_adapter(model, tmp_path / "x", metadata={"bits": 4})
    assert not (tmp_path / "x").exists()
