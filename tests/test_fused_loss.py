"""The chunked linear + cross-entropy (`training.fused_loss`) against the plain loss on the same
weights: the same loss and the same gradient for every parameter, with ignored labels, tied
and untied heads, chunks that do not divide the rows; and a run trained with it follows the
plain run's losses. Its Triton cross-entropy kernel against the PyTorch steps it replaces: in
the interpreter on CPU (tests/triton_interpreter.py's subprocess) and on CUDA (`-m gpu`)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from truthgpt.config import load
from truthgpt.errors import ConfigError
from truthgpt.models import fused_loss
from truthgpt.models.decoder import IGNORE_INDEX, Decoder, DecoderConfig
from truthgpt.models.fused_loss import (
    _cross_entropy_rows_torch,
    fused_loss_note,
    linear_cross_entropy,
    loss_kernel_available,
)
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

    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "max_position_embeddings": 256}
    config = load({"model": tiny, "training": {"fused_loss": True}})
    assert build_model(config, vocab_size=64).fused_loss
    hf_model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    )
    with pytest.raises(ConfigError, match="training.fused_loss"):
        prepare_model_for_training(hf_model, config)


def test_auto_is_on_only_where_the_triton_kernel_runs(monkeypatch) -> None:
    """The default: the kernel made the GPT-2 step 5% faster on an H200, while the chunked
    PyTorch loss alone is slower than the plain one, so auto follows the kernel; a
    transformers model under auto keeps its own loss, with no error."""
    import transformers

    from truthgpt.training.tasks import prepare_model_for_training, uses_fused_loss

    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "max_position_embeddings": 256}
    config = load({"model": tiny, "hardware": {"device": "cpu"}})
    assert config.training.fused_loss == "auto"
    monkeypatch.setattr(fused_loss, "_INTERPRET", False)  # a CPU without Triton's interpreter
    assert not build_model(config, vocab_size=64).fused_loss
    if HAS_TRITON:  # under the interpreter the kernel runs on the CPU: auto turns it on
        monkeypatch.setattr(fused_loss, "_INTERPRET", True)
        model = build_model(config, vocab_size=64)
        assert model.fused_loss and uses_fused_loss(config, model)
    hf_model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    )
    assert not hasattr(prepare_model_for_training(hf_model, config), "fused_loss")
    with pytest.raises(ConfigError, match="fused_loss"):
        load({"training": {"fused_loss": "fast"}})


# --- the Triton cross-entropy kernel ------------------------------------------------------------

HAS_TRITON = fused_loss.triton is not None


def check_kernel_rows(device: str) -> None:
    """The kernel's per-row losses and logits gradient equal the PyTorch steps', in fp32 and
    bf16, with ignored rows and a vocabulary that is not a multiple of the kernel's tile."""
    gen = torch.Generator().manual_seed(0)
    vocab = fused_loss._VOCAB_BLOCK + 905
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(6, vocab, generator=gen) * 5).to(device=device, dtype=dtype)
        labels = torch.randint(0, vocab, (6,), generator=gen).to(device)
        labels[1] = IGNORE_INDEX
        labels[4] = vocab - 1  # the target in the last, partial tile
        got_losses, got_grad = torch.ops.truthgpt.cross_entropy_rows(logits, labels, IGNORE_INDEX)
        want_losses, want_grad = _cross_entropy_rows_torch(logits, labels, IGNORE_INDEX)
        assert got_grad.dtype == dtype and got_losses.dtype == torch.float32
        assert got_losses[1] == 0 and not got_grad[1].any()  # an ignored row: no loss, no grad
        torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=1e-5)
        # bf16: one rounding of the gradient (softmax - onehot lies in [-1, 1]).
        tol = 1e-6 if dtype == torch.float32 else 4e-3
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=0, atol=tol)
    torch.library.opcheck(torch.ops.truthgpt.cross_entropy_rows, (logits, labels, IGNORE_INDEX))


def check_kernel_loss_and_gradients(device: str) -> None:
    """linear_cross_entropy on the kernel: F.cross_entropy's loss and gradients, eager and
    compiled, and the path note says the kernel runs."""
    assert loss_kernel_available(torch.device(device))
    assert "Triton" in fused_loss_note(torch.device(device))
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=gen).to(device).requires_grad_()
    weight = torch.randn(301, 16, generator=gen).to(device).requires_grad_()
    labels = torch.randint(0, 301, (37,), generator=gen).to(device)
    labels[:9] = IGNORE_INDEX
    reference = F.cross_entropy(hidden @ weight.T, labels)
    expected = torch.autograd.grad(reference, (hidden, weight))
    compiled = torch.compile(linear_cross_entropy, fullgraph=True)
    for run in (linear_cross_entropy, compiled):
        loss = run(hidden, weight, labels, IGNORE_INDEX, 16)
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
        for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


KERNEL_CHECKS = {"rows": check_kernel_rows, "loss": check_kernel_loss_and_gradients}


def test_without_the_interpreter_the_cpu_takes_the_pytorch_steps_and_says_so() -> None:
    assert not loss_kernel_available(torch.device("cpu"))
    assert "cross-entropy in PyTorch" in fused_loss_note(torch.device("cpu"))
    hidden, weight = torch.randn(4, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match="does not run on cpu"):
        linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=torch.long), -100, kernel=True)


def test_benchmark_runs_on_cpu() -> None:
    # Keeps benchmarks/fused_loss.py in step with the loss (a smoke run, no timing): where the
    # kernel cannot run, its row says so and the others are measured.
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "fused_loss.py")
    args = ["--tiny", "--steps", "3", "--warmup", "1", "--repeats", "2", "--chunk-rows", "100"]
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| chunked-torch 100 |" in done.stdout and "does not run on cpu" in done.stdout
    losses = {line.split("|")[4].strip() for line in done.stdout.splitlines() if "x |" in line}
    assert len(losses) == 1  # plain and chunked: the same loss


INTERPRETER_CHECKS = list(KERNEL_CHECKS)


def run_in_interpreter(name: str) -> None:
    KERNEL_CHECKS[name]("cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_loss_kernel_in_triton_interpreter(triton_interpreter) -> None:
    passed, output = triton_interpreter[__name__]
    assert passed, output


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA GPU"
)
@pytest.mark.parametrize("check", list(KERNEL_CHECKS))
def test_loss_kernel_on_cuda(check: str) -> None:
    KERNEL_CHECKS[check]("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA GPU"
)
def test_fused_loss_on_cuda_in_bf16_follows_the_plain_loss_at_gpt2_vocabulary() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2048, 256, device="cuda", requires_grad=True)
    weight = (torch.randn(50304, 256, device="cuda") * 0.02).requires_grad_()
    labels = torch.randint(0, 50257, (2048,), device="cuda")
    labels[:100] = IGNORE_INDEX
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = F.cross_entropy((hidden @ weight.T).float(), labels)
        loss = linear_cross_entropy(hidden, weight, labels, IGNORE_INDEX, chunk_rows=1000)
    expected = torch.autograd.grad(reference, (hidden, weight))
    torch.testing.assert_close(loss, reference, rtol=2e-3, atol=2e-3)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), expected, strict=True):
        # Both round their bf16 products differently; the error is that of bf16, ~0.4%.
        assert ((got - want).norm() / want.norm()).item() < 1e-2
