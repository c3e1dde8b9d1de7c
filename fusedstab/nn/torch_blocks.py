"""The fused blocks written in plain torch.nn (torch's own kernels), with the same parameter names:
the eager baseline that the examples and the ``train_step`` benchmark compare fusedstab's blocks with
(a state_dict of one loads into the other). The tests keep their own twins."""
from __future__ import annotations

import torch
import torch.nn.functional as TF

_ACTS = {"relu": TF.relu, "silu": TF.silu, None: lambda t: t}


class TorchAttention(torch.nn.Module):
    def __init__(self, d_model, n_heads, n_kv_heads=None, qk_norm=False, bias=True, dropout=0.0, causal=False,
                 eps=None, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        self.head_dim, self.dropout, self.causal = d_model // n_heads, dropout, causal
        self.qkv = torch.nn.Linear(d_model, (n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=bias, **f)
        self.proj = torch.nn.Linear(d_model, d_model, bias=bias, **f)
        self.q_norm = torch.nn.RMSNorm(self.head_dim, eps=eps, **f) if qk_norm else None
        self.k_norm = torch.nn.RMSNorm(self.head_dim, eps=eps, **f) if qk_norm else None

    def forward(self, x, attn_mask=None):
        B, L, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = (t.view(B, L, -1, D).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        o = TF.scaled_dot_product_attention(q, k, v, attn_mask, self.dropout if self.training else 0.0,
                                            self.causal and attn_mask is None, enable_gqa=Hkv != H)
        return self.proj(o.transpose(1, 2).reshape(B, L, H * D))


class TorchMLP(torch.nn.Module):
    def __init__(self, d_model, d_ff, kind="leaky_relu", negative_slope=0.01, bias=True, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.kind, self.negative_slope = kind, negative_slope
        self.fc1 = torch.nn.Linear(d_model, 2 * d_ff if kind == "swiglu" else d_ff, bias=bias, **f)
        self.fc2 = torch.nn.Linear(d_ff, d_model, bias=bias, **f)

    def forward(self, x):
        h = self.fc1(x)
        if self.kind == "leaky_relu":
            h = TF.leaky_relu(h, self.negative_slope)
        elif self.kind == "gelu":
            h = TF.gelu(h)
        else:
            gate, value = h.chunk(2, dim=-1)
            h = TF.silu(gate) * value
        return self.fc2(h)


class TorchTransformerBlock(torch.nn.Module):
    """fusedstab.nn.TransformerBlock in plain torch.nn: same constructor, same parameter names."""

    def __init__(self, d_model, n_heads, d_ff=None, *, n_kv_heads=None, norm="layernorm", norm_first=True,
                 qk_norm=False, mlp="leaky_relu", negative_slope=0.01, dropout=0.0, bias=True, causal=False,
                 eps=None, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        Norm = torch.nn.LayerNorm if norm == "layernorm" else torch.nn.RMSNorm
        eps = 1e-5 if eps is None and norm == "layernorm" else eps
        self.norm_first = norm_first
        self.norm1 = Norm(d_model, eps=eps, **f)
        self.attn = TorchAttention(d_model, n_heads, n_kv_heads, qk_norm, bias, dropout, causal, eps, **f)
        self.norm2 = Norm(d_model, eps=eps, **f)
        self.mlp = TorchMLP(d_model, 4 * d_model if d_ff is None else d_ff, mlp, negative_slope, bias, **f)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x, attn_mask=None):
        if self.norm_first:
            h = x + self.dropout(self.attn(self.norm1(x), attn_mask))
            return h + self.dropout(self.mlp(self.norm2(h)))
        h = self.norm1(x + self.dropout(self.attn(x, attn_mask)))
        return self.norm2(h + self.dropout(self.mlp(h)))


class TorchConvNormAct(torch.nn.Module):
    """fusedstab.nn.ConvNormAct in plain torch.nn: same constructor, same parameter names."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, groups=1, bias=False,
                 norm="batch", num_groups=32, activation="relu", negative_slope=0.01, eps=1e-5, momentum=0.1,
                 device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        padding = kernel_size // 2 if padding is None else padding
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias,
                                    **f)
        self.norm = (torch.nn.BatchNorm2d(out_channels, eps, momentum, **f) if norm == "batch" else
                     torch.nn.GroupNorm(min(num_groups, out_channels), out_channels, eps, **f))
        self.activation, self.negative_slope = activation, negative_slope

    def forward(self, x):
        y = self.norm(self.conv(x))
        if self.activation == "leaky_relu":
            return TF.leaky_relu(y, self.negative_slope)
        return _ACTS[self.activation](y)
