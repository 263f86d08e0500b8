"""The Train tab: model, data (with a preview), method and settings; Start, Stop, Resume;
the live loss curve, tokens/s and ETA of the run; "Show the command"."""

from __future__ import annotations

import time

import gradio as gr

from slimtune.methods.table import method_names
from slimtune.ui.common import Context, guarded, note, run_view, take_upload
from slimtune.ui.jobs import command_line
from slimtune.ui.paths import DATA_SUFFIXES, demo_data
from slimtune.ui.preview import preview
from slimtune.ui.train_form import (
    ADVANCED,
    CHOICES,
    MAIN,
    METHOD,
    as_yaml,
    default_of,
    resume_command,
    train_command,
)


def number_box(key: str, label: str, kind: type) -> gr.Number:
    return gr.Number(
        value=default_of(key),
        label=label,
        precision=0 if kind is int else None,
        elem_id=f"train-{key}",
    )


def default_out(method: str) -> str:
    return f"runs/{method or 'lora'}-{time.strftime('%m%d-%H%M%S')}"


def build(ctx: Context) -> list:
    scanned = ctx.scan()
    models, data_files = ctx.root.model_choices(scanned), ctx.root.data_choices(scanned)
    gr.Markdown(
        "Pick a model and data, then **Start**: the run is `slimtune train` in a child "
        f"process, writing a run directory under `{ctx.root.path.name}/`."
    )
    with gr.Row():
        model = gr.Dropdown(models, value=models[0], label="model", allow_custom_value=True,
                            info="built-in, a directory or a .gguf under the root", elem_id="train-model")  # fmt: skip
        data = gr.Dropdown(data_files, value=next(iter(demo_data())), label="data",
                           allow_custom_value=True, info="a .jsonl or .txt file under the root",
                           elem_id="train-data")  # fmt: skip
        upload = gr.UploadButton("Upload data", file_types=list(DATA_SUFFIXES), size="sm")
    with gr.Row():
        method = gr.Dropdown(
            list(method_names()), value="lora", label="method", elem_id="train-method"
        )
        out = gr.Textbox(default_out("lora"), label="run directory", elem_id="train-out")
        eval_data = gr.Dropdown(["", *data_files], value="", label="eval data (optional)",
                                allow_custom_value=True, elem_id="train-eval-data")  # fmt: skip
    data_format = gr.Markdown(elem_id="train-format")
    data_rows = gr.HTML(elem_id="train-preview")
    with gr.Row():
        main = [number_box(*spec) for spec in MAIN + METHOD]
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            advanced = [number_box(*spec) for spec in ADVANCED]
        with gr.Row():
            targets = gr.Textbox(label="target modules", placeholder="PEFT's default for the model")
            prompt_init = gr.Textbox(label="prompt init text (prompt)", placeholder="random")
            choices = [gr.Dropdown(["", *v], value="", label=k) for k, v in CHOICES.items()]
            overwrite = gr.Checkbox(label="overwrite the run directory")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
        resume = gr.Button("Resume", elem_id="train-resume")
        show = gr.Button("Show the command", elem_id="train-show")
    status = gr.HTML(elem_id="train-status")
    command = gr.Code(label="command and YAML", language="shell", elem_id="train-command")
    watched = gr.State("")
    live = gr.Markdown(elem_id="train-progress")
    chart = gr.HTML(elem_id="train-chart")
    with gr.Accordion("Output of the run", open=False):
        log = gr.Textbox(lines=8, show_label=False, elem_id="train-log")

    fields = [model, data, eval_data, method, out, *main, *advanced, targets, prompt_init,
              *choices, overwrite]  # fmt: skip
    names = ["model", "data", "eval_data", "method", "out",
             *(k for k, _, _ in MAIN + METHOD + ADVANCED), "target_modules", "prompt_init",
             *CHOICES, "overwrite"]  # fmt: skip

    def form(values) -> dict:
        return dict(zip(names, values, strict=True))

    @guarded(status)
    def on_show(*values):
        args, _ = train_command(ctx.root, form(values))
        text = (f"# run in {ctx.root.path}\n{command_line(args)}\n\n# or as run.yaml "
                f"(slimtune train --config run.yaml):\n{as_yaml(args)}")  # fmt: skip
        return {command: text, status: note("the command, checked")}

    @guarded(status)
    def on_start(*values):
        args, run = train_command(ctx.root, form(values))
        job = ctx.jobs.start("train", [args], target=run)
        return {watched: ctx.root.relative(run), status: note(f"started: {command_line(args)}"),
                command: command_line(job.commands[0])}  # fmt: skip

    @guarded(status)
    def on_stop(run_text):
        job = ctx.jobs.for_target(ctx.root.resolve(run_text, "run")) if run_text else None
        if job is None or not job.running:
            return {status: note("no run of this page is running", "warn")}
        job.stop()
        return {status: note("stopped: the last checkpoint is kept; Resume continues from it")}

    @guarded(status)
    def on_resume(run_text):
        args, run = resume_command(ctx.root, run_text or "")
        ctx.jobs.start("train", [args], target=run)
        return {watched: ctx.root.relative(run), status: note(f"resumed: {command_line(args)}")}

    asked: dict[str, int] = {}  # session -> number of its latest preview request

    @guarded(status)
    def on_data(model_text, data_text, max_length, request: gr.Request):
        session = getattr(request, "session_hash", None) or ""
        mine = asked[session] = asked.get(session, 0) + 1
        if not data_text:
            return {data_format: "", data_rows: ""}
        line, rows = preview(ctx.root.model(model_text), ctx.root.data(data_text, copy=False),
                             int(max_length or default_of("max_length")))  # fmt: skip
        if asked[session] != mine:  # a newer choice was made meanwhile: its preview wins
            return {}
        return {data_format: line, data_rows: rows, status: ""}

    @guarded(status)
    def on_upload(file):
        path = take_upload(ctx, file, DATA_SUFFIXES)
        rel = ctx.root.relative(path)
        return {data: gr.Dropdown(choices=ctx.root.data_choices(ctx.scan(fresh=True)), value=rel),
                status: note(f"uploaded to {rel}")}  # fmt: skip

    def on_tick(run_text):
        try:
            line, svg, lines = run_view(ctx, run_text)
        except Exception:  # a run directory removed meanwhile: show nothing new
            return gr.skip(), gr.skip(), gr.skip()
        return line, svg, lines

    outputs = [command, status, watched, data_format, data_rows, data]
    show.click(on_show, fields, outputs, api_name="train_show")
    start.click(on_start, fields, outputs, api_name="train_start")
    stop.click(on_stop, watched, outputs, api_name="train_stop")
    resume.click(on_resume, watched, outputs, api_name="train_resume")
    max_length = main[[k for k, _, _ in MAIN + METHOD].index("max_length")]
    data.change(on_data, [model, data, max_length], outputs)
    model.change(on_data, [model, data, max_length], outputs)
    upload.upload(on_upload, upload, outputs, api_name="train_upload")
    method.change(lambda m: default_out(m), method, out)
    gr.Timer(1.0).tick(on_tick, watched, [live, chart, log])

    def on_load():
        found = ctx.scan(fresh=True)
        files = ctx.root.data_choices(found)
        return (gr.Dropdown(choices=ctx.root.model_choices(found)), gr.Dropdown(choices=files),
                gr.Dropdown(choices=["", *files]))  # fmt: skip

    # the preview of the default data shows on arrival, not only after a change
    return [(on_load, None, [model, data, eval_data]),
            (on_data, [model, data, max_length], outputs)]  # fmt: skip
