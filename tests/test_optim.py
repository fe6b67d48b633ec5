"""Optimizers by name: each trains a tiny llama downhill, Lion matches the paper's update by
hand, every optimizer's state survives a state_dict round trip exactly, and Muon takes the
hidden matrices while AdamW keeps embeddings, head, norms and biases."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from truthgpt.config import LoraConfig, OptimConfig, load
from truthgpt.errors import ConfigError
from truthgpt.models.decoder import Decoder, DecoderConfig
from truthgpt.models.lora import apply_lora
from truthgpt.training.optim import Lion, MuonWithAdamW, build_optimizer, build_scheduler

VOCAB = 64
# A learning rate that suits each optimizer on this tiny model (Lion's unit-size updates want a
# smaller one than AdamW's; plain SGD a much larger one).
# Muon's lr is its AdamW part's; its hidden matrices take optim.muon_lr (default 0.02).
LEARNING_RATES = {"adamw": 3e-3, "muon": 3e-3, "lion": 3e-3, "adafactor": 3e-2, "sgd": 0.5}


def tiny_llama(seed: int = 0, **overrides: object) -> Decoder:
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    cfg = DecoderConfig(**{**shape, **overrides})
    return Decoder(cfg)


def fixed_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 16), generator=generator) for _ in range(2)]


def train_steps(model: Decoder, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    batches = fixed_batches()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", list(LEARNING_RATES))
def test_each_optimizer_lowers_the_loss(name: str) -> None:
    model = tiny_llama()
    cfg = OptimConfig(name=name, lr=LEARNING_RATES[name], weight_decay=0.01)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    losses = train_steps(model, optimizer, 30)
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), abs=0.1)
    assert losses[-1] < losses[0] - 0.5, losses


def test_only_trainable_parameters_reach_the_optimizer() -> None:
    model = tiny_llama()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("layers.0."))
    for name in LEARNING_RATES:
        optimizer = build_optimizer(model, OptimConfig(name=name), torch.device("cpu"))
        handed = {id(p) for group in optimizer.param_groups for p in group["params"]}
        expected = {id(p) for p in model.parameters() if p.requires_grad}
        assert handed == expected, name


def test_adamw_respects_fused() -> None:
    model = tiny_llama()
    default = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert not default.defaults["fused"] and default.defaults["foreach"]
    fused = build_optimizer(model, OptimConfig(fused=True), torch.device("cpu"))
    assert fused.defaults["fused"]


@pytest.mark.parametrize("foreach", [True, False])
def test_lion_matches_the_update_by_hand(foreach: bool) -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = Lion([param], lr=0.1, betas=(0.9, 0.99), weight_decay=0.1, foreach=foreach)
    # Step 1, m = 0: update = sign(0.1 g) = sign(g); p = p (1 - lr wd) - lr update.
    param.grad = torch.tensor([0.5, -0.1])
    optimizer.step()
    torch.testing.assert_close(param.data, torch.tensor([0.89, -1.88]))
    momentum = optimizer.state[param]["exp_avg"]
    torch.testing.assert_close(momentum, torch.tensor([0.005, -0.001]))  # 0.01 g
    # Step 2: 0.9 m + 0.1 g = [0.0044, 0.0291] is positive in both elements, so the first
    # element steps down although its own gradient is negative (the momentum wins).
    param.grad = torch.tensor([-0.001, 0.3])
    optimizer.step()
    torch.testing.assert_close(param.data, torch.tensor([0.89 * 0.99 - 0.1, -1.88 * 0.99 - 0.1]))
    torch.testing.assert_close(momentum, torch.tensor([0.00494, 0.00201]))  # 0.99 m + 0.01 g


@pytest.mark.parametrize("name", list(LEARNING_RATES))
def test_state_dict_round_trip_gives_the_same_next_step(name: str) -> None:
    cfg = OptimConfig(name=name, lr=LEARNING_RATES[name], weight_decay=0.01)
    model = tiny_llama()
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    train_steps(model, optimizer, 3)
    saved_weights = copy.deepcopy(model.state_dict())
    saved_state = copy.deepcopy(optimizer.state_dict())

    fresh = tiny_llama(seed=123)  # different init: everything must come from the saved state
    fresh.load_state_dict(saved_weights)
    fresh_optimizer = build_optimizer(fresh, cfg, torch.device("cpu"))
    fresh_optimizer.load_state_dict(saved_state)

    train_steps(model, optimizer, 1)
    train_steps(fresh, fresh_optimizer, 1)
    for (name_a, a), (name_b, b) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert name_a == name_b
        assert torch.equal(a, b), name_a


def names_of(model: torch.nn.Module, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(family: str, tied: bool) -> None:
    heads = {} if family == "llama" else {"num_kv_heads": 4}
    model = tiny_llama(tie_embeddings=tied, family=family, **heads)
    optimizer = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    muon = names_of(model, [p for g in optimizer.muon.param_groups for p in g["params"]])
    adamw_groups = optimizer.adamw.param_groups
    decayed = names_of(model, adamw_groups[0]["params"]) if not tied else set()
    every = {name for name, _ in model.named_parameters()}  # a tied head is listed once
    # The reference: by name, the way the Decoder lays out its weights.
    blocks = {n for n in every if n.startswith("layers.")}
    assert muon == {n for n in blocks if model.get_parameter(n).ndim == 2}
    projections = ("qkv.weight", "out.weight", "up.weight", "down.weight", "gate.weight")
    assert all(n.endswith(projections) for n in muon)
    assert decayed == ({"lm_head.weight"} if not tied else set())
    adamw = names_of(model, [p for g in adamw_groups for p in g["params"]])
    assert muon.isdisjoint(adamw) and muon | adamw == every
    assert "embed.weight" in adamw and ("pos_embed.weight" in adamw) == (family == "gpt2")
    # One optimizer to the rest of the loop: every group, each parameter once.
    handed = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(handed) == len(set(handed)) == len(every)


def test_the_schedule_reaches_both_halves_of_muon() -> None:
    model = tiny_llama()
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.04, warmup_steps=4, schedule="constant")
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg, max_steps=10)
    train_steps(model, optimizer, 1)
    scheduler.step()  # step 1 of a 4-step warmup: half the peak
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.04 * 2 / 4)
    assert optimizer.adamw.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 4)
    # A reload gives the children new group dicts; the schedule must still reach them.
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    scheduler.step()
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.04 * 3 / 4)
    assert optimizer.adamw.param_groups[-1]["lr"] == pytest.approx(1e-3 * 3 / 4)
    first_matrix = optimizer.muon.param_groups[0]["params"][0]
    assert "momentum_buffer" in optimizer.state[first_matrix]  # the joint state view


def test_muon_with_lora_is_a_config_error() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(enabled=True), "llama")
    with pytest.raises(ConfigError, match="optim.name: 'muon' does not train LoRA adapters"):
        build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    # ... and `truthgpt validate` says so too, before any data or model is built.
    with pytest.raises(ConfigError, match="optim.name: 'muon' does not train LoRA adapters"):
        load({"optim": {"name": "muon"}, "model": {"lora": {"enabled": True}}})


def test_muon_vs_adamw_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    # Keeps benchmarks/muon_vs_adamw.py in step with the Trainer (a smoke run: the numbers are
    # the GPU's business).
    out = tmp_path / "bench.json"
    script = Path(__file__).parents[1] / "benchmarks" / "muon_vs_adamw.py"
    args = ["--tiny", "--steps", "20", "--json", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "time to target, adamw / muon" in done.stdout
    results = json.loads(out.read_text())
    for name in ("adamw", "muon"):
        first, last = results[name]["evals"][0], results[name]["evals"][-1]
        assert last[0] == 20 and last[2] < first[2]  # both trained downhill
    # Same initial weights and validation blocks: the step-0 losses are the same number.
    assert results["adamw"]["evals"][0] == results["muon"]["evals"][0]
