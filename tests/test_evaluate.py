"""evaluate.py: sliding-window perplexity, exact match and generation against transformers."""

import json
import math

import torch

from slimtune.cli.main import main
from slimtune.evaluate import evaluate, exact_match, generate, sliding_windows
from slimtune.training.data import IGNORE_INDEX, Example, collate, load_dataset


def test_sliding_windows_score_every_token_once_with_context():
    ids = list(range(100, 150))  # 50 tokens
    windows = sliding_windows(Example(ids, list(ids)), max_length=16, stride=6)
    scored, begin = [], 0
    for window in windows:
        assert len(window.input_ids) <= 16
        begin = ids.index(window.input_ids[0])
        scored += [begin + i for i, x in enumerate(window.labels) if i > 0 and x != IGNORE_INDEX]
    assert scored == list(range(1, 50))  # nothing predicts token 0
    assert all(ids.index(w.input_ids[0]) % 6 == 0 for w in windows)


def hand_sliding_loss(model, ids: list[int], max_length: int, stride: int) -> float:
    """The perplexity recipe of the transformers documentation, written out by hand."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        target_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        target = input_ids.clone()
        target[:, :-target_len] = -100
        n = int((target[:, 1:] != -100).sum())
        with torch.no_grad():
            nll += float(model(input_ids, labels=target).loss) * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return nll / count


def test_text_file_perplexity_matches_the_sliding_window_recipe(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    path = tmp_path / "book.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    result = evaluate(model, tokenizer, path, max_length=32, stride=16)
    ids = tokenizer(path.read_text())["input_ids"] + [tokenizer.eos_token_id]
    expected = hand_sliding_loss(model, ids, 32, 16)
    assert math.isclose(result["loss"], expected, rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(expected), rel_tol=1e-5)
    assert "exact_match" not in result


def hf_greedy(model, tokenizer, prompt_ids: list[int], new: int) -> str:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def test_exact_match_against_unbatched_transformers_generation(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    prompts = ["1+1=", "a longer prompt here=", "xy", "9*9=", "hello there, ", "q"]
    rows = []
    for i, prompt in enumerate(prompts):
        truth = hf_greedy(model, tokenizer, tokenizer(prompt)["input_ids"], 4)[:3]
        # half the references are the model's own greedy answer, half are not
        reference = truth if i % 2 == 0 else "~~~"
        rows.append({"prompt": prompt, "completion": f" {reference} "})
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(path, tokenizer, 64)
    score, examples = exact_match(model, tokenizer, data, batch_size=4)
    assert score == 0.5
    assert [set(e) for e in examples] == [{"prompt", "reference", "prediction", "match"}] * 6
    assert [e["prompt"] for e in examples] == [  # the prompt as the model saw it, BOS and all
        tokenizer.decode(tokenizer(p)["input_ids"], skip_special_tokens=False) for p in prompts
    ]
    one = load_dataset(path, tokenizer, 64)
    one.examples, one.rows = one.examples[:1], one.rows[:1]  # the first is the model's own
    assert exact_match(model, tokenizer, one)[0] == 1.0
    for example, prompt in zip(examples, prompts, strict=True):
        budget = len(example["reference"]) + 2  # the char tokenizer: one token per char
        assert example["prediction"] == hf_greedy(
            model, tokenizer, tokenizer(prompt)["input_ids"], budget
        )


def test_eval_cli_writes_json_with_transformers_loss(tiny_llama, tiny_llama_dir, tmp_path, capsys):
    model, tokenizer = tiny_llama
    rows = [{"prompt": "12+30=", "completion": "42"}, {"prompt": "1+1=", "completion": "2"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    assert (
        main(["eval", "--model", str(tiny_llama_dir), "--data", str(path), "--json", str(out)]) == 0
    )
    table = capsys.readouterr().out
    assert "perplexity" in table and "exact match" in table
    result = json.loads(out.read_text())
    batch = collate(load_dataset(path, tokenizer, 64).examples, tokenizer.pad_token_id)
    with torch.no_grad():
        expected = float(model(**batch).loss)
    assert math.isclose(result["loss"], expected, rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(expected), rel_tol=1e-5)
    assert result["exact_match"] in (0.0, 0.5, 1.0)


def test_generate_streams_the_chat_answer_of_transformers(tiny_llama, tiny_llama_dir, capsys):
    model, tokenizer = tiny_llama
    pieces = []
    text = generate(model, tokenizer, "hi", max_new_tokens=12, stream=pieces.append)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    expected = hf_greedy(
        model, tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"], 12
    )
    assert text == expected and "".join(pieces) == expected
    assert (
        main(
            ["generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--max-new-tokens", "12"]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + ("" if expected.endswith("\n") else "\n")


def test_a_qlora_adapter_loads_on_a_base_quantized_as_it_arrives(
    tiny_llama_dir, tmp_path, monkeypatch
):
    """eval/generate/the web app load a QLoRA adapter's base NF4-on-arrival (no full-precision
    model first), with the settings its file records (block size 32 here), and compute what
    the model it trained as computes: from_pretrained, quantize_model, the adapter."""
    from transformers import AutoModelForCausalLM

    import slimtune as st
    from slimtune.evaluate import load_for_inference
    from slimtune.quant import linear

    trained = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    st.quantize_model(trained, "nf4", blocksize=32)
    st.add_adapter(
        trained, st.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    st.save_adapter(trained, tmp_path / "adapter", metadata=linear.quant_metadata(trained))

    def whole_model_quantization(*args, **kwargs):
        raise AssertionError("the whole model was loaded in full precision, then quantized")

    monkeypatch.setattr(linear, "quantize_model", whole_model_quantization)
    model, _ = load_for_inference(str(tiny_llama_dir), str(tmp_path / "adapter"))
    layer = model.get_submodule("model.layers.0.mlp.down_proj.base_layer")
    want = trained.get_submodule("model.layers.0.mlp.down_proj.base_layer")
    assert layer.quant_state.blocksize == 32
    assert torch.equal(layer.codes, want.codes) and torch.equal(layer.absmax, want.absmax)
    ids = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, trained.eval()(input_ids=ids).logits)
