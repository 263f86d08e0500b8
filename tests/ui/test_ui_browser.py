"""The app in a real browser: Debian's headless Chromium driven by Playwright.

`slimtune ui` serves a root holding a tiny model and a data file; the test picks them,
starts a 3-step run and watches the loss curve get its points, chats with the adapter and
sees the text stream, exports a GGUF (+ Modelfile), tries a path outside the root and
sees the refusal, and takes a screenshot of each tab (into $SLIMTUNE_UI_SCREENSHOTS,
`make test-browser` sets docs/ui). Run it with `make test-browser`.
"""

from __future__ import annotations

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


def wait_until(check, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


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
    wait_until(lambda: "started" in page.locator("#train-status").inner_text(), 30, "the start")
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
    export_gguf(page, root, run, tmp_path)
    refuse_outside(page, root, tmp_path)
