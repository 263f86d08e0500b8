"""A full disk (ENOSPC) or an I/O error (EIO), simulated by making a write raise part-way:
the run stops with one line naming the path, the previous checkpoint and any existing output
are intact, no half-written file or directory is left, and --resume continues bit-identically."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import slimtune as st
from slimtune.cli.main import main
from slimtune.errors import SlimtuneError
from slimtune.training import checkpoints
from slimtune.training.checkpoints import list_checkpoints
from tiny_models import tiny_llama


def failing_after(real, calls: int, exc: BaseException):
    """`real`, except that call number `calls` writes a few bytes and then raises `exc`."""
    count = [0]

    def write(tensors, path, *args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            with open(path, "wb") as handle:
                handle.write(b"\x00" * 10)
            raise exc
        return real(tensors, path, *args, **kwargs)

    return write


def leftovers(root) -> list:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


@pytest.fixture
def common(tiny_llama_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "completion": str(a + 1)}) + "\n"
                            for a in range(16)))  # fmt: skip
    return ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--batch-size", "4",
            "--lr", "0.01", "--max-steps", "8", "--save-every", "2", "--quiet"]  # fmt: skip


def test_full_disk_during_a_checkpoint_keeps_the_last_one(common, tmp_path, monkeypatch, capsys):
    run, reference = tmp_path / "run", tmp_path / "reference"
    enospc = OSError(errno.ENOSPC, "No space left on device")
    # 3 files a checkpoint: the 7th write is the first of the checkpoint at step 6
    monkeypatch.setattr(checkpoints, "save_file", failing_after(checkpoints.save_file, 7, enospc))
    assert main([*common, "--out", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    last = run / "checkpoints" / "step-000004"
    assert err == (
        f"slimtune train: error: cannot write checkpoint {run / 'checkpoints' / 'step-000006'} "
        f"(No space left on device); the last complete one, {last}, is intact; "
        "free some space and continue with --resume"
    )
    assert [p.name for p in list_checkpoints(run)] == ["step-000002", "step-000004"]
    assert not leftovers(run) and not (run / "adapter").exists()

    monkeypatch.undo()
    assert main([*common, "--out", str(run), "--resume"]) == 0
    assert main([*common, "--out", str(reference)]) == 0
    ours = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_io_error_writing_the_final_adapter(common, tmp_path, monkeypatch, capsys):
    import slimtune.adapter_dir as adapter_dir

    run = tmp_path / "run"
    eio = SafetensorError("Error while serializing: I/O error: Input/output error (os error 5)")
    monkeypatch.setattr(adapter_dir, "save_file", failing_after(adapter_dir.save_file, 1, eio))
    assert main([*common, "--out", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"slimtune train: error: cannot write {run / 'adapter'} (Input/output error (os error 5)); "
        "nothing was written"
    )
    assert not leftovers(run) and not (run / "adapter").exists()
    assert list_checkpoints(run)[-1].name == "step-000008"
    monkeypatch.undo()
    assert main([*common, "--out", str(run), "--resume"]) == 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_existing_adapter_survives_a_failed_overwrite(tmp_path, monkeypatch):
    import slimtune.adapter_dir as adapter_dir

    out = tmp_path / "adapter"
    st.save_adapter(st.add_adapter(tiny_llama(), st.LoraConfig(r=2)), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    enospc = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(adapter_dir, "save_file", failing_after(adapter_dir.save_file, 1, enospc))
    other = st.add_adapter(tiny_llama(seed=1), st.LoraConfig(r=4))
    with pytest.raises(SlimtuneError, match=f"cannot write {out} .No space left on device.; "
                                            "the existing one is unchanged"):  # fmt: skip
        st.save_adapter(other, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not leftovers(tmp_path)


def test_existing_export_survives_a_failed_overwrite(tmp_path, monkeypatch):
    import slimtune.export.gguf as gguf_export
    from export_helpers import build_bpe_tokenizer, build_model

    tokenizer = build_bpe_tokenizer()
    model = build_model("llama", len(tokenizer))
    path = gguf_export.export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32",
                                   say=lambda line: None)  # fmt: skip
    before = path.read_bytes()

    def half_then_eio(model, tokenizer, target, **kwargs):
        target.write_bytes(before[: len(before) // 2])
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(gguf_export, "write_gguf", half_then_eio)
    with pytest.raises(SlimtuneError, match=f"cannot write {path} .Input/output error."):
        gguf_export.export_gguf(model, tokenizer, path, dtype="f32", overwrite=True,
                                say=lambda line: None)  # fmt: skip
    assert path.read_bytes() == before
    assert not leftovers(tmp_path)
