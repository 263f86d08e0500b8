import pytest
import torch

from slimtune.adapters.peft_keys import copy_adapter_tensors
from slimtune.errors import SlimtuneError


def test_copy_adapter_tensors_fills_the_model_tensors():
    target = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    source = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    copy_adapter_tensors(target, source, "test file")
    assert all(torch.equal(target[k], source[k]) for k in target)


def test_copy_adapter_tensors_names_missing_and_extra_keys():
    with pytest.raises(
        SlimtuneError, match=r"test file does not fit.*missing \['b'\].*unexpected \['c'\]"
    ):
        copy_adapter_tensors(
            {"a": torch.zeros(1), "b": torch.zeros(1)},
            {"a": torch.ones(1), "c": torch.ones(1)},
            "test file",
        )


def test_copy_adapter_tensors_names_both_shapes_and_changes_nothing_on_error():
    target = {"a": torch.zeros(2, 3)}
    with pytest.raises(
        SlimtuneError, match=r"a has shape \(3, 2\) in the file, the model needs \(2, 3\)"
    ):
        copy_adapter_tensors(target, {"a": torch.ones(3, 2)}, "test file")
    assert torch.equal(target["a"], torch.zeros(2, 3))
