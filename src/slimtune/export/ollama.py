"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE (Go), SYSTEM and stop tokens.

Ollama does not run Jinja chat templates; it wants a Go template over `.Messages`. Rather than
keep a list of known formats, the model's own Jinja template is rendered (by transformers'
renderer) on conversations whose contents are markers, and the text around the markers is what
each turn writes:

    R([user U1, assistant A1, user U2] + generation prompt)
      = D  P_user U1 S_user  P_asst A1 S_asst  P_user U2 S_user  G

(D: a default system turn the template writes when none is given; it becomes SYSTEM, which
Ollama sends as the first message). A system message is either its own turn (ChatML, Llama 3,
Phi-3: P_sys S S_sys) or folded into the first user message (Llama 2's <<SYS>>, Gemma 3: P_user
PRE S SEP U1); a template that refuses system messages gets them sent as user turns (what
Ollama's own Gemma 2 template does). The Go template then spells those strings out:

    {{- range .Messages }}{{ if eq .Role "user" }}P_user{{ .Content }}S_user{{ else if ... }}
    {{ end }}G

A leading BOS the template writes is dropped: llama.cpp adds it (tokenizer.ggml.add_bos_token).
The stop tokens are the end of an assistant turn, the start of a user turn and the EOS token.
`ollama create NAME -f Modelfile` then builds the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

U1, A1, U2, SYS = "\x01U1\x01", "\x01A1\x01", "\x01U2\x01", "\x01SYS\x01"
BOS = (
    "\x01BOS\x01"  # rendered in place of bos_token, to tell it from the same text written literally
)


@dataclass(frozen=True)
class ChatTurns:
    """The literal text around each message, as the Jinja template writes it."""

    user: tuple[str, str]  # (P_user, S_user)
    assistant: tuple[str, str]  # (P_asst, S_asst)
    generation: str  # G: what opens the assistant's answer
    system: tuple[str, str] | None  # (P_sys, S_sys) when system is its own turn
    folded: tuple[str, str] | None  # (PRE, SEP) when folded into the first user message
    default_system: str | None  # written when the conversation has no system message
    bos: str = ""  # the BOS that P_user starts with after the first turn (Llama 2), else ""


class NotAChatTemplate(ValueError):
    """The template does not render turns as prefix + content + suffix."""


def _render(jinja: str, messages: list[dict], gen: bool, bos: str, eos: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=jinja,
        add_generation_prompt=gen,
        bos_token=bos,
        eos_token=eos,
    )
    return rendered[0]


def _cut(text: str, *markers: str) -> list[str]:
    """The pieces between markers, in order; NotAChatTemplate if one is missing."""
    pieces = []
    for marker in markers:
        if marker not in text:
            raise NotAChatTemplate(marker)
        head, text = text.split(marker, 1)
        pieces.append(head)
    return [*pieces, text]


def _turn_end(last: str, inside: str, eos: str) -> str:
    """How a turn ends: what follows it when it is last, less an EOS that the template writes
    only at the very end of a conversation (Phi-3) and not between turns."""
    if not inside.startswith(last) and eos and last.endswith(eos):
        return last[: len(last) - len(eos)]
    return last


def _strip_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise NotAChatTemplate(prefix)
    return text[len(prefix) :]


def chat_turns(jinja: str, bos: str = "", eos: str = "", add_bos: bool = True) -> ChatTurns:
    """What each turn of `jinja` writes around its content (see the module docstring).

    Args:
        jinja: the chat template.
        bos, eos: the tokenizer's BOS and EOS text.
        add_bos: whether llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token); then a BOS the
            template writes at the very start is dropped.
    """

    def user(text: str) -> dict:
        return {"role": "user", "content": text}

    render = lambda messages, gen: _render(jinja, messages, gen, BOS, eos)  # noqa: E731
    assistant = {"role": "assistant", "content": A1}
    x0, x1, x2, x3 = _cut(render([user(U1), assistant, user(U2)], True), U1, A1, U2)
    s_user = _turn_end(_cut(render([user(U1)], False), U1)[1], x1, eos)
    s_asst = _turn_end(_cut(render([user(U1), assistant], False), U1, A1)[2], x2, eos)
    p_asst, gen = _strip_prefix(x1, s_user), _strip_prefix(x3, s_user)
    p_user = _strip_prefix(x2, s_asst)

    def lead(text: str) -> str:  # the prompt's first BOS is llama.cpp's to add
        at_start = add_bos and text.startswith(BOS) and not p_user.startswith(BOS)
        return text[len(BOS) :] if at_start else text

    x0 = lead(x0)
    if not x0.endswith(p_user):
        raise NotAChatTemplate(p_user)
    default_seg = x0[: len(x0) - len(p_user)]
    system = folded = default = None
    try:
        y0, y1, y3 = _cut(render([{"role": "system", "content": SYS}, user(U1)], True), SYS, U1)
        y0 = lead(y0)
    except Exception:  # the template raises on system messages (Gemma 2), or drops them
        y0 = y1 = y3 = None
    if y0 is not None and y3 == x3 and y1.endswith(p_user):
        system = (y0, y1[: len(y1) - len(p_user)])
        p_sys, s_sys = system
        if default_seg.startswith(p_sys) and default_seg.endswith(s_sys) and default_seg:
            default = default_seg[len(p_sys) : len(default_seg) - len(s_sys)]
    elif y0 is not None and y3 == x3 and y0.startswith(p_user):
        folded = (y0[len(p_user) :], y1)
    turn_bos = bos if p_user.startswith(BOS) else ""
    spell = lambda pair: None if pair is None else tuple(x.replace(BOS, bos) for x in pair)  # noqa: E731
    return ChatTurns(
        spell((p_user, s_user)),
        spell((p_asst, s_asst)),
        gen.replace(BOS, bos),
        spell(system),
        spell(folded),
        default,
        turn_bos,
    )


def go_template(turns: ChatTurns) -> str:
    """The Ollama (Go text/template) spelling of `turns`."""
    (p_user, s_user), (p_asst, s_asst) = turns.user, turns.assistant
    head = '{{- $system := "" }}' if turns.folded else ""
    user_open = _lit(p_user)
    if turns.bos:  # every user turn but the prompt's first opens with BOS (Llama 2)
        head += '{{- $bos := "" }}'
        user_open = (
            f"{{{{ $bos }}}}{_lit(p_user[len(turns.bos) :])}{{{{ $bos = {_go_str(turns.bos)} }}}}"
        )
    if turns.system is not None:
        system = f"{_lit(turns.system[0])}{{{{ .Content }}}}{_lit(turns.system[1])}"
    elif turns.folded is not None:
        system = "{{ $system = .Content }}"
    else:  # refused by the template: sent as a user turn
        system = f"{user_open}{{{{ .Content }}}}{_lit(s_user)}"
    content = "{{ .Content }}"
    if turns.folded is not None:
        pre, sep = turns.folded
        content = (
            f'{{{{ if $system }}}}{_lit(pre)}{{{{ $system }}}}{_lit(sep)}{{{{ $system = "" }}}}'
            "{{ end }}{{ .Content }}"
        )
    return (
        f'{head}{{{{- range .Messages }}}}{{{{ if eq .Role "system" }}}}{system}'
        f'{{{{ else if eq .Role "user" }}}}{user_open}{content}{_lit(s_user)}'
        f'{{{{ else if eq .Role "assistant" }}}}{_lit(p_asst)}{{{{ .Content }}}}{_lit(s_asst)}'
        f"{{{{ end }}}}{{{{ end }}}}{_lit(turns.generation)}"
    )


def _go_str(text: str) -> str:
    """A Go string literal."""
    import json

    return json.dumps(text)


def _lit(text: str) -> str:
    """Literal text inside a Go template ('{{' would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def stop_tokens(turns: ChatTurns, eos: str | None) -> list[str]:
    """End of an assistant turn, start of a user turn, EOS: where generation should stop."""
    candidates = [turns.assistant[1].strip(), turns.user[0].strip().split("\n")[0], eos or ""]
    return list(dict.fromkeys(c for c in candidates if c))


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(
    gguf_ref: str,
    jinja: str | None,
    eos_token: str | None,
    say: Callable[[str], None] = print,
    bos_token: str | None = None,
    add_bos: bool = True,
) -> str:
    """The text of a Modelfile for the GGUF at `gguf_ref` (a path relative to the Modelfile)."""
    lines = [f"FROM {gguf_ref}"]
    try:
        turns = chat_turns(jinja or "", bos_token or "", eos_token or "", add_bos)
    except Exception:  # no template, or one that is not prefix + content + suffix per turn
        say("Modelfile: no TEMPLATE line (no usable chat template); Ollama will send prompts raw")
        stops = [eos_token] if eos_token else []
    else:
        lines.append(f"TEMPLATE {_quote(go_template(turns))}")
        if turns.default_system:
            lines.append(f"SYSTEM {_quote(turns.default_system)}")
        stops = stop_tokens(turns, eos_token)
        if turns.system is None and turns.folded is None:
            say("Modelfile: the chat template refuses system messages; they are sent as user turns")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
