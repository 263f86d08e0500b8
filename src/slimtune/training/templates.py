"""`--chat-template chatml|llama3|FILE.jinja`: a chat template for a model without one (a base
model), or instead of its own.

    --chat-template chatml   <|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\nyo<|im_end|>\\n
    --chat-template llama3   <bos><|start_header_id|>user<|end_header_id|>\\n\\nhi<|eot_id|>…
    --chat-template t.jinja  any Jinja template in transformers' format (messages,
                             add_generation_prompt, bos_token, eos_token)

The template renders every chat row (messages, Alpaca, ShareGPT, conversational) and is
saved beside the trained weights as RUN/adapter/chat_template.jinja, the file transformers
reads with a tokenizer. `slimtune merge` and `export` put it into the merged tokenizer (and
so into the GGUF and the Ollama Modelfile), `generate` and `eval` use it with --adapter.

A base model's tokenizer rarely knows the template's markers (<|im_end|>) as special tokens:
they are then ordinary text, and the loss still ends each assistant turn with the model's
own end token, so a trained model stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtune.atomic import write_text_atomic
from slimtune.errors import SlimtuneError

TEMPLATE_FILE = "chat_template.jinja"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
BUILTIN = {"chatml": CHATML, "llama3": LLAMA3}
SAMPLE = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
]


def read_chat_template(spec: str) -> str:
    """The Jinja text of a built-in name or a template file."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SlimtuneError(
            f"--chat-template {spec}: not chatml, llama3 or an existing .jinja file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SlimtuneError(f"--chat-template {spec}: cannot read it ({exc})") from None
    if not text.strip():
        raise SlimtuneError(f"--chat-template {spec}: the file is empty")
    return text


def use_chat_template(tokenizer, spec: str) -> str:
    """Give `tokenizer` the template `spec` names, after rendering a sample conversation."""
    template = read_chat_template(spec)
    try:
        tokenizer.apply_chat_template(SAMPLE, chat_template=template, tokenize=False)
    except Exception as exc:  # jinja2's TemplateError and whatever the template raises
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SlimtuneError(f"--chat-template {spec}: does not render ({message})") from None
    tokenizer.chat_template = template
    return template


def saving_chat_template(save_fn, template: str):
    """save_fn that also writes DIR/chat_template.jinja after the weights."""

    def save(model, directory: Path) -> Any:
        result = save_fn(model, directory)
        write_text_atomic(Path(directory) / TEMPLATE_FILE, template)
        return result

    return save


def adapter_chat_template(tokenizer, adapter_dir: str | Path | None) -> None:
    """Give `tokenizer` the template saved with an adapter (if it was trained with one)."""
    path = Path(adapter_dir) / TEMPLATE_FILE if adapter_dir else None
    if tokenizer is not None and path is not None and path.is_file():
        tokenizer.chat_template = path.read_text(encoding="utf-8")
