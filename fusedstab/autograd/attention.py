"""Scaled dot-product attention: an autograd.Function over ``fusedstab::attention_fwd`` / ``_bwd``,
and the broadcast whose gradient sums in fp32."""
from __future__ import annotations

import torch

from .. import ops  # noqa: F401  (registers torch.ops.fusedstab.*)
from ..numerics import acc_dtype
from .common import forward_backend, remember_backend

_ops = torch.ops.fusedstab


class _BroadcastTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, shape):
        ctx.shape, ctx.dtype = t.shape, t.dtype
        return t.expand(shape)

    @staticmethod
    def backward(ctx, g):
        acc = acc_dtype(ctx.dtype)
        return g.to(acc).sum_to_size(ctx.shape).to(ctx.dtype), None


def broadcast_to(t, shape):
    """``t.expand(shape)``, a view, whose gradient is summed over the broadcast dims in fp32 and
    rounded once to t's dtype (autograd's own expand sums fp16/bf16 gradients in fp16/bf16)."""
    shape = tuple(shape)
    if tuple(t.shape) == shape or not t.requires_grad:
        return t.expand(shape)
    return _BroadcastTo.apply(t, shape)


class ScaledDotProductAttentionFunction(torch.autograd.Function):
    """``ScaledDotProductAttentionFunction.apply(q, k, v, attn_mask, is_causal, scale, dropout_p, seed, offset)
    -> o`` for q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), Hq a multiple of Hkv, attn_mask None or
    broadcastable to (B, Hq, L, S) (bool: True takes part; float: added to the scores, differentiable),
    ``scale`` a float; dropout from the counter-based RNG at (seed, offset)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, dropout_p, seed, offset):
        B, Hq, L, _ = q.shape
        mask = None if attn_mask is None else attn_mask.expand(B, Hq, L, k.shape[2])
        o, lse = _ops.attention_fwd(q, k, v, mask, is_causal, scale, dropout_p, seed, offset)
        remember_backend(ctx)
        ctx.args = (is_causal, scale, dropout_p, seed, offset)
        ctx.save_for_backward(q, k, v, o, lse, attn_mask)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, attn_mask = ctx.saved_tensors
        B, Hq, L, _ = q.shape
        mask = None if attn_mask is None else attn_mask.expand(B, Hq, L, k.shape[2])
        need_mask = attn_mask is not None and ctx.needs_input_grad[3]
        with forward_backend(ctx):
            dq, dk, dv, dmask = _ops.attention_bwd(do, q, k, v, o, lse, mask, *ctx.args, need_mask)
        dmask = dmask.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if need_mask else None
        return dq, dk, dv, dmask, None, None, None, None, None
