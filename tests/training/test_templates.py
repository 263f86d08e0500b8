"""templates.py: built-in chat templates render the formats their models use; a base model's
tokenizer trains on chat rows with one; bad templates name the flag."""

import pytest
from test_data import END, START, hand_built, write_jsonl

from slimtune.errors import SlimtuneError
from slimtune.training.data import load_dataset
from slimtune.training.templates import CHATML, SAMPLE, read_chat_template, use_chat_template


@pytest.fixture
def base_tokenizer(tiny_tokenizer):
    """The tiny tokenizer as a base model ships it: no chat template."""
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = None
    return tokenizer


def test_builtins_render_chatml_and_llama3(base_tokenizer):
    use_chat_template(base_tokenizer, "chatml")
    text = base_tokenizer.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n"
        "<|im_start|>assistant\na<|im_end|>\n<|im_start|>assistant\n"
    )
    use_chat_template(base_tokenizer, "llama3")
    text = base_tokenizer.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True)
    bos, head = base_tokenizer.bos_token, "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert text == (
        f"{bos}{head.format('system')}s<|eot_id|>{head.format('user')}u<|eot_id|>"
        f"{head.format('assistant')}a<|eot_id|>{head.format('assistant')}"
    )


def test_a_base_tokenizer_trains_on_alpaca_with_chatml(tmp_path, base_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "output": "yo"}])
    with pytest.raises(SlimtuneError, match="--chat-template"):
        load_dataset(path, base_tokenizer, 64)
    use_chat_template(base_tokenizer, "chatml")
    example = load_dataset(path, base_tokenizer, 64).examples[0]
    expected = hand_built(
        [(f"{START}user\nhi{END}\n{START}assistant\n", False), (f"yo{END}", True), ("\n", False)]
    )
    assert (example.input_ids, example.labels) == expected


def test_a_template_file_is_read_and_checked(tmp_path, base_tokenizer):
    good = tmp_path / "t.jinja"
    good.write_text(CHATML)
    assert use_chat_template(base_tokenizer, str(good)) == CHATML
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(SlimtuneError, match=r"--chat-template .*bad.jinja: does not render"):
        use_chat_template(base_tokenizer, str(bad))
    with pytest.raises(SlimtuneError, match="not chatml, llama3 or an existing .jinja file"):
        read_chat_template("chatlm")
