"""Nothing of the user's is deleted, nothing half-made is left: every command that writes.

Each failure is forced at the point where a writer has already made directories or files
(the reference: the directory tree as it was before the command), and each refusal is
checked to leave the user's files byte for byte.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest

from slimtune.cli import demo
from slimtune.cli.main import main
from slimtune.config import LoraConfig
from slimtune.errors import SlimtuneError


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a directory)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(12)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--rank", "2", "--quiet",
                 "--target-modules", "q_proj", *extra])  # fmt: skip


def users_dir(root: Path) -> Path:
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    (root / "data").mkdir()
    (root / "data" / "rows.jsonl").write_text("{}\n")
    return root


def test_train_refuses_a_users_directory_and_overwrite_adds_beside(
    tiny_llama_dir, data_file, tmp_path, capsys
):
    out = users_dir(tmp_path / "mine")
    before = tree(out)
    assert train(tiny_llama_dir, data_file, out) == 1
    assert "is not empty" in capsys.readouterr().err and tree(out) == before
    assert train(tiny_llama_dir, data_file, out, "--overwrite") == 0
    after = tree(out)
    assert {k: v for k, v in after.items() if k in before} == before
    assert {"adapter", "config.yaml", "summary.json"} <= set(after)


def test_overwrite_replaces_only_a_runs_own_files(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_llama_dir, data_file, out, "--save-every", "1", "--max-steps", "3") == 0
    (out / "notes.txt").write_text("mine")
    assert train(tiny_llama_dir, data_file, out, "--save-every", "1", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-000001",
        "step-000002",
    ]  # fmt: skip  (the 3-step run's step-000003 is gone: replaced, not merged)


def test_overwrite_refuses_a_config_yaml_no_run_wrote(tiny_llama_dir, data_file, tmp_path, capsys):
    out = users_dir(tmp_path / "project")
    (out / "config.yaml").write_text("my: settings\n")
    before = tree(out)
    assert train(tiny_llama_dir, data_file, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "config.yaml, which no slimtune run wrote" in err and tree(out) == before


def boom(*args, **kwargs):
    raise SlimtuneError("boom")


def test_a_failed_run_removes_what_it_wrote(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr("slimtune.training.loop.finish", boom)
    out = tmp_path / "new" / "run"
    assert train(tiny_llama_dir, data_file, out, "--save-every", "0") == 1
    assert not (tmp_path / "new").exists()
    mine = users_dir(tmp_path / "mine")
    before = tree(mine)
    assert train(tiny_llama_dir, data_file, mine, "--save-every", "0", "--overwrite") == 1
    assert tree(mine) == before


def test_a_failed_run_keeps_its_checkpoints(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr("slimtune.training.loop.finish", boom)
    out = tmp_path / "run"
    assert train(tiny_llama_dir, data_file, out, "--save-every", "1") == 1
    assert (out / "checkpoints" / "step-000002").is_dir()  # for --resume


@pytest.fixture
def tiny_demo(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(demo, "MODEL", str(tiny_llama_dir))
    monkeypatch.setattr(demo, "LORA", LoraConfig(r=2, target_modules=["q_proj"]))
    monkeypatch.setattr(demo, "TRAIN", dataclasses.replace(demo.TRAIN, max_steps=1, save_every=1))


def test_demo_out_dot_deletes_nothing(tiny_demo, tmp_path, monkeypatch, capsys):
    here = users_dir(tmp_path / "cwd")
    monkeypatch.chdir(here)
    before = tree(here)
    assert main(["demo", "--out", ".", "--quiet"]) == 1
    assert "is not empty" in capsys.readouterr().err and tree(here) == before
    assert main(["demo", "--out", ".", "--quiet", "--overwrite"]) == 0
    after = tree(here)
    assert {k: v for k, v in after.items() if k in before} == before
    assert "adapter/adapter_model.safetensors" in after and "summary.json" in after


def test_demo_keeps_an_earlier_run_unless_overwrite(tiny_demo, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    before = tree(out)
    assert main(["demo", "--out", str(out), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err and tree(out) == before


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    path = tmp_path_factory.mktemp("writers") / "adapter"
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        path
    )
    return path


def test_a_failed_merge_leaves_nothing(tiny_llama_dir, adapter_dir, tmp_path, monkeypatch):
    import transformers

    def half_write(self, directory, **kwargs):
        (Path(directory) / "config.json").write_text("{}")
        raise SlimtuneError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", half_write)
    out = tmp_path / "a" / "merged"
    argv = ["merge", "--model", str(tiny_llama_dir), "--adapter", str(adapter_dir)]
    assert main([*argv, "--out", str(out)]) == 1
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("fmt", "writer", "out"),
    [("safetensors", "export_safetensors", "x/merged"), ("gguf", "export_gguf", "g1"),
     ("gguf", "export_gguf", "x/model.gguf"), ("gguf-lora", "export_gguf_lora", "x/a.gguf")],
)  # fmt: skip
def test_a_failed_export_leaves_nothing(
    fmt, writer, out, tiny_llama_dir, adapter_dir, tmp_path, monkeypatch
):
    from slimtune.export.gguf import output_paths

    def half_write(*args, **kwargs):
        for path in output_paths(fmt, tmp_path / out):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half")
        raise SlimtuneError("disk full")

    monkeypatch.setattr(f"slimtune.cli.export.{writer}", half_write)
    (tmp_path / "keep.txt").write_text("mine")
    before = tree(tmp_path)
    argv = ["export", "--model", str(tiny_llama_dir), "--adapter", str(adapter_dir)]
    assert main([*argv, "--format", fmt, "--out", str(tmp_path / out)]) == 1
    assert tree(tmp_path) == before


def test_a_failed_compare_leaves_nothing(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    def half_compare(settings, out, **kwargs):
        (out / "runs" / "lora").mkdir(parents=True)
        raise SlimtuneError("a run failed")

    monkeypatch.setattr(importlib.import_module("slimtune.compare.run"), "compare", half_compare)
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_llama_dir), "--data", str(data_file), "--out"]
    assert main([*argv, str(out), "--methods", "lora", "--quiet"]) == 1
    assert not out.exists()
    mine = users_dir(tmp_path / "mine")
    before = tree(mine)
    assert main([*argv, str(mine), "--methods", "lora", "--quiet", "--overwrite"]) == 1
    assert tree(mine) == before
