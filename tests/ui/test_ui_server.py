"""The server itself: the refusal to serve beyond loopback without a password, the login,
the upload cap, no file of the root fetchable by URL, and actions called over HTTP with
paths outside the root refused."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import httpx
import pytest

from slimtune.cli.main import main
from slimtune.errors import SlimtuneError
from slimtune.ui.common import Context, take_upload, upload_dir
from slimtune.ui.paths import Root


def test_a_public_host_without_a_password_does_not_start(tmp_path, capsys):
    assert main(["ui", "--host", "0.0.0.0", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("slimtune ui: error: --host 0.0.0.0 makes the app reachable")
    assert main(["ui", "--root", str(tmp_path / "missing")]) == 1
    assert "--root" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    gradio_app = pytest.importorskip("slimtune.ui.app")
    from ui_helpers import free_port

    root = tmp_path_factory.mktemp("root")
    shutil.copytree(tiny_llama_dir, root / "tiny")
    (root / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (root.parent / "secret.jsonl").write_text('{"text": "secret"}\n')
    ctx = Context(Root(root), max_upload_mb=1)
    app, url = gradio_app.launch(ctx, "127.0.0.1", free_port(), ("ann", "s3cret"), block=False)
    yield ctx, url
    app.close()


def logged_in(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    assert client.post("/login", data={"username": "ann", "password": "wrong"}).status_code == 400
    assert client.post("/login", data={"username": "ann", "password": "s3cret"}).status_code == 200
    return client


def call(client: httpx.Client, api: str, *data) -> list:
    """Run an event over Gradio's HTTP API; its final outputs."""
    event = client.post(f"/gradio_api/call/{api}", json={"data": list(data)}).json()["event_id"]
    text = client.get(f"/gradio_api/call/{api}/{event}").text
    last = [line for line in text.splitlines() if line.startswith("data:")][-1]
    return [html.unescape(o) if isinstance(o, str) else o for o in json.loads(last[5:])]


def test_nothing_answers_without_the_password(server):
    _, url = server
    anonymous = httpx.Client(base_url=url)
    for path in ("/config", "/gradio_api/info"):
        assert anonymous.get(path).status_code == 401
    call = anonymous.post("/gradio_api/call/train_show", json={"data": form()})
    assert call.status_code == 401
    assert logged_in(url).get("/config").status_code == 200


def test_no_file_of_the_root_or_elsewhere_is_served(server):
    ctx, url = server
    client = logged_in(url)
    for path in (ctx.root.path / "data.jsonl", ctx.root.path / "tiny" / "config.json"):
        assert client.get(f"/gradio_api/file={path}").status_code == 403
    assert client.get("/gradio_api/file=/etc/passwd").status_code == 403


def test_uploads_are_capped_and_checked(server):
    ctx, url = server
    client = logged_in(url)
    big = client.post("/gradio_api/upload", files={"files": ("big.jsonl", b"x" * 2**21)})
    assert big.status_code == 413
    good = client.post("/gradio_api/upload", files={"files": ("ok.jsonl", b'{"text": "a"}\n')})
    kept = take_upload(ctx, good.json()[0], (".jsonl",))
    assert kept == ctx.root.path / "uploads" / "ok.jsonl" and kept.read_text() == '{"text": "a"}\n'
    bad = client.post("/gradio_api/upload", files={"files": ("bad.jsonl", b"{not json\n")})
    with pytest.raises(SlimtuneError, match="upload bad.jsonl:1: not valid JSON"):
        take_upload(ctx, bad.json()[0], (".jsonl",))
    assert not (ctx.root.path / "uploads" / "bad.jsonl").exists()
    pickle = client.post("/gradio_api/upload", files={"files": ("w.pt", b"\x80\x04")})
    with pytest.raises(SlimtuneError, match="give a .jsonl file"):
        take_upload(ctx, pickle.json()[0], (".jsonl",))
    with pytest.raises(SlimtuneError, match="not a file the server received"):
        take_upload(ctx, str(ctx.root.path / "data.jsonl"), (".jsonl",))
    assert upload_dir() in Path(good.json()[0]).resolve().parents


def form(**changes) -> list:
    values = {"model": "tiny", "data": "data.jsonl", "eval": "", "method": "lora",
              "out": "runs/a", "steps": 3}  # fmt: skip
    values.update(changes)
    numbers = [values["steps"], 4, 2e-4, 512, 50, 8, 8, 1, 0, 0, 0, 0.0, 20, 64]
    return [values["model"], values["data"], values["eval"], values["method"], values["out"],
            *numbers, "", "", "", "", False]  # fmt: skip


@pytest.mark.parametrize(
    "changes, refused",
    [({"data": "../secret.jsonl"}, "data '../secret.jsonl' is refused"),
     ({"out": "/tmp/x"}, "run directory '/tmp/x' is refused"),
     ({"model": "../tiny"}, "model '../tiny' is refused")],
)  # fmt: skip
def test_actions_over_http_refuse_paths_outside_the_root(server, changes, refused):
    ctx, url = server
    client = logged_in(url)
    for api in ("train_show", "train_start"):
        outputs = call(client, api, *form(**changes))
        assert any(refused in str(o) for o in outputs), outputs
    assert not (ctx.root.path / "runs").exists()  # nothing started
    outputs = call(client, "chat_send", "tiny", "../x", "hi", 0.0, 8)
    assert any("adapter '../x' is refused" in str(o) for o in outputs)
    outputs = call(
        client, "export_run", "tiny", "", ["GGUF + Ollama Modelfile"], "f16", "/tmp", False
    )
    assert any("output directory '/tmp' is refused" in str(o) for o in outputs)


def test_show_the_command_over_http(server):
    _, url = server
    outputs = call(logged_in(url), "train_show", *form())
    text = next(o for o in outputs if isinstance(o, str) and "slimtune train" in o)
    assert (
        "slimtune train --model tiny --data data.jsonl --method lora --out runs/a --max-steps 3"
        in text
    )
    assert "max_steps: 3" in text  # the YAML


def test_evaluate_over_http_matches_slimtune_eval(server, tmp_path):
    """The scores on the page are `slimtune eval --json`'s, run here as the reference."""
    ctx, url = server
    outputs = call(logged_in(url), "eval_run", "tiny", "", "data.jsonl", 64, False)
    page = " ".join(str(o) for o in outputs)
    assert main(["eval", "--model", str(ctx.root.path / "tiny"), "--data",
                 str(ctx.root.path / "data.jsonl"), "--max-length", "64", "--json",
                 str(tmp_path / "ref.json"), "--quiet"]) == 0  # fmt: skip
    reference = json.loads((tmp_path / "ref.json").read_text())
    assert f"<td>{reference['loss']:.4f}</td>" in page
    assert f"<td>{100 * reference['exact_match']:.1f}%</td>" in page
    outputs = call(logged_in(url), "eval_run", "tiny", "", "../secret.jsonl", 64, False)
    assert any("data '../secret.jsonl' is refused" in str(o) for o in outputs)


def test_without_the_extra_one_line_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gradio" else real(name, *a))  # fmt: skip
    assert main(["ui", "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        "slimtune ui: error: the web app needs Gradio: pip install 'slimtune[ui]'\n"
    )
