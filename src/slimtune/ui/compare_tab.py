"""The Compare tab: `slimtune compare` on the chosen methods, then its table and charts.

The comparison trains, so it takes the training slot: it waits for no run and no run
starts while it goes (one at a time, as on the Train tab).
"""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from slimtune.errors import SlimtuneError
from slimtune.methods.table import method_names
from slimtune.models import resolve_model_path
from slimtune.ui.common import Context, guarded, note, wait_for
from slimtune.ui.jobs import command_line
from slimtune.ui.train_form import shown


def compare_command(ctx: Context, model_text, data_text, methods, steps, out_text, overwrite):
    spec = ctx.root.model(model_text)
    resolve_model_path(spec)
    data = ctx.root.data(data_text)
    out = ctx.root.resolve(out_text, "output directory")
    unknown = [m for m in methods or [] if m not in method_names()]
    if not methods or unknown:
        raise SlimtuneError(f"--methods: choose among {', '.join(method_names())}")
    if steps is None or int(steps) <= 0 or int(steps) != steps:
        raise SlimtuneError(f"--max-steps {steps} is not accepted: an integer > 0")
    model_arg = shown(ctx.root, Path(spec)) if Path(spec).is_absolute() else spec
    args = ["compare", "--model", model_arg, "--data", shown(ctx.root, data), "--methods",
            ",".join(methods), "--max-steps", str(int(steps)), "--out", shown(ctx.root, out)]  # fmt: skip
    return args + (["--overwrite"] if overwrite else []), out


def report_parts(out: Path) -> tuple[str, list]:
    """(report.md without its image lines, the charts as images)."""
    from PIL import Image

    text = (out / "report.md").read_text(encoding="utf-8") if (out / "report.md").is_file() else ""
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)\n?", "", text)
    charts = [(Image.open(p), p.stem) for p in sorted(out.glob("*.png"))]
    return text, charts


def build(ctx: Context) -> list:
    scanned = ctx.scan()
    models, data_files = ctx.root.model_choices(scanned), ctx.root.data_choices(scanned)
    with gr.Row():
        model = gr.Dropdown(models, value=models[0], label="model", allow_custom_value=True,
                            elem_id="compare-model")  # fmt: skip
        data = gr.Dropdown(data_files, value=data_files[0] if data_files else None, label="data",
                           allow_custom_value=True, elem_id="compare-data")  # fmt: skip
    with gr.Row():
        methods = gr.CheckboxGroup(list(method_names()), value=["lora", "ia3"], label="methods",
                                   elem_id="compare-methods")  # fmt: skip
        steps = gr.Number(40, precision=0, label="steps per method", elem_id="compare-steps")
        out = gr.Textbox("compare/report", label="output directory", elem_id="compare-out")
        overwrite = gr.Checkbox(label="overwrite a report already there")
    run = gr.Button("Compare", variant="primary", elem_id="compare-run")
    status = gr.HTML(elem_id="compare-status")
    report = gr.Markdown(elem_id="compare-report")
    charts = gr.Gallery(label="charts", columns=3, height=420, object_fit="contain",
                        elem_id="compare-charts")  # fmt: skip

    @guarded(status)
    def on_compare(*values):
        args, target = compare_command(ctx, *values)
        job = ctx.jobs.start("compare", [args], target=target)
        yield {status: note(command_line(args)), report: "", charts: []}
        yield from wait_for(job, status, every=1.0)
        if job.status() == "finished":
            text, images = report_parts(target)
            yield {report: text, charts: images, status: note(f"report: {shown(ctx.root, target)}")}

    def on_refresh():
        found = ctx.scan(fresh=True)
        return (gr.Dropdown(choices=ctx.root.model_choices(found)),
                gr.Dropdown(choices=ctx.root.data_choices(found)))  # fmt: skip

    inputs = [model, data, methods, steps, out, overwrite]
    run.click(on_compare, inputs, [status, report, charts], api_name="compare_run")
    return [(on_refresh, None, [model, data])]
