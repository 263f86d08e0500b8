"""Fuzzed --config files: a damaged YAML file, or a good one whose values have the wrong
types, either resolves or fails with one SlimtuneError line naming the file or the key."""

from __future__ import annotations

import argparse
import re

import yaml
from fuzz_bytes import damaged, examples, json_values
from hypothesis import example, given
from hypothesis import strategies as st

from slimtune.cli.train import RUN_KEYS, TRAIN_KEYS, read_yaml, resolve
from slimtune.errors import SlimtuneError

GOOD = {"model": "m", "data": "d.jsonl", "out": "runs/a", "lr": 0.001, "max_steps": 10,
        "rank": 8, "target_modules": "q_proj,v_proj", "schedule": "cosine"}  # fmt: skip


def args_for(config) -> argparse.Namespace:
    return argparse.Namespace(command="train", resume=False, overwrite=False, quiet=True,
                              config=str(config), nproc=None)  # fmt: skip


def resolves_or_names(config, key: str | None = None) -> None:
    try:
        resolve(args_for(config))
    except SlimtuneError as exc:
        message = str(exc)
        assert "\n" not in message
        flag = re.search(r"--[a-z]|[a-z_]+:", message)  # "train needs --model (or 'model:' …)"
        named = str(config) in message or flag or (key and key.replace("_", "-") in message)
        assert named, message


@examples(150)
@given(bad=damaged(yaml.safe_dump(GOOD).encode()))
def test_damaged_yaml_config(bad, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes(bad)
    resolves_or_names(config)


@examples(150)
@given(key=st.sampled_from(sorted(set(RUN_KEYS + TRAIN_KEYS))), value=json_values())
@example(key="adam_beta1", value="")  # found by `make fuzz`: float("") in TrainConfig
@example(key="method", value=[])  # found by `make fuzz`: a list where a name belongs
def test_wrong_types_in_yaml(key, value, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**GOOD, key: value}))
    resolves_or_names(config, key)


def test_deep_nesting_and_binary_name_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    for content in (b"a: " + b"[" * 1_000, b"\xff\xfe\x00garbage", b"\x00" * 10):
        config.write_bytes(content)
        try:
            read_yaml(config)
        except SlimtuneError as exc:
            assert str(config) in str(exc)
        else:
            raise AssertionError(f"{content[:10]!r} was accepted")
