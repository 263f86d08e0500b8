"""Every typed path stays inside the root: `..`, absolute paths outside and symbolic links
out of it are refused; the scan lists what the root holds and nothing outside it."""

from __future__ import annotations

import os

import pytest

from slimtune.errors import SlimtuneError
from slimtune.ui.paths import Root, demo_data


@pytest.fixture
def root(tmp_path):
    (tmp_path / "root" / "data").mkdir(parents=True)
    (tmp_path / "root" / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "outside.jsonl").write_text('{"text": "secret"}\n')
    return Root(tmp_path / "root")


def test_a_relative_path_resolves_inside(root):
    assert root.resolve("data/a.jsonl") == root.path / "data" / "a.jsonl"
    assert root.resolve("./data/./a.jsonl") == root.path / "data" / "a.jsonl"
    assert root.data("data/a.jsonl") == root.path / "data" / "a.jsonl"


@pytest.mark.parametrize("typed", ["../outside.jsonl", "data/../../outside.jsonl", "data/.."])
def test_dot_dot_is_refused(root, typed):
    with pytest.raises(SlimtuneError, match=r"refused: '\.\.' would lead outside"):
        root.resolve(typed, "data")


def test_an_absolute_path_outside_is_refused_and_inside_accepted(root, tmp_path):
    with pytest.raises(SlimtuneError, match="is refused: it is outside"):
        root.resolve(str(tmp_path / "outside.jsonl"), "data")
    with pytest.raises(SlimtuneError, match="refused"):
        root.resolve("/etc/passwd", "data")
    inside = root.path / "data" / "a.jsonl"
    assert root.resolve(str(inside)) == inside


def test_a_symlink_out_of_the_root_is_refused(root, tmp_path):
    os.symlink(tmp_path / "outside.jsonl", root.path / "data" / "link.jsonl")
    os.symlink(tmp_path, root.path / "up")
    with pytest.raises(SlimtuneError, match="a symbolic link leads outside"):
        root.resolve("data/link.jsonl", "data")
    with pytest.raises(SlimtuneError, match="a symbolic link leads outside"):
        root.resolve("up/outside.jsonl", "data")
    os.symlink(root.path / "data" / "a.jsonl", root.path / "inner.jsonl")  # inside: fine
    assert root.data("inner.jsonl") == root.path / "data" / "a.jsonl"
    assert "data/link.jsonl" not in root.scan()["data"]


def test_empty_nul_and_wrong_types_are_refused(root):
    for typed, message in (("", "give a path"), ("a\x00b", "not a valid path"),
                           ("data", "not a file"), ("data/a.bin", "not a file")):  # fmt: skip
        with pytest.raises(SlimtuneError, match=message):
            root.data(typed)
    (root.path / "model.pt").write_bytes(b"x")
    with pytest.raises(SlimtuneError, match="give a .jsonl"):
        root.data("model.pt")


def test_builtin_names_are_not_paths(root):
    assert root.model("smollm2-135m") == "smollm2-135m"
    demo = next(iter(demo_data()))
    copied = root.data(demo)  # copied into the root, so commands name a file under it
    assert copied == root.path / "data" / "demo" / "train.jsonl"
    assert copied.read_bytes() == demo_data()[demo].read_bytes()


def test_scan_finds_models_data_runs_and_adapters(root, tiny_llama_dir):
    import shutil

    shutil.copytree(tiny_llama_dir, root.path / "models" / "tiny")
    run = root.path / "runs" / "a"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("method: lora\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (root.path / ".hidden").mkdir()
    (root.path / ".hidden" / "b.jsonl").write_text("{}\n")
    found = root.scan()
    assert found["models"] == ["models/tiny"]
    assert found["data"] == ["data/a.jsonl"]  # metrics.jsonl and hidden folders left out
    assert found["runs"] == ["runs/a"] and found["adapters"] == ["runs/a/adapter"]
