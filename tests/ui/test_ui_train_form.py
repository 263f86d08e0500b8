"""The Train tab's form gives the `slimtune train` command the CLI itself would resolve to
the same configuration; bad values are refused with the CLI's one-line messages."""

from __future__ import annotations

import shutil

import pytest

from slimtune.cli.parser import build_parser
from slimtune.cli.train import read_yaml, resolve
from slimtune.errors import SlimtuneError
from slimtune.ui.paths import Root
from slimtune.ui.train_form import as_yaml, default_of, resume_command, train_command


@pytest.fixture
def root(tmp_path, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "tiny")
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    return Root(tmp_path)


def form(**changes):
    values = {"model": "tiny", "data": "data.jsonl", "method": "lora", "out": "runs/a"}
    values.update({key: default_of(key) for key in ("max_steps", "lr", "rank", "batch_size")})
    return {**values, **changes}


def cli_resolve(args):
    return resolve(build_parser().parse_args(args))


def test_the_command_resolves_like_the_cli(root, monkeypatch):
    monkeypatch.chdir(root.path)
    args, out = train_command(root, form(max_steps=3, lr=1e-3, rank=4, warmup_steps=1))
    assert out == root.path / "runs" / "a"
    assert args[:3] == ["train", "--model", "tiny"]
    run, config = cli_resolve(args)
    assert (config.max_steps, config.lr, config.warmup_steps) == (3, 1e-3, 1)
    assert (run["rank"], run["method"], run["data"]) == (4, "lora", "data.jsonl")
    assert "--batch-size" not in args  # left at the default: the CLI fills it in
    assert config.batch_size == default_of("batch_size")


def test_the_yaml_is_the_same_run_as_the_flags(root, monkeypatch):
    monkeypatch.chdir(root.path)
    args, _ = train_command(root, form(max_steps=3, rank=4, target_modules="q_proj,v_proj"))
    (root.path / "run.yaml").write_text(as_yaml(args))
    from_flags = cli_resolve(args)
    from_yaml = cli_resolve(["train", "--config", "run.yaml"])
    assert from_flags == from_yaml
    assert read_yaml(root.path / "run.yaml")["target_modules"] == "q_proj,v_proj"


@pytest.mark.parametrize(
    "changes, flag",
    [({"lr": 2.0}, "--lr"), ({"max_steps": 0}, "--max-steps"), ({"rank": 0}, "--rank"),
     ({"batch_size": -1}, "--batch-size")],
)  # fmt: skip
def test_bad_numbers_get_the_cli_message(root, monkeypatch, changes, flag):
    monkeypatch.chdir(root.path)
    with pytest.raises(SlimtuneError) as ui_error:
        train_command(root, form(**changes))
    assert str(ui_error.value).startswith(f"{flag} ")
    args = ["train", "--model", "tiny", "--data", "data.jsonl", "--out", "runs/a"]
    args += [flag, str(next(iter(changes.values())))]
    if flag == "--rank":  # the CLI checks the method's config when it builds it
        from slimtune.methods.lora.recipe import lora_config

        with pytest.raises(SlimtuneError) as cli_error:
            lora_config({"rank": 0})
        assert str(cli_error.value).split(" is not accepted")[1] in str(ui_error.value)
        return
    with pytest.raises(SlimtuneError) as cli_error:
        cli_resolve(args)
    assert str(ui_error.value) == str(cli_error.value)


def test_paths_are_checked_before_anything_starts(root, tmp_path):
    with pytest.raises(SlimtuneError, match=r"data '\.\./x.jsonl' is refused"):
        train_command(root, form(data="../x.jsonl"))
    with pytest.raises(SlimtuneError, match="is refused"):
        train_command(root, form(out="/tmp/elsewhere"))
    with pytest.raises(SlimtuneError, match="does not exist"):
        train_command(root, form(model="nope"))
    (root.path / "bad.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(SlimtuneError, match="bad.jsonl:1"):
        train_command(root, form(data="bad.jsonl"))
    (root.path / "runs" / "a").mkdir(parents=True)
    (root.path / "runs" / "a" / "x").write_text("keep")
    with pytest.raises(SlimtuneError, match="exists and is not empty"):
        train_command(root, form())
    args, _ = train_command(root, form(overwrite=True))
    assert args[-1] == "--overwrite"


def test_resume_needs_a_checkpoint(root):
    run = root.path / "runs" / "b"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method: lora\n")
    with pytest.raises(SlimtuneError, match="before its first checkpoint"):
        resume_command(root, "runs/b")
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    assert resume_command(root, "runs/b")[0] == ["train", "--out", "runs/b", "--resume"]
    (run / "summary.json").write_text("{}")
    with pytest.raises(SlimtuneError, match="is finished"):
        resume_command(root, "runs/b")
