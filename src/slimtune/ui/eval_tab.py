"""The Evaluate tab: loss, perplexity and exact match of a model (+ adapter) on a data file,
and its rows (prompt, expected, generated) filterable to the failures.

It runs `slimtune eval --json FILE` as a child process and reads the file it writes.
"""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from slimtune.errors import SlimtuneError
from slimtune.models import resolve_model_path
from slimtune.ui.chat_tab import adapter_path
from slimtune.ui.common import Context, base_of, guarded, note, wait_for
from slimtune.ui.jobs import command_line
from slimtune.ui.train_form import shown

HEADERS = ["prompt", "expected", "generated", "match"]


def eval_command(ctx: Context, model_text, adapter_text, data_text, max_length, result: Path):
    """`slimtune eval` arguments writing `result`, every path checked first."""
    spec = ctx.root.model(model_text)
    resolve_model_path(spec)
    adapter = adapter_path(ctx, adapter_text)
    data = ctx.root.data(data_text)
    if max_length is None or int(max_length) <= 0 or int(max_length) != max_length:
        raise SlimtuneError(f"--max-length {max_length} is not accepted: an integer > 0")
    model_arg = shown(ctx.root, Path(spec)) if Path(spec).is_absolute() else spec
    args = ["eval", "--model", model_arg, "--data", shown(ctx.root, data)]
    if adapter is not None:
        args += ["--adapter", shown(ctx.root, adapter)]
    return args + ["--max-length", str(int(max_length)), "--json", str(result), "--quiet"]


def scores_html(result: dict[str, Any]) -> str:
    cells = [("rows", f"{result['rows']}"), ("tokens", f"{result['tokens']}"),
             ("loss", f"{result['loss']:.4f}"), ("perplexity", f"{result['perplexity']:.2f}")]  # fmt: skip
    if "exact_match" in result:
        cells.append(("exact match", f"{100 * result['exact_match']:.1f}%"))
    head = "".join(f"<th>{html.escape(k)}</th>" for k, _ in cells)
    body = "".join(f"<td>{html.escape(v)}</td>" for _, v in cells)
    return f"<table class='eval-scores'><tr>{head}</tr><tr>{body}</tr></table>"


def table_rows(examples: list[dict[str, Any]], failures_only: bool) -> list[list[str]]:
    rows = [[e["prompt"], e["reference"], e["prediction"], "yes" if e["match"] else "no"]
            for e in examples if not (failures_only and e["match"])]  # fmt: skip
    return rows or [[""] * len(HEADERS)]


def build(ctx: Context) -> list:
    scanned = ctx.scan()
    models, adapters = ctx.root.model_choices(scanned), ctx.root.adapter_choices(scanned)
    data_files = ctx.root.data_choices(scanned)
    with gr.Row():
        model = gr.Dropdown(models, value=models[0], label="base model", allow_custom_value=True,
                            elem_id="eval-model")  # fmt: skip
        adapter = gr.Dropdown(["", *adapters], value="", label="adapter (empty: the base alone)",
                              allow_custom_value=True, elem_id="eval-adapter")  # fmt: skip
        data = gr.Dropdown(data_files, value=data_files[-1] if data_files else None, label="data",
                           allow_custom_value=True, elem_id="eval-data")  # fmt: skip
        max_length = gr.Number(1024, precision=0, label="max length (tokens)")
    run = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
    status = gr.HTML(elem_id="eval-status")
    scores = gr.HTML(elem_id="eval-scores")
    failures = gr.Checkbox(label="failures only", elem_id="eval-failures")
    rows = gr.Dataframe(headers=HEADERS, interactive=False, wrap=True, elem_id="eval-rows")
    examples = gr.State([])

    @guarded(status)
    def on_eval(model_text, adapter_text, data_text, length, only_failures):
        folder = Path(tempfile.mkdtemp(prefix="slimtune-ui-eval-"))
        args = eval_command(ctx, model_text, adapter_text, data_text, length, folder / "r.json")
        job = ctx.jobs.start("eval", [args])
        yield {scores: "", status: note(command_line(args))}
        yield from wait_for(job, status)
        if job.status() != "finished":
            return
        result = json.loads((folder / "r.json").read_text(encoding="utf-8"))
        found = result.get("examples", [])
        yield {scores: scores_html(result), examples: found,
               rows: table_rows(found, only_failures), status: note("evaluated")}  # fmt: skip

    def on_refresh(current: str | None = None):
        found = ctx.scan(fresh=True)
        names = ctx.root.adapter_choices(found)
        return (gr.Dropdown(choices=ctx.root.model_choices(found)),
                gr.Dropdown(choices=["", *names], value=current if current in names else ""),
                gr.Dropdown(choices=ctx.root.data_choices(found)))  # fmt: skip

    inputs = [model, adapter, data, max_length, failures]
    run.click(on_eval, inputs, [status, scores, rows, examples], api_name="eval_run")
    failures.change(table_rows, [examples, failures], rows)
    adapter.change(lambda a, m: base_of(ctx, a) or m, [adapter, model], model)
    return [(on_refresh, adapter, [model, adapter, data])]
