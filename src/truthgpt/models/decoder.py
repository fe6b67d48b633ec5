"""The native decoder: Llama-family and GPT-2 transformers in one file, read top to bottom.

One `Decoder` class covers both families through `DecoderConfig` fields (as litgpt does):

- llama (also Mistral and Qwen2 shapes): token embedding, RoPE, RMSNorm, grouped-query attention,
  SwiGLU MLP, no biases (Qwen2: q/k/v biases).
- gpt2: token + learned absolute position embeddings, LayerNorm, multi-head attention, GELU
  (tanh approximation, HF "gelu_new") MLP, biases everywhere.

Every numeric convention follows the Hugging Face implementations (RoPE's rotate_half layout,
RMSNorm computed in fp32, loss shifted inside) so weights move to and from `transformers`
through `hf_io.py` and give the same logits. Attention goes through PyTorch's
`scaled_dot_product_attention`, which picks a flash / memory-efficient kernel where it can.

Generation uses a static KV cache (as gpt-fast does): `Decoder.new_cache()` preallocates
k/v for every layer and `forward(..., cache=cache, start_pos=p)` writes the new tokens at
positions p.. and attends over everything before them.

Packed training (several examples in one row) passes `document_ids` [B, T]: attention stays
causal *and* inside each document, and positions restart at 0 where a document starts, so each
example sees exactly what it would see alone. `attention_mask` (HF style, 1 = token, 0 = pad)
is for left padding: pads are hidden from every query and positions count real tokens only.
Right padding needs no mask: causal attention never lets a real token see the pads after it.

The document rule as a dense boolean mask [B, 1, T, T] keeps SDPA off its flash kernel. With
`packed_attention` "flex" (or "auto" on CUDA) it becomes one FlexAttention `BlockMask` per
forward instead, shared by every layer, and the kernel skips the tiles the mask leaves empty
(models/flex_attention.py); positions restart per document exactly as on the dense path.

Parameter names (the weight maps in hf_io.py depend on them):
    embed.weight, pos_embed.weight (gpt2), norm.{weight,bias}, lm_head.weight,
    layers.N.{attn_norm,mlp_norm}.{weight,bias},
    layers.N.attn.qkv.{weight,bias}   fused [q; k; v] rows: (num_heads + 2*num_kv_heads)*head_dim
    layers.N.attn.out.{weight,bias},
    layers.N.mlp.{gate,up,down}.{weight,bias}   (gpt2 has no gate)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from truthgpt.errors import ConfigError, RequestError
from truthgpt.models.attention import AttentionBatch, PagedKVCache, attend_paged, paged_attention
from truthgpt.models.flex_attention import BlockMask, document_block_mask, flex_attend, use_flex
from truthgpt.models.fused_loss import linear_cross_entropy

FAMILIES = ("llama", "gpt2")
IGNORE_INDEX = -100  # the label value Hugging Face (and torch's cross_entropy) skips

# `enable_gqa` lets SDPA broadcast k/v heads itself (torch >= 2.5); older versions need k/v
# repeated to the query head count first.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class DecoderConfig:
    """The shape of a decoder. Bias flags left as None take the family's default."""

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: num_heads (plain multi-head attention)
    intermediate_size: int = 704
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    # HF rope_parameters for the scaled variants we reproduce exactly: {"rope_type": "linear",
    # "factor"} or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}. None: plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    qkv_bias: bool | None = None  # llama: False (Qwen2: True); gpt2: True
    out_bias: bool | None = None  # attention output projection; llama False, gpt2 True
    mlp_bias: bool | None = None  # llama False, gpt2 True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"decoder family {self.family!r} is not one of {', '.join(FAMILIES)}")
        gpt2 = self.family == "gpt2"
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        self.qkv_bias = gpt2 if self.qkv_bias is None else self.qkv_bias
        self.out_bias = gpt2 if self.out_bias is None else self.out_bias
        self.mlp_bias = gpt2 if self.mlp_bias is None else self.mlp_bias
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        if gpt2 and self.num_kv_heads != self.num_heads:
            raise ConfigError("gpt2 has no grouped-query attention: num_kv_heads must be num_heads")
        if self.head_dim % 2 and not gpt2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class DecoderOutput:
    """Logits [B, T, vocab] in the model's dtype; loss (fp32 scalar) when labels were given.
    With `fused_loss` on, a training forward returns the loss alone (logits None)."""

    logits: Tensor | None
    loss: Tensor | None = None


