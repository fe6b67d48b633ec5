"""Linear + cross-entropy in row chunks, never holding the whole logits tensor.

The LM head's logits are the largest activation of a small model: 16 x 1024 tokens x 50,304
vocabulary is 1.6 GB in bf16 per micro-batch, read and written several times over by the
loss, its fp32 upcast and their gradients (8.6% of GPT-2 124M's step on an H200,
benchmarks/RESULTS.md). Here each chunk of rows gets its logits, its share of the loss and the
gradients of the hidden states and of the head's weight at once, in the forward pass (the
approach of Liger-Kernel's fused linear cross-entropy); the backward pass only scales them.
The loss equals `F.cross_entropy` over the whole fp32 logits (mean over targets that are not
the ignored label); the logits themselves are not returned.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk_rows: int = 4096
) -> Tensor:
    """Mean cross entropy of `hidden @ weight.T` [N, V] against `labels` [N], rows labelled
    `ignore_index` skipped; hidden [N, D], weight [V, D]. Matmuls run in the autocast dtype
    when autocast is on."""
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk_rows: int
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
                h, ok = hidden[rows].to(compute), valid[rows]
                target = torch.where(ok, labels[rows], 0)[:, None]
                logits = (h @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                total += ((lse - logits.gather(1, target)).squeeze(1) * ok).sum()
                # d(lse - logit_y)/d logits = softmax - onehot(y); rows without a target: 0.
                grad = torch.exp(logits - lse)
                grad.scatter_add_(1, target, torch.full_like(lse, -1.0))
                grad = (grad * ok[:, None]).to(compute)
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
        )
