"""Scaled dot-product attention with torch.nn.functional's signature, semantics and errors."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..autograd import ScaledDotProductAttentionFunction, broadcast_to
from .checks import type_name


def _check_attention(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """Raise what torch.nn.functional.scaled_dot_product_attention raises (same exception types)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be Tensor, not "
                            f"{type(t).__name__}")
        if t.dim() < 2:
            raise RuntimeError(f"scaled_dot_product_attention: {name} must have at least 2 dimensions (L, E), "
                               f"got {t.dim()}")
    if not query.dtype == key.dtype == value.dtype:
        raise RuntimeError("Expected query, key, and value to have the same dtype, but got query.dtype: "
                           f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead.")
    if not query.device == key.device == value.device:
        raise RuntimeError("Expected query, key, and value to have the same device type, but got query.device: "
                           f"{query.device} key.device: {key.device} and value.device: {value.device} instead.")
    if query.is_complex():
        raise NotImplementedError(f"scaled_dot_product_attention: complex inputs are not supported ({query.dtype})")
    if not query.is_floating_point():
        raise RuntimeError(f"expected scalar type Float but found {type_name(query.dtype)}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError("Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                               f"attn_mask.dtype: {attn_mask.dtype} and  query.dtype: {query.dtype} instead.")
        if is_causal:
            raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when "
                               "is_causal=True")
        if attn_mask.device != query.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"{query.device} and {attn_mask.device}!")
    if not dropout_p <= 1.0:  # a negative one is no dropout, as in torch
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if key.shape[-1] != query.shape[-1]:
        raise RuntimeError(f"scaled_dot_product_attention: query and key head dims differ ({query.shape[-1]} "
                           f"and {key.shape[-1]})")
    if value.shape[-2] != key.shape[-2]:
        raise RuntimeError(f"scaled_dot_product_attention: key and value lengths differ ({key.shape[-2]} and "
                           f"{value.shape[-2]})")


def _dropout_seed() -> int:
    """A fresh seed from torch's default CPU generator (reproducible under torch.manual_seed)."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: FlashAttention kernels (online
    softmax in fp32, nothing of size L x S in memory, backward recomputing the probabilities).

    query (N, ..., L, E), key (N, ..., S, E), value (N, ..., S, Ev), leading dims broadcast; with
    ``enable_gqa`` the head dim (-3) of key/value may divide query's. ``attn_mask`` broadcastable to
    (N, ..., L, S): bool (True takes part) or added to the scores (differentiable). ``is_causal``: query i
    sees key j iff j <= i (top-left aligned, as torch). Fully masked query rows give 0 and zero
    gradients, never NaN. fp16/bf16 on tensor cores, fp32 exact unless
    ``torch.backends.cuda.matmul.allow_tf32``; fp64 runs on the eager reference (the ``torch`` backend).
    Dropout keeps each probability by a counter-based RNG seeded from torch's generator; backward
    regenerates the same mask.
    """
    _check_attention(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if torch.is_autocast_enabled(query.device.type):
        dt = torch.get_autocast_dtype(query.device.type)
        cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dt)  # noqa: E731
        with torch.autocast(query.device.type, enabled=False):
            return scaled_dot_product_attention(cast(query), cast(key), cast(value), cast(attn_mask), dropout_p,
                                                is_causal, scale, enable_gqa)
    dropout_p = max(float(dropout_p), 0.0)
    L, E, S, Ev = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    hq, hk, hv = (t.shape[-3] if t.dim() >= 3 else 1 for t in (query, key, value))
    if enable_gqa:  # torch's repeat_interleave of the key and value heads
        if not hk or not hv or hq % hk or hq % hv:
            raise RuntimeError(f"Number of heads in key and value must divide the number of heads in query "
                               f"(query {hq}, key {hk}, value {hv})")
        H = hq
    else:  # heads broadcast as any batch dim
        H = torch.broadcast_shapes((hq,), (hk,), (hv,))[0]
    lead = torch.broadcast_shapes(*(t.shape[:-3] for t in (query, key, value)))
    grouped = hk == hv and H % hk == 0  # the kernels' grouped-query attention: kv head h // (H // hk)
    if query.dtype in (torch.float16, torch.bfloat16) and any(
            t.requires_grad and (tuple(t.shape[:-3]) != tuple(lead) or broadcast_heads)
            for t, broadcast_heads in ((query, hq != H), (key, not grouped), (value, not grouped))):
        # A gradient summed over broadcast dims would round each part to fp16/bf16 and then the sum:
        # run this (rare) case in fp32 and round once.
        up = (t if t is None or not t.is_floating_point() else t.float() for t in (query, key, value, attn_mask))
        return scaled_dot_product_attention(*up, dropout_p, is_causal, scale, enable_gqa).to(query.dtype)
    nd = max(t.dim() for t in (query, key, value))
    B = math.prod(lead)
    q = _to_bhld(query, lead, H, B)
    if grouped:
        k, v = _to_bhld(key, lead, hk, B), _to_bhld(value, lead, hk, B)
    else:  # key and value heads differ: give each all H heads
        k, v = _to_bhld(_repeat_heads(key, H), lead, H, B), _to_bhld(_repeat_heads(value, H), lead, H, B)
    mask = attn_mask
    if mask is not None:
        out_shape = (*lead, H, L, S) if nd >= 3 else (L, S)
        if mask.dim() > len(out_shape):
            raise RuntimeError(f"attn_mask of shape {list(mask.shape)} has more dims than the attention weights "
                               f"{list(out_shape)}")
        torch.broadcast_shapes(mask.shape, out_shape)  # raises torch's error for a mask that doesn't fit
        mask = mask.reshape((1,) * (len(out_shape) - mask.dim()) + tuple(mask.shape))
        if all(d == 1 for d in mask.shape[:-3]):  # broadcast over the batch: one (1, h, L, S) view
            mask = mask.reshape(1, *mask.shape[-3:])
        else:
            mask = _to_bhld(mask, lead, mask.shape[-3], B)
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    seed = _dropout_seed() if dropout_p > 0.0 else 0
    o = ScaledDotProductAttentionFunction.apply(q, k, v, mask, bool(is_causal), scale, dropout_p, seed, 0)
    return o.reshape(*lead, H, L, Ev) if nd >= 3 else o.reshape(L, Ev)


def _to_bhld(t: Tensor, lead, h: int, B: int) -> Tensor:
    """t (*t_lead, h_t, L, D) as (B, h, L, D): broadcast leading dims and heads (a view; its gradient
    summed in fp32) and the leading dims merged into B (a view where strides allow)."""
    t = t.reshape((1,) * (len(lead) + 3 - t.dim()) + tuple(t.shape)) if t.dim() < len(lead) + 3 else t
    return broadcast_to(t, (*lead, h, *t.shape[-2:])).reshape(B, h, *t.shape[-2:])


def _repeat_heads(t: Tensor, H: int) -> Tensor:
    """t (..., h, S, D) with each head repeated for H // h query heads in a row (torch's
    repeat_interleave of grouped-query attention), as a broadcast view."""
    if t.dim() < 3:
        t = t.unsqueeze(0)
    h = t.shape[-3]
    t = broadcast_to(t.unsqueeze(-3), (*t.shape[:-2], H // h, *t.shape[-2:]))
    return t.flatten(-4, -3)