@dataclass
class KVCache:
    """Preallocated keys and values, each [num_layers, batch, num_kv_heads, max_len, head_dim]."""

    k: Tensor
    v: Tensor

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross entropy, Hugging Face convention: logits[:, :-1] predict labels[:, 1:].

    Computed in fp32 and averaged over the labels that are not -100, so it equals the loss that
    `transformers` reports for the same logits and labels.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


# ---------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), in fp32 and cast back as HF's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The cast back happens before the weight multiply, as in HF, so bf16 results match.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: DecoderConfig, device: torch.device | None = None) -> Tensor:
    """RoPE inverse frequencies theta^(-2i/d) (Su et al. 2021), with linear / llama3 scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":  # position interpolation (Chen et al. 2023)
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between (as in
    # Meta's reference code and transformers' _compute_llama3_parameters).
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(cfg: DecoderConfig, start_pos: int, seq_len: int, device: torch.device) -> Tensor:
    """cos and sin for positions start_pos.., stacked as [2, seq_len, head_dim], in fp32.

    Computed per forward rather than kept in a buffer: a few tiny kernels, and a buffer would be
    rounded by `model.to(torch.bfloat16)` (bf16 angles are wrong by radians at position 1000)
    and would need rebuilding after loading on the meta device.
    """
    positions = torch.arange(start_pos, start_pos + seq_len, device=device, dtype=torch.float32)
    freqs = positions[:, None] * rope_inv_freq(cfg, device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)  # HF layout: the two halves share frequencies
    return torch.stack((emb.cos(), emb.sin()))


def rope_cos_sin_at(cfg: DecoderConfig, positions: Tensor) -> Tensor:
    """cos and sin for per-row positions [B, T], as [2, B, 1, T, head_dim] in fp32 (the 1
    broadcasts over heads); the same arithmetic as `rope_cos_sin`, so equal positions give
    bit-equal angles."""
    freqs = positions.float()[..., None] * rope_inv_freq(cfg, positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((emb.cos(), emb.sin()))[:, :, None]


def rope_cos_sin_half(cfg: DecoderConfig, positions: Tensor) -> Tensor:
    """cos and sin of positions [N] as [2, N, head_dim // 2] fp32: the one half of the angles
    that the fused RoPE kernel reads (the same arithmetic as `rope_cos_sin_at`)."""
    freqs = positions.float()[:, None] * rope_inv_freq(cfg, positions.device)
    return torch.stack((freqs.cos(), freqs.sin()))


def document_positions(document_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(segment index, position in segment) for document_ids [B, T], both [B, T].

    A segment starts wherever the id changes from the previous token, so ids need only differ
    between neighbours; positions count 0, 1, ... from each segment start.
    """
    seq_len = document_ids.shape[1]
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    index = torch.arange(seq_len, device=document_ids.device).expand_as(document_ids)
    start_index = torch.cummax(torch.where(starts, index, 0), dim=1).values
    return starts.long().cumsum(dim=1), index - start_index


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, T, head_dim] by position (HF's rotate_half layout, so weights match)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention: grouped-query heads, one fused qkv projection, optional KV cache."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, qkv_rows, bias=cfg.qkv_bias)
        self.out = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.out_bias)

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None,
        mask: Tensor | BlockMask | None,
        kv_cache: tuple[Tensor, Tensor] | None,
        start_pos: int,
    ) -> Tensor:
        batch, seq_len, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope[0], rope[1]), apply_rope(k, rope[0], rope[1])

        if kv_cache is not None:
            cache_k, cache_v = kv_cache
            end = start_pos + seq_len
            cache_k[:batch, :, start_pos:end] = k
            cache_v[:batch, :, start_pos:end] = v
            k, v = cache_k[:batch, :, :end], cache_v[:batch, :, :end]

        if isinstance(mask, BlockMask):  # packed documents on FlexAttention (which has no dropout)
            y = flex_attend(q, k, v, mask, enable_gqa=self.num_kv_heads != self.num_heads)
            return self.out(y.transpose(1, 2).reshape(batch, seq_len, q_size))
        # Without a cache, or at a prefill from position 0, keys and queries are the same positions
        # and is_causal suffices. A single decode step sees every cached key. A chunk at
        # start_pos > 0 needs the explicit mask: SDPA's is_causal aligns to the top-left corner.
        is_causal = mask is None and seq_len > 1
        dropout_p = self.cfg.dropout if self.training else 0.0
        extra = {}
        if self.num_kv_heads != self.num_heads:
            if _SDPA_HAS_GQA:
                extra["enable_gqa"] = True
            else:  # query head i uses kv head i // repeats, as HF's repeat_kv
                repeats = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, **extra
        )
        y = y.transpose(1, 2).reshape(batch, seq_len, q_size)
        return self.out(y)

    def forward_paged(
        self,
        x: Tensor,
        rope: Tensor | None,
        k_cache: Tensor,
        v_cache: Tensor,
        batch: AttentionBatch,
    ) -> Tensor:
        """The engine's path: x [N, hidden] is a flat stream of the step's tokens; keys and
        values go to (and context comes from) the paged pool, as `batch` describes."""
        num_tokens = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope[0], rope[1]), apply_rope(k, rope[0], rope[1])
        y = paged_attention(q, k, v, k_cache, v_cache, batch)
        return self.out(y.reshape(num_tokens, q_size))

    def forward_paged_fused(
        self, x: Tensor, cos_sin: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch
    ) -> Tensor:
        """`forward_paged` with RoPE and the K/V store fused into one Triton kernel."""
        from truthgpt.models.fused_kernels import rope_store_kv

        qkv = self.qkv(x)
        q = rope_store_kv(
            qkv, cos_sin, k_cache, v_cache, batch.slot_mapping, self.num_heads, self.num_kv_heads
        )
        y = attend_paged(q, k_cache, v_cache, batch)
        return self.out(y.view(x.shape[0], -1))


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def fuse_gate_up(self) -> None:
        """Lay gate and up out as the two halves of one [2 * intermediate, hidden] tensor (their
        parameters become views of it: no extra memory), so inference runs one GEMM for both.
        Parameters sharing storage cannot be saved by safetensors as they are, so only the
        engine's own copy of a model is fused (see `LLM`)."""
        self._gate_up = {}
        for name in ("weight", "bias"):
            gate, up = getattr(self.gate, name), getattr(self.up, name)
            if gate is not None:
                fused = torch.cat((gate.data, up.data))
                gate.data, up.data = fused[: gate.shape[0]], fused[gate.shape[0] :]
                self._gate_up[name] = fused

    def _fused(self, name: str) -> Tensor | None:
        """The [gate | up] tensor while gate and up are still its halves, else None (never
        fused, or since moved by `.to()`)."""
        fused = getattr(self, "_gate_up", {}).get(name)
        gate, up = getattr(self.gate, name), getattr(self.up, name)
        if fused is None or gate is None:
            return None
        halves = fused[: gate.shape[0]], fused[gate.shape[0] :]
        if gate.data_ptr() != halves[0].data_ptr() or up.data_ptr() != halves[1].data_ptr():
            self._gate_up = {}  # stale: let it go
            return None
        return fused

    def forward_fused(self, x: Tensor) -> Tensor:
        """The MLP with a fused silu(gate) * up kernel (Triton), and one GEMM for gate and up
        when `fuse_gate_up` laid them out together."""
        from truthgpt.models.fused_kernels import silu_mul

        weight = self._fused("weight")
        if weight is None or (self.gate.bias is not None and self._fused("bias") is None):
            return self.down(silu_mul(self.gate(x), self.up(x)))
        gate_up = F.linear(x, weight, self._fused("bias"))
        width = gate_up.shape[-1] // 2
        return self.down(silu_mul(gate_up[:, :width], gate_up[:, width:]))


