"""neftune.py: the same noise as transformers' NEFTune hook on the same seed, in training only."""

import pytest
import torch
from test_data import write_jsonl

from slimtune.config import TrainConfig
from slimtune.training.loop import train
from slimtune.training.neftune import neftune

ALPHA = 5.0


def embed(model, ids, seed=0):
    torch.manual_seed(seed)
    return model.get_input_embeddings()(ids)


def test_noise_equals_transformers_hook_and_only_in_training(tiny_llama):
    from transformers.integrations.neftune import neftune_post_forward_hook

    model, _ = tiny_llama
    ids = torch.randint(0, 90, (3, 17))  # (B, L)
    clean = model.get_input_embeddings()(ids)
    model.train()
    with neftune(model, ALPHA):
        ours = embed(model, ids)
        model.eval()
        assert torch.equal(embed(model, ids), clean)  # evaluation: no noise
        model.train()
    assert torch.equal(embed(model, ids), clean)  # the hook is gone after the block

    module = model.get_input_embeddings()
    module.neftune_noise_alpha = ALPHA
    handle = module.register_forward_hook(neftune_post_forward_hook)
    reference = embed(model, ids)
    handle.remove()
    assert torch.equal(ours, reference)
    noise = ours - clean
    bound = ALPHA / (17 * clean.shape[-1]) ** 0.5  # α / √(L·d)
    assert noise.abs().max() <= bound * (1 + 1e-6) and noise.abs().max() > 0.9 * bound
    assert noise.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)  # Uniform(-m, m)


def test_trainer_adds_noise_while_training_and_removes_it(make_tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_llama_dir()
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there, general"}] * 4)
    losses = []
    for alpha in (0.0, 50.0):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model.requires_grad_(True)
        config = TrainConfig(max_steps=1, neftune_alpha=alpha, save_every=0)
        save = lambda m, d: None  # noqa: E731
        summary = train(
            model, tokenizer, data, config, tmp_path / f"r{alpha}", save_fn=save, quiet=True
        )
        losses.append(summary["first_loss"])
        assert not model.get_input_embeddings()._forward_hooks  # generation stays noise-free
    assert losses[0] != losses[1]
