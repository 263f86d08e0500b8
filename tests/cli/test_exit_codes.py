"""The last line of defence in cli/main.py: a bug is one line with its own exit code (3), a
user error exits 1, a bad flag 2, Ctrl-C 130; a reader that closes the pipe ends it quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import slimtune as st
from slimtune.cli import main as cli
from slimtune.errors import SlimtuneError


def failing_with(exc: BaseException):
    def handler(command):
        def run(args):
            raise exc

        return run

    return handler


def test_a_bug_is_one_line_with_exit_3(monkeypatch, capsys):
    monkeypatch.delenv("SLIMTUNE_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_handler", failing_with(TypeError("unsupported operand\nmore")))
    assert cli.main(["inspect", "x"]) == cli.EXIT_INTERNAL_ERROR == 3
    assert capsys.readouterr().err == (
        "slimtune: internal error (TypeError: unsupported operand); "
        "run with SLIMTUNE_DEBUG=1 for the traceback\n"
    )


def test_slimtune_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("SLIMTUNE_DEBUG", "1")
    monkeypatch.setattr(cli, "_handler", failing_with(TypeError("boom")))
    with pytest.raises(TypeError, match="boom"):
        cli.main(["inspect", "x"])


def test_user_error_and_interrupt_codes_differ(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_handler", failing_with(SlimtuneError("bad --rank")))
    assert cli.main(["inspect", "x"]) == 1
    monkeypatch.setattr(cli, "_handler", failing_with(KeyboardInterrupt()))
    assert cli.main(["inspect", "x"]) == 130
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert len({1, 2, 3, 130}) == 4


def test_closed_stdout_pipe_ends_quietly(tmp_path):
    from tiny_models import tiny_llama

    adapter = tmp_path / "adapter"
    st.save_adapter(
        st.add_adapter(tiny_llama(), st.LoraConfig(r=2, target_modules="all-linear")), adapter
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SLIMTUNE_DEBUG", None)
    reader, writer = os.pipe()
    os.close(reader)  # `| head` that has already gone away
    proc = subprocess.run([sys.executable, "-m", "slimtune", "inspect", str(adapter)],
                          stdout=writer, stderr=subprocess.PIPE, env=env, timeout=120)  # fmt: skip
    os.close(writer)
    assert proc.stderr == b""
    assert proc.returncode == cli.EXIT_CLOSED_PIPE
