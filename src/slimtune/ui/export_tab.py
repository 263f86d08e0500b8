"""The Export tab: merged safetensors, GGUF (+ Ollama Modelfile) and GGUF-LoRA files into a
directory under the root, with their sizes and the command that runs each.

Each format is one `slimtune export` child process, run one after another:

    merged safetensors   OUT/merged/       slimtune generate --model OUT/merged …
    GGUF (dtype)         OUT/model.gguf    llama-cli -m OUT/model.gguf
                         OUT/Modelfile     ollama create NAME -f OUT/Modelfile
    GGUF LoRA            OUT/adapter.gguf  llama-cli -m BASE.gguf --lora OUT/adapter.gguf
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from slimtune.errors import SlimtuneError
from slimtune.models import resolve_model_path
from slimtune.ui.chat_tab import adapter_path
from slimtune.ui.common import Context, base_of, guarded, note, wait_for
from slimtune.ui.jobs import command_line
from slimtune.ui.train_form import shown

FORMATS = {"merged safetensors": "safetensors", "GGUF + Ollama Modelfile": "gguf",
           "GGUF LoRA (adapter only)": "gguf-lora"}  # fmt: skip
DTYPES = ("f16", "f32", "bf16", "q8_0")


def export_commands(ctx: Context, model_text, adapter_text, formats, dtype, out_text,
                    overwrite) -> tuple[list[list[str]], Path]:  # fmt: skip
    """The `slimtune export` arguments of each chosen format, checked first."""
    spec = ctx.root.model(model_text)
    resolve_model_path(spec)
    adapter = adapter_path(ctx, adapter_text)
    out = ctx.root.resolve(out_text, "output directory")
    if not formats:
        raise SlimtuneError("choose at least one format")
    if dtype not in DTYPES:
        raise SlimtuneError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    model_arg = shown(ctx.root, Path(spec)) if Path(spec).is_absolute() else spec
    head = ["export", "--model", model_arg]
    if adapter is not None:
        head += ["--adapter", shown(ctx.root, adapter)]
    commands = []
    for label in formats:
        fmt = FORMATS.get(label)
        if fmt is None:
            raise SlimtuneError(f"format {label!r}: one of {', '.join(FORMATS)}")
        if fmt == "gguf-lora" and adapter is None:
            raise SlimtuneError("GGUF LoRA exports an adapter: choose one")
        target = out / "merged" if fmt == "safetensors" else out
        args = [*head, "--format", fmt, "--out", shown(ctx.root, target)]
        if fmt != "safetensors":
            args += ["--dtype", dtype]
        commands.append(args + (["--overwrite"] if overwrite else []))
    return commands, out


def how_to_run(ctx: Context, out: Path) -> str:
    rel = shown(ctx.root, out)
    lines = []
    if (out / "merged").is_dir():
        lines.append(f'slimtune generate --model {rel}/merged --prompt "Hello"')
    if (out / "model.gguf").is_file():
        lines.append(f"llama-cli -m {rel}/model.gguf -cnv")
    if (out / "Modelfile").is_file():
        lines.append(f"ollama create {out.name} -f {rel}/Modelfile && ollama run {out.name}")
    if (out / "adapter.gguf").is_file():
        lines.append(f"llama-cli -m BASE.gguf --lora {rel}/adapter.gguf -cnv")
    return "\n".join(lines)


def human_size(size: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return ""


def sizes_html(ctx: Context, out: Path) -> str:
    rows = []
    for path in sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        rows.append(f"<tr><td>{html.escape(ctx.root.relative(path))}</td>"
                    f"<td style='text-align:right'>{human_size(size)}</td></tr>")  # fmt: skip
    return f"<table class='export-files'><tr><th>file</th><th>size</th></tr>{''.join(rows)}</table>"


def build(ctx: Context) -> list:
    scanned = ctx.scan()
    models, adapters = ctx.root.model_choices(scanned), ctx.root.adapter_choices(scanned)
    with gr.Row():
        model = gr.Dropdown(models, value=models[0], label="base model", allow_custom_value=True,
                            elem_id="export-model")  # fmt: skip
        adapter = gr.Dropdown(["", *adapters], value=adapters[0] if adapters else "",
                              label="adapter (empty: the base alone)", allow_custom_value=True,
                              elem_id="export-adapter")  # fmt: skip
        refresh = gr.Button("Refresh lists", size="sm")
    with gr.Row():
        formats = gr.CheckboxGroup(list(FORMATS), value=["GGUF + Ollama Modelfile"], label="formats",
                                   elem_id="export-formats")  # fmt: skip
        dtype = gr.Dropdown(list(DTYPES), value="f16", label="GGUF dtype", elem_id="export-dtype")
    with gr.Row():
        out = gr.Textbox("exports/model", label="output directory", elem_id="export-out")
        overwrite = gr.Checkbox(label="overwrite files already there")
    run = gr.Button("Export", variant="primary", elem_id="export-run")
    status = gr.HTML(elem_id="export-status")
    files = gr.HTML(elem_id="export-files")
    commands = gr.Code(label="commands", language="shell", elem_id="export-commands")

    @guarded(status)
    def on_export(*values):
        planned, target = export_commands(ctx, *values)
        job = ctx.jobs.start("export", planned, target=target)
        yield {commands: "\n".join(command_line(a) for a in planned), files: ""}
        yield from wait_for(job, status)
        if job.status() == "finished":
            yield {status: note(f"exported to {ctx.root.relative(target)}"),
                   files: sizes_html(ctx, target),
                   commands: "# made with\n" + "\n".join(command_line(a) for a in planned)
                   + "\n# run it\n" + how_to_run(ctx, target)}  # fmt: skip

    def on_adapter(text, model_text):
        name = (
            Path(text).parent.name
            if text and Path(text).name == "adapter"
            else Path(text or "model").name
        )
        return f"exports/{name}", base_of(ctx, text) or model_text

    def on_refresh(current: str | None = None):
        """New lists; the adapter kept if still there, else the newest (the run just trained)."""
        found = ctx.scan(fresh=True)
        adapters = ctx.root.adapter_choices(found)
        value = current if current in adapters else (adapters[0] if adapters else "")
        return (gr.Dropdown(choices=ctx.root.model_choices(found)),
                gr.Dropdown(choices=["", *adapters], value=value))  # fmt: skip

    inputs = [model, adapter, formats, dtype, out, overwrite]
    run.click(on_export, inputs, [status, files, commands], api_name="export_run")
    adapter.change(on_adapter, [adapter, model], [out, model])
    refresh.click(on_refresh, adapter, [model, adapter])
    return [(on_refresh, adapter, [model, adapter])]
