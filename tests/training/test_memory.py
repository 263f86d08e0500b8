"""training/memory.py: the recomputation plan (by hand), CPU runs unchanged, summary.json."""

import json
import random
import types

import pytest
import torch

import slimtune as st
from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError
from slimtune.models import load_model
from slimtune.training.loop import train
from slimtune.training.memory import (
    GiB,
    Measurements,
    MemoryPlan,
    choose_recomputation,
    hold_dequantized,
    layers_to_keep,
    plan_memory,
)


def _rows_file(tmp_path, n=32):
    rng = random.Random(0)
    rows = [
        {"prompt": f"{rng.randint(0, 9)}+{rng.randint(0, 9)}=", "completion": "7"} for _ in range(n)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_auto_keeps_as_many_layers_as_the_budget_holds():
    # step 1 (all 32 layers recomputed): 10 GiB before, 20 GiB peak, 11 GiB after (with AdamW state);
    # one recomputed layer kept 1 GiB for 8192 tokens; the data's largest batch is 8192 tokens.
    probe = [(GiB, 8192)] * 32
    m = Measurements(10 * GiB, 20 * GiB, 11 * GiB, probe, 8192)
    # peak with every layer recomputed: (20 - 10) + 11 = 21 GiB; each kept layer adds 1 GiB
    assert choose_recomputation(m, 30 * GiB, 32) == (32 - 9, False, GiB, 21 * GiB)
    assert choose_recomputation(m, 100 * GiB, 32)[:2] == (0, False)
    assert choose_recomputation(m, 20 * GiB, 32)[:2] == (32, True)  # 21 > 20: offload
    # a batch twice as long as step 1's: activations scale, weights and state do not
    m2 = Measurements(10 * GiB, 20 * GiB, 11 * GiB, probe, 16384)
    assert choose_recomputation(m2, 40 * GiB, 32) == (32 - 4, False, 2 * GiB, 31 * GiB)


def test_layers_to_keep_at_its_edges():
    assert layers_to_keep(10, 5, 0, 32) == 32  # a layer that keeps nothing: keep them all
    assert layers_to_keep(10, 5, 1, 32) == 5  # (10 - 5) // 1
    assert layers_to_keep(10, 5, 2, 32) == 2
    assert layers_to_keep(4, 5, 1, 32) == 0  # over the budget already
    assert layers_to_keep(100, 5, 1, 32) == 32


def test_the_plan_arithmetic_at_its_edges():
    # no layer probed (nothing recomputed in step 1): step 1 counts as one token, so the
    # longest batch (2 tokens) doubles its activations, and no layer costs anything to keep
    empty = Measurements(10, 20, 11, [], 2)
    assert choose_recomputation(empty, 40, 32) == (0, False, 0.0, 31.0)
    assert choose_recomputation(empty, 31, 32)[1] is False  # exactly at the budget: it fits
    assert choose_recomputation(empty, 30, 32)[1] is True
    # one probed layer of one token keeping 6 bytes; batches of up to 2 tokens
    one = Measurements(0, 10, 0, [(6, 1)], 2)
    assert choose_recomputation(one, 44, 32) == (32 - 2, False, 12.0, 20.0)  # (44 - 20) // 12
    # an MLP rebuild that saves more than the layer kept leaves nothing to keep, not less
    assert choose_recomputation(one, 24, 32, saved_per_token=100) == (0, False, 0.0, 20.0)


def _gated_model() -> torch.nn.Module:
    """32 MLPs of intermediate size 16384 marked as the gated LoRA path marks them
    (kernels/llama_ops.py), for `MemoryPlan.rebuilt_choice`."""
    model = torch.nn.Module()
    model.config = types.SimpleNamespace(intermediate_size=16384)
    model.mlps = torch.nn.ModuleList(torch.nn.Module() for _ in range(32))
    for mlp in model.mlps:
        mlp.gated = True
    return model


def _plan(budget_gib: float) -> MemoryPlan:
    """An `auto` plan of 32 layers on a GPU, before its first step's figures."""
    return MemoryPlan(torch.device("cuda"), "auto", 32, 32, False, True, 64, "", "adamw",
                      budget_gib)  # fmt: skip


# step 1 of 32 recomputed layers: 10 GiB before, 20 GiB peak, 11 GiB after; 1 GiB a layer
EIGHT_GIB_STEP = Measurements(10 * GiB, 20 * GiB, 11 * GiB, [(GiB, 8192)] * 32, 8192)


def test_rebuilding_h_is_left_off_where_it_keeps_no_more_layers():
    m, model, plan = EIGHT_GIB_STEP, _gated_model(), _plan(21.5)
    # 0.5 GiB over "all": no layer kept at 1 GiB a layer, nor at 0.75 with h rebuilt
    chosen = choose_recomputation(m, 21.5 * GiB, 32)
    assert chosen[0] == 32
    assert plan.rebuilt_choice(model, m, chosen) is None
    assert not any(getattr(mlp, "rebuild_output", False) for mlp in model.mlps)
    plain = torch.nn.Module()  # no config: no intermediate size to reason about
    assert plan.rebuilt_choice(plain, m, chosen) is None


def test_auto_rebuilds_the_mlp_activation_where_that_recomputes_fewer_layers():
    # h (8192 tokens x 16384 intermediate, bf16) is 1/4 of what a layer keeps: kept layers
    # then cost 0.75 GiB, and a 30 GiB budget keeps 12 instead of 9
    from slimtune.kernels.llama_ops import rebuild_gated_outputs

    m = EIGHT_GIB_STEP
    h = 2 * 16384  # bytes of h per token
    assert choose_recomputation(m, 30 * GiB, 32, saved_per_token=h) == (
        32 - 12, False, 0.75 * GiB, 21 * GiB
    )  # fmt: skip
    model, plan = _gated_model(), _plan(30.0)
    assert plan.rebuilt_choice(model, m, choose_recomputation(m, 30 * GiB, 32))[0] == 20
    assert all(mlp.rebuild_output for mlp in model.mlps)
    rebuild_gated_outputs(model, False)
    ample = choose_recomputation(m, 100 * GiB, 32)  # nothing recomputed: h is kept
    assert plan.rebuilt_choice(model, m, ample) is None
    assert not any(mlp.rebuild_output for mlp in model.mlps)
    del model.mlps[0].gated  # an MLP off the gated path: h would stay, the plan would be wrong
    assert plan.rebuilt_choice(model, m, choose_recomputation(m, 30 * GiB, 32)) is None


def test_auto_counts_the_inputs_its_first_step_offloaded():
    # step 1 ran with the 32 layer inputs (64 MiB each, 2 GiB in all) in CPU memory: "all"
    # without offload needs them on the GPU as well, so peak_all is 21 + 2 GiB
    probe = [(GiB, 8192, GiB // 16)] * 32
    m = Measurements(10 * GiB, 20 * GiB, 11 * GiB, probe, 8192, offloaded=True)
    assert choose_recomputation(m, 30 * GiB, 32) == (32 - 7, False, GiB, 23 * GiB)
    assert choose_recomputation(m, 22 * GiB, 32)[:2] == (32, True)  # 23 > 22: stay offloaded
    on_gpu = Measurements(10 * GiB, 20 * GiB, 11 * GiB, probe, 8192, offloaded=False)
    assert choose_recomputation(on_gpu, 22 * GiB, 32)[:2] == (32 - 1, False)  # already in peak


def _quantized(model: torch.nn.Module, quant: str) -> tuple[torch.nn.Module, list, int]:
    """(model quantized, its quantized layers, their weights' bytes in bf16)."""
    from slimtune.quant.linear import quantize_model, quantized_layers

    model = quantize_model(model, quant)
    layers = list(quantized_layers(model).values())
    return model, layers, sum(2 * m.in_features * m.out_features for m in layers)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_4bit_weights_are_held_dequantized_only_where_all_of_them_fit(tiny_llama, quant):
    model, layers, needed = _quantized(tiny_llama[0], quant)
    assert len(layers) > 1 and needed > 0
    assert hold_dequantized(model, needed - 1) == 0
    assert not any(getattr(m, "dequantized", None) is not None for m in layers)
    assert hold_dequantized(model, needed) == needed
    for m in layers:  # the very bits the layer computes with, in bf16
        assert torch.equal(m.dequantized, m.dequantize_weight(torch.bfloat16))
    assert hold_dequantized(model, 0) == 0  # released
    assert all(m.dequantized is None for m in layers)


def test_the_plan_drops_what_it_held_when_the_run_ends(tiny_llama):
    model, layers, _ = _quantized(tiny_llama[0], "nf4")
    plan = MemoryPlan(torch.device("cpu"), "auto", 2, 0, False, False, 0, "", "adamw", 1.0)
    plan.dequantized_gib = hold_dequantized(model, 2**40) / GiB
    assert plan.dequantized_gib > 0 and all(m.dequantized is not None for m in layers)
    assert "4-bit weights held dequantized" in plan.line()
    plan.release(model)
    assert all(m.dequantized is None for m in layers)


@pytest.mark.parametrize("spare", [0, -1])
def test_auto_holds_the_copies_only_with_room_past_a_plan_that_recomputes_nothing(
    tiny_llama, monkeypatch, spare
):
    """`after_step` from step 1's figures (the GPU's counters stood in for): with room for
    no recomputation plus every bf16 copy the copies are held, one byte less and none are."""
    model, layers, needed = _quantized(tiny_llama[0], "nf4")
    mib = 2**20
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 10 * mib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5 * mib)
    # peak with every layer recomputed: (10 - 0) + 5 = 15 MiB; each kept layer 1 MiB; 2 layers
    budget = 15 * mib + 2 * mib + needed + spare
    plan = MemoryPlan(torch.device("cpu"), "auto", 2, 2, True, False, 0, "", "adamw",
                      budget / GiB, pending=True, probe=[(mib, 100, 0)] * 2, worst_tokens=100)  # fmt: skip
    assert plan.after_step(model)
    assert (plan.recomputed, plan.offload) == (0, False)
    assert plan.dequantized_gib == (needed / GiB if spare == 0 else 0.0)
    assert all((m.dequantized is not None) == (spare == 0) for m in layers)
    plan.release(model)
    assert all(m.dequantized is None for m in layers)


def test_8bit_weights_are_never_held_dequantized(tiny_llama):
    """Only 4-bit states go through the held path (kernels/lora.py `FrozenWeight`)."""
    model, layers, _ = _quantized(tiny_llama[0], "int8")
    assert layers and hold_dequantized(model, 2**40) == 0


def test_cpu_auto_changes_nothing(tiny_llama, tmp_path):
    from transformers.modeling_layers import GradientCheckpointingLayer

    model, tokenizer = tiny_llama
    model = st.add_adapter(model, st.LoraConfig(r=2, target_modules=["q_proj"]))
    before = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    use_cache = model.config.use_cache
    from slimtune.training.data import load_dataset

    data = load_dataset(_rows_file(tmp_path), tokenizer, 64)
    plan = plan_memory(model, TrainConfig(), torch.device("cpu"), data)
    assert (plan.recomputed, plan.offload, plan.kernels, plan.pending) == (0, False, False, False)
    assert {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()} == before
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert not any(m.gradient_checkpointing for m in layers)
    assert model.config.use_cache == use_cache
    assert plan.line().startswith("cpu: float32 base") and "recompute 0/2 layers" in plan.line()


@pytest.mark.parametrize("setting", ["all", "0.5"])
def test_recomputation_on_cpu_trains_bit_identically(make_tiny_llama_dir, tmp_path, setting):
    """Recomputing layers (all, or half) changes memory, never the numbers: the same losses
    and adapter as a run without it, bit for bit; summary.json records the plan."""
    data = _rows_file(tmp_path)
    directory = make_tiny_llama_dir()
    results = []
    for checkpointing in ("none", setting):
        model, tokenizer = load_model(directory)
        torch.manual_seed(0)
        model = st.add_adapter(model, st.LoraConfig(r=4, target_modules="all-linear"))
        config = TrainConfig(max_steps=4, batch_size=4, save_every=0, checkpointing=checkpointing)
        out = tmp_path / f"run-{checkpointing}"
        summary = train(model, tokenizer, data, config, out, quiet=True)
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").open()]
        results.append(
            (
                losses,
                {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                summary,
            )
        )
    (plain, plain_params, _), (recomputed, params, summary) = results
    assert recomputed == plain
    assert all(torch.equal(params[n], plain_params[n]) for n in plain_params)
    assert summary["memory"]["recomputed"] == (2 if setting == "all" else 1)
    assert summary["memory"]["setting"] == setting
    saved = json.loads((tmp_path / f"run-{setting}" / "summary.json").read_text())
    assert saved["memory"]["line"] == summary["memory"]["line"]


@pytest.mark.parametrize("key, value", [("checkpointing", "some"), ("checkpointing", 1.5),
                                        ("gpu_memory", -1), ("optim", "sgd")])  # fmt: skip
def test_bad_memory_settings_are_named(key, value):
    with pytest.raises(SlimtuneError, match=f"{key}={value!r}"):
        TrainConfig(**{key: value})


@pytest.mark.parametrize("optim", ["paged", "8bit"])
def test_optim_setting_picks_the_optimizer(tiny_llama, tmp_path, optim):
    from slimtune.training.optim import AdamW8bit, PagedAdamW

    model, tokenizer = tiny_llama
    model = st.add_adapter(model, st.LoraConfig(r=2, target_modules=["q_proj"]))
    seen = []
    step = {"paged": PagedAdamW, "8bit": AdamW8bit}[optim].step

    def spy(self, *args, **kwargs):
        seen.append(type(self).__name__)
        return step(self, *args, **kwargs)

    cls = {"paged": PagedAdamW, "8bit": AdamW8bit}[optim]
    cls.step = spy
    try:
        config = TrainConfig(max_steps=2, batch_size=4, save_every=0, optim=optim)
        train(model, tokenizer, _rows_file(tmp_path), config, tmp_path / "run", quiet=True)
    finally:
        cls.step = step
    assert seen == [cls.__name__] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_plan_keeps_the_peak_within_the_budget_gpu(make_tiny_llama_dir, tmp_path):
    """A budget between 'all recomputed' and 'none recomputed' gives a partial plan whose
    later steps stay under the budget (the measurement is what the plan rests on)."""
    directory = make_tiny_llama_dir(hidden_size=256, intermediate_size=1024, num_hidden_layers=8)
    rows = [{"text": " ".join(["ab"] * 400)} for _ in range(16)]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    peaks = {}
    for setting in ("all", "none"):
        model, tok = load_model(directory, dtype=torch.bfloat16, device="cuda")
        model = st.add_adapter(model, st.LoraConfig(r=4, target_modules="all-linear"))
        torch.cuda.reset_peak_memory_stats()
        config = TrainConfig(
            max_steps=2, batch_size=8, max_length=512, save_every=0, checkpointing=setting
        )
        train(model, tok, data, config, tmp_path / setting, quiet=True)
        peaks[setting] = torch.cuda.max_memory_allocated() / GiB
        del model
        torch.cuda.empty_cache()

    def auto(budget: float, name: str) -> dict:
        torch.cuda.reset_peak_memory_stats()
        model, tok = load_model(directory, dtype=torch.bfloat16, device="cuda")
        model = st.add_adapter(model, st.LoraConfig(r=4, target_modules="all-linear"))
        config = TrainConfig(
            max_steps=3, batch_size=8, max_length=512, save_every=0, gpu_memory=budget
        )
        return train(model, tok, data, config, tmp_path / name, quiet=True)

    budget = (peaks["all"] + peaks["none"]) / 2
    summary = auto(budget, "auto")
    plan = summary["memory"]
    if not plan["rebuilt_mlp"]:
        # (budget − peak_all) / a fell just above a whole number k, where a − h (h ~ a/5)
        # keeps no more layers: with k + ½ layers of room, rebuilding h keeps one more
        keep = plan["layers"] - plan["recomputed"]
        budget = plan["peak_all_gib"] + (keep + 0.5) * plan["per_layer_gib"]
        summary = auto(budget, "auto-half")
        plan = summary["memory"]
    assert 0 < plan["recomputed"] < 8 and not plan["offload"], (peaks, plan)
    assert plan["rebuilt_mlp"], plan
    assert summary["peak_memory_mb"] / 1024 <= budget * 1.02, (peaks, plan)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_holds_4bit_weights_dequantized_when_the_budget_has_room_gpu(
    make_tiny_llama_dir, tmp_path, monkeypatch
):
    """QLoRA with room to spare holds a dequantized copy of each 4-bit weight for the run,
    and drops it when the run ends. The losses are those of the same plan dequantizing twice
    a step: step 1 (before the plan holds anything) bit for bit, the later steps within what
    cuDNN's attention backward, which accumulates dQ with atomics, leaves from run to run
    (the held weight's gradients are checked against float64 on the CPU:
    test_kernels_lora.py, test_lora_group.py)."""
    from slimtune.quant.linear import quantized_layers
    from slimtune.training import memory

    directory = make_tiny_llama_dir(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    data = _rows_file(tmp_path)
    losses, held = {}, {}
    for name in ("held", "twice"):
        if name == "twice":
            monkeypatch.setattr(memory, "hold_dequantized", lambda model, room: 0)
        model, tok = load_model(directory, dtype=torch.bfloat16, device="cuda", quantize="nf4")
        model = st.add_adapter(model, st.LoraConfig(r=4, target_modules="all-linear"))
        config = TrainConfig(max_steps=4, batch_size=4, save_every=0, seed=0, gpu_memory=40.0)
        summary = train(model, tok, data, config, tmp_path / name, quiet=True)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(x)["loss"] for x in lines if '"loss"' in x]
        held[name] = summary["memory"]["dequantized_gib"]
        if name == "held":
            assert all(m.dequantized is None for m in quantized_layers(model).values())
    assert held["held"] > 0 and held["twice"] == 0, held
    assert losses["held"][0] == losses["twice"][0], losses
    for got, want in zip(losses["held"], losses["twice"], strict=True):
        assert abs(got - want) / want < 1e-2, losses


def test_command_line_flags_reach_the_plan(tiny_llama_dir, tmp_path, capsys):
    """--checkpointing / --optim from the command line: recorded in config.yaml and
    summary.json, printed once; a bad value is one line naming the flag, nothing written."""
    import yaml

    from slimtune.cli.main import main

    data = _rows_file(tmp_path)
    out = tmp_path / "run"
    common = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--max-steps", "2",
              "--save-every", "0"]  # fmt: skip
    assert main([*common, "--out", str(out), "--checkpointing", "0.5", "--optim", "paged"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["memory"]["recomputed"] == 1 and summary["memory"]["optim"] == "paged"
    assert printed.count("recompute 1/2 layers") == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["checkpointing"], saved["optim"]) == ("0.5", "paged")
    assert main([*common, "--out", str(tmp_path / "bad"), "--checkpointing", "most"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--checkpointing" in err and "most" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_out_of_gpu_memory_is_one_line_naming_the_settings(
    tiny_llama_dir, tmp_path, capsys, monkeypatch
):
    """A CUDA out-of-memory error in training reaches the user as one line that names what
    was asked and what would fit; the run directory is not left half-written."""
    import slimtune.training.loop as loop
    from slimtune.cli.main import main

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop._Loop, "steps", no_memory)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_llama_dir), "--data", str(_rows_file(tmp_path)),
            "--out", str(out), "--checkpointing", "none", "--batch-size", "2"]  # fmt: skip
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "out of GPU memory" in err
    assert "--checkpointing none" in err and "--batch-size 2" in err and "offload" in err
    assert not out.exists() or not any(out.iterdir())
