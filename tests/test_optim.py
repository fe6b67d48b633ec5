"""Optimizers by name: each trains a tiny llama downhill, Lion matches the paper's update by
hand, and every optimizer's state survives a state_dict round trip exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from truthgpt.config import OptimConfig
from truthgpt.models.decoder import Decoder, DecoderConfig
from truthgpt.training.optim import Lion, build_optimizer

VOCAB = 64
# A learning rate that suits each optimizer on this tiny model (Lion's unit-size updates want a
# smaller one than AdamW's; plain SGD a much larger one).
LEARNING_RATES = {"adamw": 3e-3, "lion": 3e-3, "adafactor": 3e-2, "sgd": 0.5}


def tiny_llama(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
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


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "sgd"])
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


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "sgd"])
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
