"""Fused blocks built on the stability principles fusedstab exists for: a transformer block (pre-norm
residual highway, fused residual add + norm, scaled attention with optional QK-norm and grouped-query
attention, an MLP with a non-saturating activation) and a conv-norm-activation block.

Parameter names are those of the plain-torch blocks a user would write (``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``; ``conv``, ``norm``), so their state_dicts load
into each other.
"""
from __future__ import annotations

import torch

from .. import functional as F
from .batch_norm import BatchNorm2d
from .group_norm import GroupNorm
from .layer_norm import LayerNorm, RMSNorm
from .linear_leaky_relu import LinearLeakyReLU

_NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}
_MLPS = ("leaky_relu", "gelu", "swiglu")


def _norm(kind: str, dim: int, eps: float | None, **factory):
    if kind not in _NORMS:
        raise ValueError(f"norm must be one of {tuple(_NORMS)}, got {kind!r}")
    return _NORMS[kind](dim, eps=eps if eps is not None or kind == "rmsnorm" else 1e-5, **factory)


def _add_norm(x, residual, norm):
    """(norm(x + residual), x + residual) in one kernel."""
    rms = isinstance(norm, RMSNorm)
    return F.add_layer_norm(x, residual, norm.normalized_shape, norm.weight, None if rms else norm.bias,
                            norm.eps, rms)


class Attention(torch.nn.Module):
    """Multi-head self-attention on fusedstab's kernels: one qkv projection, optional QK-norm (RMSNorm
    over each head's query and key, as in ViT-22B / OLMo 2), grouped-query attention when
    ``n_kv_heads < n_heads``, then the output projection. Input and output (B, L, d_model)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, qk_norm: bool = False,
                 bias: bool = True, dropout: float = 0.0, causal: bool = False, eps: float | None = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"d_model ({d_model}) must divide into n_heads ({n_heads}) heads, and n_kv_heads "
                             f"({n_kv_heads}) must divide n_heads")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.dropout, self.causal = dropout, causal
        self.qkv = torch.nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias, **factory)
        self.proj = torch.nn.Linear(d_model, d_model, bias=bias, **factory)
        self.q_norm = RMSNorm(self.head_dim, eps=eps, **factory) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=eps, **factory) if qk_norm else None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = (t.view(B, L, -1, D).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, D) views
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask, self.dropout if self.training else 0.0,
                                           self.causal and attn_mask is None, enable_gqa=Hkv != H)
        return self.proj(o.transpose(1, 2).reshape(B, L, H * D))


class MLP(torch.nn.Module):
    """fc2(act(fc1(x))): "leaky_relu" (fc1 a LinearLeakyReLU: the bias and activation in its matmul's
    epilogue), "gelu", or "swiglu" (fc1 gives the gate and the value: fc2(silu(gate) * value))."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "leaky_relu", negative_slope: float = 0.01,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if kind not in _MLPS:
            raise ValueError(f"mlp must be one of {_MLPS}, got {kind!r}")
        factory = {"device": device, "dtype": dtype}
        self.kind = kind
        if kind == "leaky_relu":
            self.fc1 = LinearLeakyReLU(d_model, d_ff, bias, negative_slope, **factory)
        else:
            self.fc1 = torch.nn.Linear(d_model, 2 * d_ff if kind == "swiglu" else d_ff, bias=bias, **factory)
        self.fc2 = torch.nn.Linear(d_ff, d_model, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.kind == "gelu":
            h = torch.nn.functional.gelu(h)
        elif self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * value
        return self.fc2(h)


class TransformerBlock(torch.nn.Module):
    """A transformer block on fusedstab's kernels. Input and output (B, L, d_model).

    Pre-norm (default): ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``, the residual add before
    norm2 fused with it (one kernel gives norm2(h) and h). Post-norm (``norm_first=False``, the
    original Transformer): ``h = norm1(x + attn(x)); out = norm2(h + mlp(h))``, both adds fused with
    their norms. ``norm``: "layernorm" or "rmsnorm"; ``qk_norm``: RMSNorm of queries and keys per head;
    ``n_kv_heads``: grouped-query attention; ``mlp``: "leaky_relu" (fused Linear + Leaky ReLU),
    "gelu" or "swiglu", hidden width ``d_ff`` (default 4 * d_model); ``causal``: causal self-attention
    when no ``attn_mask`` is given.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None, *, n_kv_heads: int | None = None,
                 norm: str = "layernorm", norm_first: bool = True, qk_norm: bool = False, mlp: str = "leaky_relu",
                 negative_slope: float = 0.01, dropout: float = 0.0, bias: bool = True, causal: bool = False,
                 eps: float | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm_first = norm_first
        self.norm1 = _norm(norm, d_model, eps, **factory)
        self.attn = Attention(d_model, n_heads, n_kv_heads, qk_norm, bias, dropout, causal, eps, **factory)
        self.norm2 = _norm(norm, d_model, eps, **factory)
        self.mlp = MLP(d_model, 4 * d_model if d_ff is None else d_ff, mlp, negative_slope, bias, **factory)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_first:
            n2, h = _add_norm(self.dropout(self.attn(self.norm1(x), attn_mask)), x, self.norm2)
            return h + self.dropout(self.mlp(n2))
        h = _add_norm(self.dropout(self.attn(x, attn_mask)), x, self.norm1)[0]
        return _add_norm(self.dropout(self.mlp(h)), h, self.norm2)[0]


class ConvNormAct(torch.nn.Module):
    """``act(norm(conv(x)))`` for NCHW or channels_last input: a Conv2d (no bias by default: the norm
    has one), then BatchNorm2d (``norm="batch"``) or GroupNorm (``norm="group"``, ``num_groups``) with
    the activation ("relu", "leaky_relu", "silu" or None) in the norm's kernels, forward and backward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | str | None = None, groups: int = 1, bias: bool = False, norm: str = "batch",
                 num_groups: int = 32, activation: str | None = "relu", negative_slope: float = 0.01,
                 eps: float = 1e-5, momentum: float | None = 0.1, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        padding = kernel_size // 2 if padding is None else padding
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                                    bias=bias, **factory)
        if norm == "batch":
            self.norm = BatchNorm2d(out_channels, eps, momentum, activation=activation,
                                    negative_slope=negative_slope, **factory)
        elif norm == "group":
            self.norm = GroupNorm(min(num_groups, out_channels), out_channels, eps, activation=activation,
                                  negative_slope=negative_slope, **factory)
        else:
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))
