"""A root folder for the app's tests (a tiny model GGUF can describe, a data file) and a
`slimtune ui` child process serving it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def make_root(root: Path) -> Path:
    """ROOT/tiny (Llama, byte-level BPE tokenizer, ChatML) and ROOT/data/train.jsonl."""
    from export_helpers import build_bpe_tokenizer, build_model, save_model_dir

    tokenizer = build_bpe_tokenizer()
    save_model_dir(build_model("llama", len(tokenizer)), tokenizer, root / "tiny")
    rows = [{"prompt": f"What is {i} plus one?", "completion": f" {i + 1}."} for i in range(16)]
    (root / "data").mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    (root / "data" / "train.jsonl").write_text(lines, encoding="utf-8")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(root: Path, *extra: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`python -m slimtune ui --root ROOT --port P`, once its page answers: (process, URL)."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "slimtune", "ui", "--root", str(root), "--port", str(port), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"slimtune ui ended: {process.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return process, url
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError("slimtune ui did not answer")


def stop_ui(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