class GeluMLP(nn.Module):
    """GPT-2 MLP: down(gelu_tanh(up(x))); HF's "gelu_new" is the tanh approximation."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def _norm(cfg: DecoderConfig) -> nn.Module:
    if cfg.family == "gpt2":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _norm(cfg)
        self.mlp = GeluMLP(cfg) if cfg.family == "gpt2" else SwiGLU(cfg)

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None,
        mask: Tensor | BlockMask | None,
        kv_cache: tuple[Tensor, Tensor] | None,
        start_pos: int,
    ) -> Tensor:
        p, training = self.cfg.dropout, self.training
        attended = self.attn(self.attn_norm(x), rope, mask, kv_cache, start_pos)
        x = x + F.dropout(attended, p, training)
        return x + F.dropout(self.mlp(self.mlp_norm(x)), p, training)

    def forward_paged(
        self,
        x: Tensor,
        rope: Tensor | None,
        k_cache: Tensor,
        v_cache: Tensor,
        batch: AttentionBatch,
    ) -> Tensor:
        x = x + self.attn.forward_paged(self.attn_norm(x), rope, k_cache, v_cache, batch)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------
# The model


class Decoder(nn.Module):
    """A decoder-only language model of the llama or gpt2 family (see the module docstring)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.family == "gpt2":
            self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = False  # see set_gradient_checkpointing
        self.fused_loss = False  # training.fused_loss: the loss without materialised logits
        # training.packed_attention: how document_ids mask attention: "dense" (a boolean SDPA
        # mask), "flex" (a FlexAttention BlockMask) or "auto" (flex on CUDA, dense elsewhere).
        self.packed_attention = "dense"
        # training.residual_dtype: the residual stream's dtype; None: the embeddings' own.
        self.residual_dtype: torch.dtype | None = None

    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), zero biases, unit norms; residual output projections scaled by
        1/sqrt(2 * num_layers), one factor per residual add (Radford et al. 2019, section 2.3)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for block in self.layers:
            nn.init.normal_(block.attn.out.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=residual_std)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A zeroed KV cache for up to `batch_size` sequences of `max_len` tokens (prompt included);
        dtype and device default to the model's."""
        cfg = self.config
        if cfg.family == "gpt2" and max_len > cfg.max_position_embeddings:
            raise RequestError(
                f"max_len {max_len} exceeds gpt2's max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        weight = self.embed.weight
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        dtype, device = dtype or weight.dtype, device or weight.device
        return KVCache(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of keeping them (training
        only): memory per layer drops to the block input, for about one more forward of compute."""
        self.gradient_checkpointing = enabled

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        start_pos: int = 0,
        document_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> DecoderOutput:
        """Logits for input_ids [B, T] at positions start_pos..start_pos+T-1, loss when labels
        [B, T] are given (shifted inside, -100 ignored). With `cache`, the new keys/values are
        written at those positions and attention covers cache[:start_pos + T].

        document_ids [B, T]: packed examples; attention stays inside each run of equal ids and
        positions restart at 0 at each run (no cache). attention_mask [B, start_pos + T] (1 =
        token, 0 = padding, HF style, covering cached and new tokens): for left padding; pads
        are never attended to and positions count only real tokens.
        """
        cfg = self.config
        batch, seq_len = input_ids.shape
        end = start_pos + seq_len
        if cache is not None and (end > cache.max_len or batch > cache.batch_size):
            raise RequestError(
                f"{batch} sequences at positions {start_pos}..{end - 1} do not fit the KV cache "
                f"of {cache.batch_size} x {cache.max_len} tokens"
            )
        if cache is None and start_pos:
            raise RequestError("start_pos > 0 needs the KV cache holding the earlier positions")
        if cfg.family == "gpt2" and end > cfg.max_position_embeddings:
            raise RequestError(
                f"position {end - 1} is past gpt2's max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        positions, mask = self._positions_and_mask(
            input_ids, start_pos, cache is not None, document_ids, attention_mask
        )

        x = self.embed(input_ids)
        rope = None
        if cfg.family == "gpt2":
            if positions is None:
                positions = torch.arange(start_pos, end, device=input_ids.device)
            x = x + self.pos_embed(positions)
        elif positions is None:
            rope = rope_cos_sin(cfg, start_pos, seq_len, input_ids.device)
        else:
            rope = rope_cos_sin_at(cfg, positions)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        x = F.dropout(x, cfg.dropout, self.training)

        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, block in enumerate(self.layers):
            kv_cache = (cache.k[index], cache.v[index]) if cache is not None else None
            if recompute:
                # Non-reentrant: works with inputs that need no grad and keyword arguments, and
                # restores the RNG state so dropout draws the same masks when recomputing.
                x = checkpoint(block, x, rope, mask, kv_cache, start_pos, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv_cache, start_pos)
        if labels is not None and self.fused_loss and torch.is_grad_enabled():
            # Training: the loss without the logits (models/fused_loss.py).
            hidden = self.norm(x)[:, :-1]
            loss = linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]),
                self.lm_head.weight,
                labels[:, 1:].reshape(-1).to(hidden.device),
                IGNORE_INDEX,
            )
            return DecoderOutput(logits=None, loss=loss)
        logits = self.lm_head(self.norm(x))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return DecoderOutput(logits=logits, loss=loss)

    def forward_paged(
        self, input_ids: Tensor, cache: PagedKVCache, batch: AttentionBatch
    ) -> Tensor:
        """The engine's forward: input_ids [N] are the step's tokens of many sequences, laid out
        and placed in the paged `cache` as `batch` describes (see models/attention.py). Returns
        logits [S, vocab] for the rows of batch.logits_index (all N rows when it is None): only
        the last token of each sequence needs the vocabulary projection."""
        cfg = self.config
        if batch.use_kernels and cfg.family != "gpt2":
            return self._forward_paged_fused(input_ids, cache, batch)
        x = self.embed(input_ids)
        rope = None
        if cfg.family == "gpt2":
            x = x + self.pos_embed(batch.positions)
        else:
            # [2, N, 1, head_dim]: the 1 broadcasts over heads of q/k [N, heads, head_dim].
            rope = rope_cos_sin_at(cfg, batch.positions)
        for index, block in enumerate(self.layers):
            x = block.forward_paged(x, rope, cache.k[index], cache.v[index], batch)
        if batch.logits_index is not None:
            x = x[batch.logits_index]
        return self.lm_head(self.norm(x))

    def _forward_paged_fused(
        self, input_ids: Tensor, cache: PagedKVCache, batch: AttentionBatch
    ) -> Tensor:
        """Llama family on Triton: nine launches a layer (see models/fused_kernels.py). The
        residual stream travels beside the block outputs, so each norm also does the add."""
        from truthgpt.models.fused_kernels import add_rms_norm

        cos_sin = rope_cos_sin_half(self.config, batch.positions)
        h, residual = self.embed(input_ids), None
        for index, block in enumerate(self.layers):
            norm = block.attn_norm
            x, residual = add_rms_norm(h, residual, norm.weight, norm.eps)
            h = block.attn.forward_paged_fused(x, cos_sin, cache.k[index], cache.v[index], batch)
            norm = block.mlp_norm
            x, residual = add_rms_norm(h, residual, norm.weight, norm.eps)
            h = block.mlp.forward_fused(x)
        if batch.logits_index is not None:
            h, residual = h[batch.logits_index], residual[batch.logits_index]
        x, _ = add_rms_norm(h, residual, self.norm.weight, self.norm.eps)
        return self.lm_head(x)

    def fuse_for_inference(self) -> None:
        """Re-lay weights for the fused inference path (the MLP's gate and up as one tensor).
        Parameters keep their names and values, so training and saving are unaffected."""
        for block in self.layers:
            if isinstance(block.mlp, SwiGLU):
                block.mlp.fuse_gate_up()

    def new_paged_cache(
        self,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> PagedKVCache:
        """A zeroed block pool for the engine: num_blocks blocks of block_size tokens per layer."""
        cfg = self.config
        weight = self.embed.weight
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        dtype, device = dtype or weight.dtype, device or weight.device
        return PagedKVCache(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes one token's keys and values take across all layers."""
        cfg = self.config
        itemsize = (dtype or self.embed.weight.dtype).itemsize
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize

    def _positions_and_mask(
        self,
        input_ids: Tensor,
        start_pos: int,
        has_cache: bool,
        document_ids: Tensor | None,
        attention_mask: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | BlockMask | None]:
        """Per-row positions [B, T] (None: start_pos.. for every row) and the boolean SDPA mask
        [B or 1, 1, T, start_pos + T] (None: plain causal, SDPA's fastest path), or for packed
        documents on FlexAttention their BlockMask."""
        batch, seq_len = input_ids.shape
        end = start_pos + seq_len
        device = input_ids.device
        if document_ids is not None:
            if has_cache:
                raise RequestError("document_ids is for training and scoring, not the KV cache")
            if document_ids.shape != input_ids.shape:
                raise RequestError(
                    f"document_ids {tuple(document_ids.shape)} must have the shape of "
                    f"input_ids {tuple(input_ids.shape)}"
                )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, end):
            raise RequestError(
                f"attention_mask {tuple(attention_mask.shape)} must be [batch, start_pos + "
                f"seq_len] = ({batch}, {end}): one entry per cached and new token"
            )
        plain_chunk = not has_cache or start_pos == 0 or seq_len == 1
        if document_ids is None and attention_mask is None and plain_chunk:
            return None, None

        positions = None
        if document_ids is not None:
            segment, positions = document_positions(document_ids)
            if attention_mask is None and use_flex(
                self.packed_attention, device, self.config.dropout, self.config.head_dim
            ):
                return positions, document_block_mask(segment)  # one for every layer
        query_pos = torch.arange(start_pos, end, device=device)
        key_pos = torch.arange(end, device=device)
        # Query i sits at position start_pos + i and may see keys 0..start_pos + i.
        mask = (key_pos[None, :] <= query_pos[:, None])[None, None]
        if document_ids is not None:
            mask = mask & (segment[:, None, :, None] == segment[:, None, None, :])
        if attention_mask is not None:
            keep = attention_mask.to(device=device, dtype=torch.bool)
            mask = mask & keep[:, None, None, :]
            # A pad query would otherwise see no key at all, and SDPA turns an all-masked row
            # into NaN, which 0-weight products then spread to every query. Let it see itself.
            mask = mask | (key_pos[None, :] == query_pos[:, None])[None, None]
            if positions is None:
                # Left padding: the first real token is position 0, as HF computes position_ids.
                counted = (keep.long().cumsum(dim=1) - 1).clamp(min=0)
                positions = counted[:, start_pos:end]
        return positions, mask

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each shared tensor counted once. exclude_embeddings drops the token and
        position tables (and with them a head tied to the token table)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed.weight.numel()
            if self.config.family == "gpt2":
                total -= self.pos_embed.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at context length seq_len, for MFU.

        6N + 12 * L * H * Q * T from the PaLM paper (Chowdhery et al. 2022, appendix B): N is the
        non-embedding parameter count including the output head (its matmul costs FLOPs even when
        tied), L layers, H heads of size Q, T the sequence length; the second term is the
        attention score and value matmuls, counted without the causal half-saving as PaLM does.
        Divide by 3 for inference (forward only).
        """
        cfg = self.config
        n = self.num_params(exclude_embeddings=True)
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
