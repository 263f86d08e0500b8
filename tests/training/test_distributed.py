"""distributed.py and distributed_checkpoint.py pieces that need no process group.

The end-to-end runs under torchrun (2 processes vs 1) are in tests/cli/test_distributed_cli.py.
"""

import json

import pytest
import torch
from torch import nn

from slimtune.cli.parser import build_parser
from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError
from slimtune.training import distributed
from slimtune.training.checkpoints_sharded import keep_global_batch


def quantized_mlp(quant: str, sizes=(64, 128, 64)) -> nn.Module:
    from slimtune.quant.linear import quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(*sizes[1:], bias=False)
    )
    return quantize_model(model, quant, skip=[])


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quant_storage_becomes_frozen_parameters(quant):
    from slimtune.adapters.named import trainable_parameters

    model = quantized_mlp(quant)
    x = torch.randn(3, 64)
    layers = [model[0], model[2]]
    # reference: the dequantized weights in a plain torch computation
    weights = [layer.quant_state.dequantize(torch.float32) for layer in layers]
    want = nn.functional.linear(
        torch.relu(nn.functional.linear(x, weights[0], model[0].bias)), weights[1]
    )
    counts = trainable_parameters(model)
    moved = distributed.shardable_quant_storage(model)
    names = dict(model.named_parameters())
    stored = {n.split(".", 1)[1] for n, p in names.items() if n.startswith("0.")}
    if quant == "nf4":  # 4-bit codes, uint8 absmax, fp32 absmax2; the scalar offset stays
        assert stored == {"bias", "codes", "absmax", "absmax2"} and moved == 6
    else:  # int8 rows and their absmax; no outliers here, so those (empty) stay buffers
        assert stored == {"bias", "codes", "absmax"} and moved == 4
    for name, param in names.items():  # what FSDP2 in torch 2.11 needs: floating, frozen
        assert param.is_floating_point() and not param.requires_grad, name
        assert name.endswith("bias") or (param.dtype == torch.bfloat16 and param.dim() == 1)
    torch.testing.assert_close(model(x), want)
    assert distributed.parameter_counts(model, trainable_parameters(model)) == counts


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_bf16_storage_round_trips_byte_exactly(quant):
    """Odd sizes (odd byte counts get a pad byte); the bytes survive model.to(dtype)."""
    from slimtune.quant.linear import storage_as

    model = quantized_mlp(quant, sizes=(7, 33, 5))
    plain = quantized_mlp(quant, sizes=(7, 33, 5))  # the same weights, left as buffers
    distributed.shardable_quant_storage(model)
    for m in (model, plain):  # must not cast stored bytes (the biases do round, alike)
        m.to(torch.float16).to(torch.float32)
    for layer, ref in [(model[0], plain[0]), (model[2], plain[2])]:
        assert layer._as_bytes, "nothing was moved"
        for name, (dtype, shape) in layer._as_bytes.items():
            want = ref._buffers[name]
            param = layer._parameters[name]
            assert param.dtype == torch.bfloat16 and param.numel() == -(-want.nbytes // 2)
            got = storage_as(param.detach(), dtype, shape)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(
                got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
            )
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(layer.dequantize_weight(dtype), ref.dequantize_weight(dtype))
    x = torch.randn(4, 7)
    assert torch.equal(model(x), plain(x))


def test_train_argv_round_trips_without_nproc():
    parser = build_parser()
    argv = ["train", "--model", "m", "--data", "d.jsonl", "--out", "r", "--lr", "0.001",
            "--max-steps", "3", "--grad-accum", "2", "--resume", "--quiet", "--nproc", "2"]  # fmt: skip
    args = parser.parse_args(argv)
    again = parser.parse_args(["train", *distributed.train_argv(args)])
    assert again.nproc is None
    assert {**vars(again), "nproc": 2} == vars(args)


def test_rank_share_is_every_world_th_micro_batch(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shares = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(list(distributed.rank_share(iter(range(10)))))
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def write_checkpoint(run, step, micro_batches):
    path = run / "checkpoints" / f"step-{step:06d}"
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": step, "micro_batches": micro_batches}))


def test_resume_keeps_the_global_batch(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, 2, 8)  # 4 micro-batches per step (e.g. 2 ranks x accum 2)
    config = TrainConfig(grad_accum=2)
    assert keep_global_batch(config, tmp_path, resume=False) is config
    assert keep_global_batch(config, tmp_path, resume=True).grad_accum == 4  # 1 process
    monkeypatch.setattr("slimtune.training.checkpoints_sharded.world_size", lambda: 4)
    assert keep_global_batch(config, tmp_path, resume=True).grad_accum == 1
    monkeypatch.setattr("slimtune.training.checkpoints_sharded.world_size", lambda: 3)
    with pytest.raises(SlimtuneError, match="4 micro-batches per step"):
        keep_global_batch(config, tmp_path, resume=True)


def test_metrics_mirror_writes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    mirror = distributed._MirrorLog(path)
    mirror.truncate_after(1)
    mirror.append({"step": 2, "loss": 1.0})
    assert mirror.records() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    assert path.read_text().count("\n") == 2  # the file is rank 0's alone


def test_nproc_under_torchrun_is_refused(monkeypatch):
    for key, value in [("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "1")]:  # fmt: skip
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["train", "--out", "r", "--nproc", "2"])
    with pytest.raises(SlimtuneError, match="already started"):
        distributed.launch(args)


def lora_mlp(rank: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    import slimtune as st

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(8, 16))
    model = st.add_adapter(model, st.LoraConfig(r=rank, lora_alpha=rank, target_modules=["up"]))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=0.1)


def test_dcp_checkpoint_loads_in_one_process(tmp_path):
    """A DCP directory (written here by dcp.save itself) loads with no process group."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from slimtune.training.checkpoints_sharded import load_checkpoint

    path = tmp_path / "checkpoints" / "step-000001"
    names = ["up.lora_A.default.weight", "up.lora_B.default.weight"]
    saved = {"model": {n: torch.randn(s) for n, s in zip(names, [(4, 8), (16, 4)], strict=True)}}
    moments = {n: {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(t),
                   "exp_avg_sq": torch.rand_like(t)} for n, t in saved["model"].items()}  # fmt: skip
    model, optimizer = lora_mlp(4)
    groups = [{**optimizer.param_groups[0], "params": names}]
    saved["optim"] = {"state": moments, "param_groups": groups}
    dcp.save(saved, checkpoint_id=str(path), no_dist=True)
    save_file({"torch": torch.get_rng_state()}, str(path / "rng-0.safetensors"))
    (path / "state.json").write_text(json.dumps({"step": 1, "micro_batches": 2, "world_size": 2}))

    state = load_checkpoint(path, model, optimizer)
    assert state["world_size"] == 2
    params = dict(model.named_parameters())
    for name in names:
        torch.testing.assert_close(params[name].detach(), saved["model"][name], rtol=0, atol=0)
        got = optimizer.state[params[name]]
        torch.testing.assert_close(got["exp_avg_sq"], moments[name]["exp_avg_sq"], rtol=0, atol=0)
        assert float(got["step"]) == 3.0
    other_rank, other_optimizer = lora_mlp(2)
    with pytest.raises(SlimtuneError, match="does not match the model's trainable parameters"):
        load_checkpoint(path, other_rank, other_optimizer)


@pytest.fixture
def one_process_group():
    """A gloo process group of one, in this process (what torchrun --nproc-per-node 1 gives)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tiny_causal_lm(method: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    import slimtune as st

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).requires_grad_(False)
    if method == "qlora":
        st.quantize_model(model, "nf4", skip=("lm_head",), blocksize=32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return st.add_adapter(model, st.LoraConfig(r=4, lora_alpha=8, target_modules=targets))


def lm_loss(model, batch, chunk):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss, 1


def train_losses(model: nn.Module, loss_fn, steps: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 12), generator=gen)
        loss, _ = loss_fn(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("frozen_whole", [True, False], ids=["frozen-whole", "all-sharded"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_one_process_fsdp_trains_as_the_plain_model(one_process_group, method, frozen_whole):
    """World size 1 (the default layout keeps frozen weights whole; the other is the one
    several processes use, 4-bit storage as bf16 bytes included): same losses, same adapter."""
    from torch.distributed.tensor import DTensor

    plain = tiny_causal_lm(method)
    want = train_losses(plain, lm_loss)
    model = distributed.shard_model(tiny_causal_lm(method), torch.device("cpu"), frozen_whole)
    got = train_losses(model, distributed.sharded_loss(model, lm_loss))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    params = dict(model.named_parameters())
    for name, param in params.items():  # sharded: trainable always, frozen unless kept whole
        assert isinstance(param, DTensor) == (param.requires_grad or not frozen_whole), name
    codes = [p for n, p in params.items() if n.endswith(".codes")]
    assert len(codes) == (0 if method == "lora" or frozen_whole else 14)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in codes)
    with distributed.whole_trainable(model):
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    want_params = {n: p.detach() for n, p in plain.named_parameters() if p.requires_grad}
    assert sorted(trained) == sorted(want_params)
    for name, value in want_params.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-7)
