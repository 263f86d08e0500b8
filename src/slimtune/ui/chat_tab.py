"""The Chat tab: base and base + adapter side by side, streaming; temperature, max tokens."""

from __future__ import annotations

import gradio as gr

from slimtune.errors import SlimtuneError
from slimtune.models import resolve_model_path
from slimtune.ui.chat import check_settings, stream_side_by_side
from slimtune.ui.common import Context, base_of, guarded, note


def adapter_path(ctx: Context, text: str | None):
    if not text:
        return None
    path = ctx.root.resolve(text, "adapter")
    if not (path / "adapter_config.json").is_file():
        raise SlimtuneError(f"adapter {text!r} has no adapter_config.json (give RUN/adapter)")
    return path


def build(ctx: Context) -> list:
    scanned = ctx.scan()
    models, adapters = ctx.root.model_choices(scanned), ctx.root.adapter_choices(scanned)
    with gr.Row():
        model = gr.Dropdown(models, value=models[0], label="base model", allow_custom_value=True,
                            elem_id="chat-model")  # fmt: skip
        adapter = gr.Dropdown(adapters, value=adapters[0] if adapters else None, label="adapter",
                              allow_custom_value=True, elem_id="chat-adapter")  # fmt: skip
        refresh = gr.Button("Refresh lists", size="sm")
    with gr.Row():
        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)")
        max_tokens = gr.Number(128, precision=0, label="max new tokens", elem_id="chat-max-tokens")
    prompt = gr.Textbox(label="prompt", lines=2, elem_id="chat-prompt",
                        value="Meet Ada Stone: a 41-year-old welder from Perth.")  # fmt: skip
    send = gr.Button("Send", variant="primary", elem_id="chat-send")
    status = gr.HTML(elem_id="chat-status")
    with gr.Row():
        base_out = gr.Textbox(label="base model", lines=8, elem_id="chat-base")
        tuned_out = gr.Textbox(label="base + adapter", lines=8, elem_id="chat-tuned")

    @guarded(status)
    def on_send(model_text, adapter_text, prompt_text, temp, tokens):
        spec = ctx.root.model(model_text)
        resolve_model_path(spec)
        adapter_dir = adapter_path(ctx, adapter_text)
        temp, tokens = check_settings(temp, tokens)
        if not (prompt_text or "").strip():
            raise SlimtuneError("write a prompt first")
        yield {status: note("loading the models …"), base_out: "", tuned_out: ""}
        pairs = [ctx.models.get(spec, None)]
        if adapter_dir is not None:
            pairs.append(ctx.models.get(spec, adapter_dir))
        yield {status: note("generating …")}
        for texts in stream_side_by_side(pairs, prompt_text, temp, tokens):
            yield {base_out: texts[0], tuned_out: texts[1] if len(texts) > 1 else "(no adapter)"}
        yield {status: note("done")}

    def on_refresh(current: str | None = None):
        """New lists; the adapter kept if still there, else the newest (the run just trained)."""
        found = ctx.scan(fresh=True)
        adapters = ctx.root.adapter_choices(found)
        value = current if current in adapters else (adapters[0] if adapters else None)
        return (gr.Dropdown(choices=ctx.root.model_choices(found)),
                gr.Dropdown(choices=adapters, value=value))  # fmt: skip

    send.click(on_send, [model, adapter, prompt, temperature, max_tokens],
               [status, base_out, tuned_out], api_name="chat_send")  # fmt: skip
    prompt.submit(on_send, [model, adapter, prompt, temperature, max_tokens],
                  [status, base_out, tuned_out])  # fmt: skip
    adapter.change(lambda a, m: base_of(ctx, a) or m, [adapter, model], model)
    refresh.click(on_refresh, adapter, [model, adapter])
    return [(on_refresh, adapter, [model, adapter])]
