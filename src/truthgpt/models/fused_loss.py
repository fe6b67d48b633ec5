"""Linear + cross-entropy in row chunks, never holding the whole logits tensor.

The LM head's logits are the largest activation of a small model: 16 x 1024 tokens x 50,304
vocabulary is 1.6 GB in bf16 per micro-batch, read and written several times over by the
loss, its fp32 upcast and their gradients (8.6% of GPT-2 124M's step on an H200,
benchmarks/RESULTS.md). Here each chunk of rows gets its logits, its share of the loss and the
gradients of the hidden states and of the head's weight at once, in the forward pass (the
approach of Liger-Kernel's fused linear cross-entropy); the backward pass only scales them.
The loss equals `F.cross_entropy` over the whole fp32 logits (mean over targets that are not
the ignored label); the logits themselves are not returned.

Between the two GEMMs of a chunk, the loss and the logits' gradient come from one Triton
kernel where Triton runs (`cross_entropy_rows`): it reads the bf16 logits twice and writes
their gradient once, where PyTorch's steps (fp32 upcast, logsumexp, gather, exp, scatter, mask,
downcast) make some ten passes over a 4-byte copy. Elsewhere the PyTorch steps run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from truthgpt.models.paged_kernels import _INTERPRET, _jit, tl, triton

# Columns of the vocabulary a program holds at once; 50,304 is 13 tiles of 4,096.
_VOCAB_BLOCK = 4096
# Rows of a chunk. 8,192 made the loss alone faster (1.15x plain vs 1.10x on GPT-2's head, H200)
# but not GPT-2's training step (527k tokens/s either way), and doubles the chunk's logits and
# their gradient (1.6 GB at 50,304 columns, 4.2 GB at Llama 3's 128,256): memory decides.
CHUNK_ROWS = 4096


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int,
    chunk_rows: int = CHUNK_ROWS,
    kernel: bool | None = None,
) -> Tensor:
    """Mean cross entropy of `hidden @ weight.T` [N, V] against `labels` [N], rows labelled
    `ignore_index` skipped; hidden [N, D], weight [V, D]. Matmuls run in the autocast dtype
    when autocast is on. `kernel`: the Triton cross-entropy or the PyTorch steps; None takes
    the kernel where `loss_kernel_available`."""
    if kernel is None:
        kernel = loss_kernel_available(hidden.device)
    elif kernel and not loss_kernel_available(hidden.device):
        raise ValueError(f"the Triton cross-entropy kernel does not run on {hidden.device}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_rows, kernel)


def loss_kernel_available(device: torch.device) -> bool:
    """Whether the Triton loss kernel runs on `device`: any CUDA GPU (it needs no tensor-core
    dot), or the CPU under the interpreter. A static check, so torch.compile traces it."""
    return triton is not None and (device.type == "cuda" or (device.type == "cpu" and _INTERPRET))


def fused_loss_note(device: torch.device) -> str:
    """One line for the run's log: which path the fused loss takes on `device`."""
    if loss_kernel_available(device):
        return "training.fused_loss: chunked head GEMMs around a Triton cross-entropy kernel"
    why = "triton is not installed" if triton is None else f"no Triton kernel on {device.type}"
    return f"training.fused_loss: chunked head GEMMs, cross-entropy in PyTorch ({why})"


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        ignore_index: int,
        chunk_rows: int,
        kernel: bool,
    ) -> Tensor:
        device = hidden.device.type
        compute = (
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        )
        with torch.autocast(device, enabled=False):
            w = weight.to(compute)
            valid = labels != ignore_index
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h = hidden[rows].to(compute)
                logits = h @ w.T
                if kernel:
                    losses, grad = torch.ops.truthgpt.cross_entropy_rows(
                        logits, labels[rows], ignore_index
                    )
                else:
                    losses, grad = _cross_entropy_rows_torch(logits, labels[rows], ignore_index)
                total += losses.sum()
                grad_hidden[rows] = (grad @ w).to(hidden.dtype)
                grad_weight += (grad.T @ h).float()
        count = valid.sum().clamp(min=1).float()
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count
        return (
            grad_hidden * scale.to(grad_hidden.dtype),
            (grad_weight * scale).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
        )


def _cross_entropy_rows_torch(
    logits: Tensor, labels: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Per-row loss (fp32, 0 where ignored) and d loss / d logits in the logits' dtype."""
    ok = labels != ignore_index
    target = torch.where(ok, labels, 0)[:, None]
    logits32 = logits.float()
    lse = torch.logsumexp(logits32, dim=-1, keepdim=True)
    losses = (lse - logits32.gather(1, target)).squeeze(1) * ok
    # d(lse - logit_y)/d logits = softmax - onehot(y); rows without a target: 0.
    grad = torch.exp(logits32 - lse)
    grad.scatter_add_(1, target, torch.full_like(lse, -1.0))
    return losses, (grad * ok[:, None]).to(logits.dtype)


@torch.library.custom_op("truthgpt::cross_entropy_rows", mutates_args=())
def _cross_entropy_rows(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    # An opaque op to torch.compile: Inductor schedules it between the GEMMs it compiles.
    num_rows, vocab = logits.shape
    losses = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits)
    if num_rows:
        logits = logits.contiguous()
        _cross_entropy_rows_kernel[(num_rows,)](
            logits, labels.contiguous(), losses, grad, vocab, ignore_index, BLOCK=_VOCAB_BLOCK
        )
    return losses, grad


@_cross_entropy_rows.register_fake
def _(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    return logits.new_empty(logits.shape[0], dtype=torch.float32), torch.empty_like(logits)


@_jit
def _cross_entropy_rows_kernel(
    logits_ptr, labels_ptr, losses_ptr, grad_ptr, vocab, ignore_index, BLOCK: tl.constexpr
):
    # One program per row, two passes over it: an online max and sum of exponentials give the
    # log-sum-exp (Milakov & Gimelshein 2018), then softmax - onehot(target) is written.
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * vocab
    grad_ptr += row * vocab
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK)
    if label == ignore_index:
        # A prompt token: no loss, no gradient.
        for start in range(0, vocab, BLOCK):
            mask = start + cols < vocab
            zero = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
            tl.store(grad_ptr + start + cols, zero, mask=mask)
        tl.store(losses_ptr + row, 0.0)
    else:
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, vocab, BLOCK):
            mask = start + cols < vocab
            x = tl.load(logits_ptr + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
                tl.exp(x - new_max), axis=0
            )
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        target_logit = tl.load(logits_ptr + label).to(tl.float32)
        tl.store(losses_ptr + row, lse - target_logit)
        for start in range(0, vocab, BLOCK):
            mask = start + cols < vocab
            x = tl.load(logits_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(start + cols == label, 1.0, 0.0)
            tl.store(grad_ptr + start + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
