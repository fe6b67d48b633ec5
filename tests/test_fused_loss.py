"""The chunked linear + cross-entropy (`training.fused_loss`) against the plain loss on the same
weights: the same loss and the same gradient for every parameter, with ignored labels, tied
and untied heads, chunks that do not divide the rows; and a run trained with it follows the
plain run's losses."""

from __future__ import annotations

import copy

import pytest
import torch

from truthgpt.config import load
from truthgpt.errors import ConfigError
from truthgpt.models.decoder import IGNORE_INDEX, Decoder, DecoderConfig
from truthgpt.models.fused_loss import linear_cross_entropy
from truthgpt.training.tasks import build_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_equals_the_plain_loss_and_gradients(family: str, tie: bool) -> None:
    torch.manual_seed(0)
    config = DecoderConfig(
        family=family, vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2 if family == "llama" else None, intermediate_size=64,
        max_position_embeddings=64, tie_embeddings=tie,
    )  # fmt: skip
    plain = Decoder(config)
    fused = copy.deepcopy(plain)
    fused.fused_loss = True
    ids = torch.randint(0, 97, (3, 21))
    labels = ids.clone()
    labels[0, :7] = IGNORE_INDEX  # a prompt that is not trained on
    labels[2, -3:] = IGNORE_INDEX

    expected = plain(ids, labels=labels).loss
    expected.backward()
    out = fused(ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation still gets its logits
        assert fused(ids, labels=labels).logits.shape == (3, 21, 97)


def test_chunks_that_do_not_divide_the_rows_and_all_ignored_rows() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    labels = torch.randint(0, 13, (10,))
    labels[3] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, labels, IGNORE_INDEX, chunk_rows=4)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, labels)
    torch.testing.assert_close(loss, reference)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected = torch.autograd.grad(reference, (hidden, weight))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    nothing = torch.full((10,), IGNORE_INDEX)
    assert linear_cross_entropy(hidden, weight, nothing, IGNORE_INDEX).item() == 0.0


def test_the_switch_reaches_the_model_and_refuses_transformers_models() -> None:
    import transformers

    from truthgpt.training.tasks import prepare_model_for_training

    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "max_position_embeddings": 64}
    config = load({"model": tiny, "training": {"fused_loss": True}})
    assert build_model(config, vocab_size=64).fused_loss
    hf_model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    )
    with pytest.raises(ConfigError, match="training.fused_loss"):
        prepare_model_for_training(hf_model, config)
