"""FlexAttention for packed documents (`training.packed_attention`): a block-sparse mask instead
of a dense one.

Packed rows attend causally *and* inside each document. As a dense boolean mask [B, 1, T, T]
that rule pushes `scaled_dot_product_attention` off its flash kernel onto one that reads the
O(T^2) mask. FlexAttention (Dong et al. 2024, "Flex Attention: A Programming Model for
Generating Optimized Attention Kernels") takes the rule as a `mask_mod` function instead: a
`BlockMask` built once per forward records which 128 x 128 tiles are empty, full or partial,
and the generated kernel skips the empty ones (most of them, with documents far shorter than T).

On CUDA the mask building and the attention run `torch.compile`d (uncompiled, flex_attention
materialises the whole score matrix). Elsewhere they run eagerly and forward only: torch has no
CPU backward for FlexAttention, so a CPU can check the logits but not train on this path.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from truthgpt.errors import ConfigError

log = logging.getLogger(__name__)

PACKED_ATTENTION = ("auto", "dense", "flex")
_BLOCK_SIZE = 128  # create_block_mask's default tile, queries and keys alike
# Looked up once: a constant costs nothing where torch.compile traces the decoder's forward.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

__all__ = ["BlockMask", "document_block_mask", "flex_attend", "use_flex", "check_flex_training"]


# Inductor's flex kernel multiplies with tl.dot, whose inner size is at least 16: a smaller head
# is refused at compile time ("NYI: embedding dimension ... must be at least 16", torch 2.11).
FLEX_MIN_HEAD_DIM = 16


def flex_available(device: torch.device) -> bool:
    """True where FlexAttention runs as a fused kernel: CUDA, with Triton to generate it."""
    return device.type == "cuda" and _TRITON_INSTALLED


def use_flex(setting: str, device: torch.device, dropout: float, head_dim: int) -> bool:
    """Whether a packed forward on `device` takes FlexAttention: `flex` always, `auto` where it
    runs fused, heads are wide enough for its kernel and there is no attention dropout
    (flex_attention has none), `dense` never."""
    if setting == "flex":
        return True
    if setting != "auto" or device.type != "cuda":
        return False
    if dropout > 0:
        _say_once("dropout > 0, which FlexAttention does not have")
        return False
    if not flex_available(device):
        _say_once("Triton, which generates FlexAttention's kernels, is not installed")
        return False
    if head_dim < FLEX_MIN_HEAD_DIM:
        _say_once(
            f"heads of {head_dim} dimensions are under the {FLEX_MIN_HEAD_DIM} its kernel needs"
        )
        return False
    return True


def check_flex_training(device: torch.device, head_dim: int | None = None) -> None:
    """ConfigError unless `training.packed_attention: flex` can train on `device` with heads of
    `head_dim` (None: not known yet, the device alone is checked)."""
    allowed = f"allowed: {', '.join(PACKED_ATTENTION)}"
    if not flex_available(device):
        why = "has no FlexAttention backward" if device.type != "cuda" else "lacks Triton"
        raise ConfigError(
            f"training.packed_attention: 'flex' trains on CUDA only, and {device} {why}; use "
            f"auto (flex on CUDA, dense elsewhere) or dense ({allowed})"
        )
    if head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM:
        raise ConfigError(
            f"training.packed_attention: 'flex' needs heads of at least {FLEX_MIN_HEAD_DIM} "
            f"dimensions (FlexAttention's CUDA kernel), and this model's are {head_dim} "
            f"(model.hidden_size / model.num_heads); use auto (dense for such heads) or dense "
            f"({allowed})"
        )


# Built outside a compiled model's graph (a graph break; torchtitan builds it outside too): inductor
# (torch 2.13, seen on CPU) cannot lower flex_attention whose mask reads a tensor computed in the
# same graph. The BlockMask then enters the graph as an input.
@torch.compiler.disable
def document_block_mask(segment: Tensor) -> BlockMask:
    """The BlockMask of causal attention inside each document, for segment indices [B, T] (the
    first output of `document_positions`): query q sees key k when k <= q in the same segment."""
    batch, seq_len = segment.shape
    # Padded to whole tiles with a segment no token has: the kernel evaluates the rule on the
    # last tile's indices past T too, and those reads must stay inside the tensor.
    segment = F.pad(segment, (0, -seq_len % _BLOCK_SIZE), value=-1)

    def causal_in_document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (segment[b, q_idx] == segment[b, kv_idx])

    build = _compiled_create_block_mask() if segment.is_cuda else create_block_mask
    return build(causal_in_document, batch, None, seq_len, seq_len, device=segment.device)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, enable_gqa: bool) -> Tensor:
    """flex_attention over q [B, H, T, D] and k, v [B, H_kv, T, D] (H_kv divides H with
    enable_gqa), compiled on CUDA; the same scale 1/sqrt(D) as SDPA."""
    attend = _compiled_flex_attention() if q.is_cuda else flex_attention
    # Contiguous: compiled flex_attention has given wrong results for strided inputs (seen on
    # CPU), and q/k/v here are transposed views of the fused qkv projection.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return attend(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


# Compiled once per process, on first use. dynamic=False: packed blocks keep one shape, and a
# new batch size (a last, smaller batch) costs one recompile rather than slower symbolic kernels.
@functools.cache
def _compiled_flex_attention():  # torch.compile's wrapper of flex_attention
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _compiled_create_block_mask():
    return torch.compile(create_block_mask, dynamic=False)


@functools.cache
def _say_once(reason: str) -> None:
    log.warning(
        "training.packed_attention auto: %s; packed documents take the dense attention mask",
        reason,
    )
