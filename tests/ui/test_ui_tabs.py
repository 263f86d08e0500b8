"""The Evaluate, Compare and Export tabs' commands: checked before they start, and what the
page shows of their results."""

from __future__ import annotations

import shutil

import pytest

from slimtune.cli.parser import build_parser
from slimtune.errors import SlimtuneError
from slimtune.ui.common import Context
from slimtune.ui.paths import Root

pytest.importorskip("gradio")


@pytest.fixture
def ctx(tmp_path, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "tiny")
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    return Context(Root(tmp_path))


def test_the_failures_filter_keeps_exactly_the_rows_that_missed():
    from slimtune.ui.eval_tab import table_rows

    examples = [{"prompt": f"p{i}", "reference": "r", "prediction": "x", "match": i % 3 == 0}
                for i in range(7)]  # fmt: skip
    assert [r[0] for r in table_rows(examples, False)] == [f"p{i}" for i in range(7)]
    assert [r[0] for r in table_rows(examples, True)] == ["p1", "p2", "p4", "p5"]


def test_compare_command_parses_as_the_cli_and_refuses_bad_input(ctx):
    from slimtune.ui.compare_tab import compare_command

    args, out = compare_command(ctx, "tiny", "d.jsonl", ["lora", "ia3"], 2, "cmp", False)
    parsed = build_parser().parse_args(args)
    assert (parsed.methods, parsed.max_steps, parsed.out) == ("lora,ia3", 2, "cmp")
    assert out == ctx.root.path / "cmp"
    for bad, message in ((dict(methods=[]), "--methods"), (dict(steps=0), "--max-steps 0"),
                         (dict(out="../x"), "refused")):  # fmt: skip
        values = {"methods": ["lora"], "steps": 2, "out": "cmp", **bad}
        with pytest.raises(SlimtuneError, match=message):
            compare_command(ctx, "tiny", "d.jsonl", values["methods"], values["steps"],
                            values["out"], False)  # fmt: skip


def test_compare_report_shows_its_table_and_every_chart(tmp_path):
    from PIL import Image

    from slimtune.ui.compare_tab import report_parts

    (tmp_path / "report.md").write_text("# r\n\n![quality](quality.png)\n| a | b |\n")
    for name in ("quality", "memory"):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png")
    text, charts = report_parts(tmp_path)
    assert text == "# r\n\n| a | b |\n"  # image links (relative files) left to the gallery
    assert [label for _, label in charts] == ["memory", "quality"]


def test_export_commands_parse_as_the_cli(ctx):
    from slimtune.ui.export_tab import export_commands

    labels = ["merged safetensors", "GGUF + Ollama Modelfile", "GGUF LoRA (adapter only)"]
    commands, out = export_commands(ctx, "tiny", "run/adapter", labels, "q8_0", "ex", True)
    parsed = [build_parser().parse_args(a) for a in commands]
    assert [(p.format, p.out, p.adapter) for p in parsed] == [
        ("safetensors", "ex/merged", "run/adapter"), ("gguf", "ex", "run/adapter"),
        ("gguf-lora", "ex", "run/adapter")]  # fmt: skip
    assert parsed[1].dtype == "q8_0" and all(p.overwrite for p in parsed)
    with pytest.raises(SlimtuneError, match="GGUF LoRA exports an adapter"):
        export_commands(ctx, "tiny", "", labels[2:], "f16", "ex", False)
    with pytest.raises(SlimtuneError, match="has no adapter_config.json"):
        export_commands(ctx, "tiny", "run", labels[:1], "f16", "ex", False)
    with pytest.raises(SlimtuneError, match="--dtype"):
        export_commands(ctx, "tiny", "", labels[1:2], "q1", "ex", False)
