import pytest

from slimtune.config import LoraConfig
from slimtune.errors import SlimtuneError


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("r", 0),
        ("r", -1),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
        ("lora_dropout", -0.1),
        ("bias", "some"),
    ],
)
def test_bad_lora_config_names_field(field, value):
    with pytest.raises(SlimtuneError, match=field):
        LoraConfig(**{field: value})


def test_config_is_frozen():
    config = LoraConfig(r=4)
    with pytest.raises(AttributeError):
        config.r = 8  # type: ignore[misc]
