"""The Runs tab: every run directory under the root (command-line runs too), its status;
open one to watch it live, resume it or stop it."""

from __future__ import annotations

import gradio as gr

from slimtune.ui.common import Context, guarded, note, run_view
from slimtune.ui.runs import runs_table
from slimtune.ui.train_form import resume_command

HEADERS = ["run", "status", "method", "model", "step", "loss"]


def build(ctx: Context) -> list:
    def rows():
        found = ctx.scan(fresh=True)["runs"]
        return runs_table(ctx.root.path, found, ctx.jobs.for_target) or [[""] * len(HEADERS)]

    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
    table = gr.Dataframe(rows(), headers=HEADERS, interactive=False, elem_id="runs-table")
    with gr.Row():
        chosen = gr.Dropdown(ctx.scan()["runs"], label="run", allow_custom_value=True,
                             elem_id="runs-chosen")  # fmt: skip
        open_run = gr.Button("Open", elem_id="runs-open")
        resume = gr.Button("Resume", elem_id="runs-resume")
        stop = gr.Button("Stop", variant="stop", elem_id="runs-stop")
    status = gr.HTML(elem_id="runs-status")
    watched = gr.State("")
    live = gr.Markdown(elem_id="runs-progress")
    chart = gr.HTML(elem_id="runs-chart")
    log = gr.Textbox(lines=6, label="output of the run (when started here)", elem_id="runs-log")

    def on_refresh():
        return {table: rows(), chosen: gr.Dropdown(choices=ctx.scan()["runs"])}

    @guarded(status)
    def on_open(run_text):
        run = ctx.root.resolve(run_text, "run")
        if not (run / "config.yaml").is_file():
            return {status: note(f"{run_text} is not a run directory (no config.yaml)", "error")}
        return {watched: ctx.root.relative(run), status: note(f"watching {ctx.root.relative(run)}")}

    @guarded(status)
    def on_resume(run_text):
        args, run = resume_command(ctx.root, run_text or "")
        ctx.jobs.start("train", [args], target=run)
        return {watched: ctx.root.relative(run), status: note("resumed")}

    @guarded(status)
    def on_stop(run_text):
        job = ctx.jobs.for_target(ctx.root.resolve(run_text, "run"))
        if job is None or not job.running:
            return {status: note("this run is not running from this app", "warn")}
        job.stop()
        return {status: note("stopped: the last checkpoint is kept")}

    def on_select(evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        found = ctx.scan()["runs"]
        return found[row] if 0 <= row < len(found) else gr.skip()

    def on_tick(run_text):
        if not run_text:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            return run_view(ctx, run_text)
        except Exception:
            return gr.skip(), gr.skip(), gr.skip()

    outputs = [table, chosen, status, watched]
    refresh.click(on_refresh, None, outputs)
    open_run.click(on_open, chosen, outputs)
    resume.click(on_resume, chosen, outputs)
    stop.click(on_stop, chosen, outputs)
    table.select(on_select, None, chosen)
    gr.Timer(2.0).tick(on_tick, watched, [live, chart, log])
    return [(on_refresh, None, [table, chosen])]
