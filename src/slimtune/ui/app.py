"""The app: one page of tabs (Train, Runs, Chat, Export, Evaluate, Compare), served by Gradio.

    slimtune ui ─► check_host (loopback, or a password) ─► Context(root) ─► build(ctx)
                ─► Gradio on HOST:PORT; uploads capped; no files served from the root

Gradio serves only the files a handler returns (copied into its cache) and its uploads;
`allowed_paths` stays empty, so nothing under the root can be fetched by URL.
"""

from __future__ import annotations

import atexit
import html

import gradio as gr

from slimtune.ui import chat_tab, compare_tab, eval_tab, export_tab, runs_tab, train_tab
from slimtune.ui.common import Context
from slimtune.ui.security import password_check

CSS = """
.st-status { padding: 4px 8px; border-radius: 4px; }
.st-error { background: #fee2e2; color: #991b1b; }
.st-warn { background: #fef3c7; color: #92400e; }
.st-info { color: #1e3a8a; }
mark { background: #fde68a; }
"""
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # local fonts: the page fetches nothing


def build(ctx: Context) -> gr.Blocks:
    """The page. Each tab's build returns its refreshers, (fn, inputs, outputs) that
    re-list models, data, runs and adapters when the page loads and when the tab is opened."""
    with gr.Blocks(title="slimtune", analytics_enabled=False) as app:
        where = html.escape(str(ctx.root.path))
        gr.HTML(f"<h2>slimtune · fine-tune, watch, chat, export</h2><p>root: <code "
                f"title='{where}'>{html.escape(ctx.root.path.name)}/</code> (every path is "
                "inside it)</p>")  # fmt: skip
        with gr.Tabs():
            for name, module in (("Train", train_tab), ("Runs", runs_tab), ("Chat", chat_tab),
                                 ("Evaluate", eval_tab), ("Compare", compare_tab),
                                 ("Export", export_tab)):  # fmt: skip
                with gr.Tab(name, id=name.lower(), elem_id=f"tab-{name.lower()}") as tab:
                    refreshers = module.build(ctx)
                for fn, inputs, outputs in refreshers:
                    app.load(fn, inputs, outputs)
                    tab.select(fn, inputs, outputs)
    return app


def launch(ctx: Context, host: str, port: int, credentials: tuple[str, str] | None,
           block: bool = True):  # fmt: skip
    """Serve the app; returns (app, local URL) when block is False (tests)."""
    # transformers resolves its names lazily, and two handler threads resolving the same name
    # at once can fail with ImportError: resolve the ones the handlers use before serving
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    app = build(ctx)
    app.queue(default_concurrency_limit=4)
    atexit.register(ctx.jobs.stop_all)
    _, url, _ = app.launch(
        server_name=host, server_port=port, share=False, show_error=False, quiet=True,
        auth=password_check(credentials) if credentials else None,
        max_file_size=ctx.max_upload_mb * 2**20, allowed_paths=[], footer_links=[],
        prevent_thread_lock=not block, ssr_mode=False, mcp_server=False, pwa=False,
        theme=gr.themes.Default(font=FONTS, font_mono=["ui-monospace", "monospace"]), css=CSS,
    )  # fmt: skip
    return app, url
