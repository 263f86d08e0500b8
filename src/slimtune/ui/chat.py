"""The Chat tab: the base model and the base + adapter answer the same prompt side by side.

    prompt ─┬─► base model ─────────────► text, streamed ─► left box
            └─► base model + adapter ───► text, streamed ─► right box

Each side generates in its own thread (slimtune.evaluate.generate with a stream callback);
the page's generator yields both texts as pieces arrive. Loaded models stay in a small
cache, so switching between a few adapters does not reload the base each time.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from slimtune.errors import SlimtuneError

CACHE_SIZE = 3


def load_for_chat(model_spec: str, adapter: Path | None):
    """(model, tokenizer) as `slimtune eval`/`generate` load them: the base quantized as the
    adapter was trained on, on the GPU when there is one, the adapter and its chat template."""
    from slimtune.evaluate import load_for_inference

    return load_for_inference(model_spec, None if adapter is None else str(adapter))


class ModelCache:
    """The last few (model, adapter) pairs loaded, least recently used dropped first."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self.loaded: OrderedDict[tuple[str, str | None], tuple] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, model_spec: str, adapter: Path | None):
        key = (model_spec, str(adapter) if adapter else None)
        with self.lock:
            if key in self.loaded:
                self.loaded.move_to_end(key)
                return self.loaded[key]
            pair = load_for_chat(model_spec, adapter)
            self.loaded[key] = pair
            while len(self.loaded) > self.size:
                self.loaded.popitem(last=False)
            return pair


def check_settings(temperature: float | None, max_tokens: float | None) -> tuple[float, int]:
    temperature = 0.0 if temperature is None else float(temperature)
    if temperature < 0:
        raise SlimtuneError(f"--temperature {temperature} is not accepted: a number >= 0")
    if max_tokens is None or int(max_tokens) <= 0 or int(max_tokens) != max_tokens:
        raise SlimtuneError(f"--max-new-tokens {max_tokens} is not accepted: an integer > 0")
    return temperature, int(max_tokens)


def stream_side_by_side(
    pairs: list[tuple], prompt: str, temperature: float, max_tokens: int
) -> Iterator[list[str]]:
    """Yield the texts of every (model, tokenizer) as they grow, until all are done."""
    from slimtune.evaluate import generate

    pieces: queue.Queue = queue.Queue()
    texts = [""] * len(pairs)
    failures: list[BaseException] = []

    def work(index: int, model, tokenizer) -> None:
        try:
            generate(
                model, tokenizer, prompt, max_new_tokens=max_tokens, temperature=temperature,
                stream=lambda text: pieces.put((index, text)),
            )  # fmt: skip
        except BaseException as exc:  # shown on the page; the server carries on
            failures.append(exc)
        finally:
            pieces.put((index, None))

    threads = [threading.Thread(target=work, args=(i, *pair), daemon=True)
               for i, pair in enumerate(pairs)]  # fmt: skip
    for thread in threads:
        thread.start()
    running = len(threads)
    while running:
        index, text = pieces.get()
        if text is None:
            running -= 1
        else:
            texts[index] += text
        yield list(texts)
    if failures:
        raise failures[0]
