"""Gradient accumulation weighs every target token of a step the same, however the
micro-batches split them: the reference is the gradient of one big batch."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from conftest import tiny_raw_config

from truthgpt.config import load
from truthgpt.data import prepare_data
from truthgpt.data.packing import IGNORE_INDEX
from truthgpt.training.run_folder import prepare_run_dir
from truthgpt.training.trainer import Trainer, build_model


def uneven_micro_batches(blocks: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of the same shape whose target counts differ about tenfold, as SFT
    batches do (answers of different lengths)."""
    first, second = blocks[:4], blocks[4:8]
    labels_first = first.clone()
    labels_second = second.clone()
    labels_second[:, : second.shape[1] - 4] = IGNORE_INDEX  # only the last few tokens count
    labels_second[0] = IGNORE_INDEX  # a row with no target at all
    return [
        {"input_ids": first, "labels": labels_first},
        {"input_ids": second, "labels": labels_second},
    ]


def test_accumulated_uneven_micro_batches_give_the_big_batch_gradient(tmp_path: Path) -> None:
    config = load(
        tiny_raw_config(
            tmp_path,
            training={"grad_accum_steps": 2, "batch_size": 4},
            logging={"progress": "none", "tensorboard": False, "plot": False},
        )
    )
    prepare_run_dir(config, overwrite=False)
    data = prepare_data(config, config.run_dir, log=lambda message: None)
    model = build_model(config, vocab_size=len(data.tokenizer))
    reference = copy.deepcopy(model)
    trainer = Trainer(config, model, data, torch.device("cpu"), config.run_dir, callbacks=[])
    blocks = torch.stack([data.train[i]["input_ids"] for i in range(8)])
    micro = uneven_micro_batches(blocks)
    trainer.batches = iter(micro)
    loss, _ = trainer.accumulate_gradients()

    whole = {key: torch.cat([m[key] for m in micro]) for key in micro[0]}
    expected_loss = reference(**whole).loss
    expected_loss.backward()
    assert torch.allclose(loss, expected_loss.detach(), rtol=1e-5, atol=1e-6)
    grads = dict(trainer.model.named_parameters())
    for name, param in reference.named_parameters():
        assert torch.allclose(grads[name].grad, param.grad, rtol=1e-4, atol=1e-7), name

    # The test has teeth: the mean of the two micro-batch means is another gradient.
    naive = copy.deepcopy(reference)
    naive.zero_grad()
    for m in micro:
        (naive(**m).loss / len(micro)).backward()
    differs = [
        not torch.allclose(p.grad, q.grad, rtol=1e-2)
        for p, q in zip(naive.parameters(), reference.parameters())
    ]
    assert any(differs)
