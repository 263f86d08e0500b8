"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE, SYSTEM and stop tokens.

Ollama does not run Jinja chat templates; it wants a Go template over `.Messages`. The common
chat formats are recognised from the markers their Jinja template writes and translated:

    ChatML (SmolLM2, Qwen2):  <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n
    Llama 3:                  <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>

A default system prompt written literally into the Jinja template (SmolLM2 has one) becomes
SYSTEM. Any other template gets no TEMPLATE line (Ollama then sends the raw prompt), said once.
`ollama create NAME -f Modelfile` then builds the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    name: str
    markers: tuple[str, ...]  # all present in the Jinja template -> this format
    template: str  # Ollama Go template
    stops: tuple[str, ...]
    system: str  # regex for a literal default system prompt in the Jinja template


CHATML = ChatFormat(
    name="ChatML",
    markers=("<|im_start|>", "<|im_end|>"),
    template=(
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    stops=("<|im_start|>", "<|im_end|>"),
    system=r"<\|im_start\|>system(?:\\n|\n)([^'\"{}]+?)<\|im_end\|>",
)
LLAMA3 = ChatFormat(
    name="Llama 3",
    markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    template=(
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    stops=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    system=r"<\|start_header_id\|>system<\|end_header_id\|>(?:\\n|\n)+([^'\"{}]+?)<\|eot_id\|>",
)
FORMATS = (CHATML, LLAMA3)


def chat_format(jinja: str | None) -> ChatFormat | None:
    """The chat format a Jinja chat template writes, or None."""
    if not jinja:
        return None
    return next((f for f in FORMATS if all(m in jinja for m in f.markers)), None)


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(
    gguf_ref: str, jinja: str | None, eos_token: str | None, say: Callable[[str], None] = print
) -> str:
    """The text of a Modelfile for the GGUF at `gguf_ref` (a path relative to the Modelfile)."""
    fmt = chat_format(jinja)
    lines = [f"FROM {gguf_ref}"]
    stops: list[str] = []
    if fmt is None:
        say(
            "Modelfile: the chat template is not ChatML or Llama 3, so it has no TEMPLATE line; "
            "Ollama will send prompts raw"
        )
    else:
        lines.append(f"TEMPLATE {_quote(fmt.template)}")
        system = re.search(fmt.system, jinja or "")
        if system:
            lines.append(f"SYSTEM {_quote(system.group(1))}")
        stops += fmt.stops
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
