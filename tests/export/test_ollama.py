"""ollama.py: the Modelfile's Go template renders every conversation as the Jinja template does.

Reference: the chat templates of the families (as their model repositories ship them, cut to
what the turns need) rendered by transformers' own Jinja renderer, against Go's text/template
(what Ollama executes) running our TEMPLATE, with Ollama's rule that the Modelfile's SYSTEM is
sent as the first message when the conversation has none. The Go side needs the `go` tool
(Debian: golang-go) and is skipped without it.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from export_helpers import CHAT_TEMPLATE, GEMMA_TEMPLATE, MISTRAL_TEMPLATE, PHI3_TEMPLATE, SYSTEM
from slimtune.export.ollama import _render, chat_turns, go_template, modelfile, stop_tokens

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
LLAMA2 = (  # meta-llama/Llama-2-7b-chat-hf: <<SYS>> inside the first [INST], BOS on every turn
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
GEMMA2 = (  # refuses system messages
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}" + GEMMA_TEMPLATE
)
GEMMA3 = (  # folds the system message into the first user turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
TEMPLATES = {  # name -> (jinja, bos, eos, system messages allowed); SmolLM2 adds no BOS
    "chatml": (CHAT_TEMPLATE, "<|im_start|>", "<|im_end|>", True),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True),
    "llama2": (LLAMA2, "<s>", "</s>", True),
    "mistral": (MISTRAL_TEMPLATE, "<s>", "</s>", False),
    "gemma2": (GEMMA2, "<bos>", "<eos>", False),
    "gemma3": (GEMMA3, "<bos>", "<eos>", True),
    "phi3": (PHI3_TEMPLATE, "<s>", "<|endoftext|>", True),
}
CONVERSATIONS = [
    [("user", "Hi there")],
    [("user", "Hi there"), ("assistant", "Hello! How can I help?"), ("user", "Count to 3")],
    [("system", "Be brief."), ("user", "Hi there")],
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")],
]
GO_MAIN = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

func main() {
	var in struct {
		Template string
		Messages []map[string]interface{}
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	messages := make([]interface{}, len(in.Messages))
	for i, m := range in.Messages {
		messages[i] = m
	}
	t := template.Must(template.New("modelfile").Parse(in.Template))
	data := map[string]interface{}{"Messages": messages, "System": "", "Prompt": ""}
	if err := t.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """render(go_template, messages) with Go's text/template, as Ollama executes TEMPLATE."""
    if shutil.which("go") is None:
        pytest.skip("needs the go tool (apt-get install golang-go)")
    root = tmp_path_factory.mktemp("go")
    (root / "main.go").write_text(GO_MAIN)
    env = {"GOCACHE": str(root / "cache"), "GOPATH": str(root / "gopath"), "HOME": str(root)}
    env["PATH"] = shutil.os.environ["PATH"]
    subprocess.run(["go", "build", "-o", "render", "main.go"], cwd=root, env=env, check=True)

    def render(template: str, messages: list[dict]) -> str:
        payload = json.dumps({"Template": template, "Messages": messages})
        done = subprocess.run([root / "render"], input=payload, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return render


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_go_template_renders_like_jinja(go_render, name):
    jinja, bos, eos, system_ok = TEMPLATES[name]
    add_bos = name != "chatml"
    turns = chat_turns(jinja, bos, eos, add_bos)
    template = go_template(turns)
    for conversation in CONVERSATIONS:
        if conversation[0][0] == "system" and not system_ok:
            continue
        messages = [{"role": r, "content": c} for r, c in conversation]
        expected = _render(jinja, messages, True, bos, eos)
        expected = expected.removeprefix(bos) if add_bos else expected  # llama.cpp adds it
        sent = messages  # Ollama: the Modelfile's SYSTEM first, when the chat has none
        if turns.default_system and messages[0]["role"] != "system":
            sent = [{"role": "system", "content": turns.default_system}, *messages]
        go_messages = [{"Role": m["role"], "Content": m["content"]} for m in sent]
        assert go_render(template, go_messages) == expected, (name, conversation)


def test_gemma2_system_messages_become_user_turns(go_render):
    jinja, bos, eos, _ = TEMPLATES["gemma2"]
    template = go_template(chat_turns(jinja, bos, eos))
    sent = [{"Role": "system", "Content": "Be brief."}, {"Role": "user", "Content": "Hi"}]
    as_users = [{"role": "user", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert go_render(template, sent) == _render(jinja, as_users, True, bos, eos).removeprefix(bos)


def test_turns_stops_and_default_system():
    turns = chat_turns(CHAT_TEMPLATE, "<|im_start|>", "<|im_end|>", add_bos=False)
    assert turns.user == ("<|im_start|>user\n", "<|im_end|>\n")
    assert turns.assistant == ("<|im_start|>assistant\n", "<|im_end|>\n")
    assert turns.generation == "<|im_start|>assistant\n"
    assert turns.system == ("<|im_start|>system\n", "<|im_end|>\n")
    assert turns.default_system == SYSTEM and turns.folded is None
    assert stop_tokens(turns, "<|im_end|>") == ["<|im_end|>", "<|im_start|>user"]
    gemma3 = chat_turns(GEMMA3, "<bos>", "<eos>")
    assert gemma3.system is None and gemma3.folded == ("", "\n\n")
    assert stop_tokens(gemma3, "<eos>") == ["<end_of_turn>", "<start_of_turn>user", "<eos>"]
    llama2 = chat_turns(LLAMA2, "<s>", "</s>")
    assert llama2.user == ("<s>[INST] ", " [/INST]") and llama2.bos == "<s>"
    assert llama2.folded == ("<<SYS>>\n", "\n<</SYS>>\n\n")


def test_modelfile_lines():
    said: list[str] = []
    text = modelfile("./m.gguf", CHAT_TEMPLATE, "<|im_end|>", said.append, "<|im_start|>", False)
    lines = text.splitlines()
    assert lines[0] == "FROM ./m.gguf" and lines[1].startswith('TEMPLATE """{{- range')
    assert f'SYSTEM """{SYSTEM}"""' in lines
    assert lines[-2:] == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>user"']
    assert said == []
    other = modelfile("./m.gguf", "{{ messages[0]['content'] }}", "</s>", said.append)
    assert "TEMPLATE" not in other and 'PARAMETER stop "</s>"' in other and len(said) == 1
    modelfile("./m.gguf", GEMMA2, "<eos>", said.append, "<bos>")
    assert "sent as user turns" in said[-1]
