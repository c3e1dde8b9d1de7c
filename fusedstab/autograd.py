"""torch.autograd.Function classes composing the fusedstab forward and backward ops.

Each takes already-validated arguments (see fusedstab.functional, which checks them as torch does).
"""
from __future__ import annotations

import contextlib
import math

import torch

from . import backend, ops  # noqa: F401  (registers torch.ops.fusedstab.*)

_ops = torch.ops.fusedstab


def _rows(t, normalized_shape):
    """(M, N) view of t over its trailing normalized_shape (a copy only where no view exists)."""
    n = math.prod(normalized_shape)
    m = math.prod(t.shape[: t.dim() - len(normalized_shape)])
    return t.reshape(m, n)


def _flat(p):
    return None if p is None else p.reshape(-1)


def _forward(ctx, x, residual, normalized_shape, weight, bias, eps, rms):
    """Shared forward: returns (y, h) with h = x + residual as x's shape, or None without one."""
    normalized_shape = tuple(normalized_shape)
    w, b = _flat(weight), _flat(bias)
    x2 = _rows(x, normalized_shape)
    r2 = None if residual is None else _rows(residual, normalized_shape)
    y, h, mean, rstd = _ops.layer_norm_fwd(x2, w, b, r2, eps, rms)
    # Backward runs where forward ran: re-apply this choice there (autograd's CUDA backward threads
    # and a backward() outside the use_backend block would not see it). Compiled graphs read the
    # process-wide choice at run time instead.
    ctx.backend = None if torch.compiler.is_compiling() else backend.get_backend()
    ctx.rms, ctx.normalized_shape, ctx.shape = rms, normalized_shape, x.shape
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
    # Backward needs the normalized h: x itself, or with a residual the h just written.
    ctx.save_for_backward(x2 if residual is None else h, w, b, mean, rstd)
    return y.view(x.shape), (None if residual is None else h.view(x.shape))


def _backward(ctx, dy, dh=None):
    """Shared backward: returns (dx, dresidual or None, dweight or None, dbias or None)."""
    h, w, b, mean, rstd = ctx.saved_tensors
    ns = ctx.normalized_shape
    dh2 = None if dh is None else _rows(dh, ns)
    with backend.use_backend(ctx.backend) if ctx.backend else contextlib.nullcontext():
        dx, dw, db = _ops.layer_norm_bwd(_rows(dy, ns), h, w, b, mean, rstd, dh2, ctx.rms)
    dx = dx.view(ctx.shape)
    dres = None if ctx.dtypes[1] is None else dx.to(ctx.dtypes[1])
    return (dx.to(ctx.dtypes[0]), dres, None if w is None else dw.view(ns),
            None if b is None else db.view(ns))


class LayerNormFunction(torch.autograd.Function):
    """``LayerNormFunction.apply(input, normalized_shape, weight, bias, eps) -> output``"""

    @staticmethod
    def forward(ctx, input, normalized_shape, weight, bias, eps):
        return _forward(ctx, input, None, normalized_shape, weight, bias, eps, False)[0]

    @staticmethod
    def backward(ctx, dy):
        dx, _, dw, db = _backward(ctx, dy)
        return dx, None, dw, db, None


class RMSNormFunction(torch.autograd.Function):
    """``RMSNormFunction.apply(input, normalized_shape, weight, eps) -> output`` (eps a float)"""

    @staticmethod
    def forward(ctx, input, normalized_shape, weight, eps):
        return _forward(ctx, input, None, normalized_shape, weight, None, eps, True)[0]

    @staticmethod
    def backward(ctx, dy):
        dx, _, dw, _ = _backward(ctx, dy)
        return dx, None, dw, None


class AddLayerNormFunction(torch.autograd.Function):
    """``AddLayerNormFunction.apply(x, residual, normalized_shape, weight, bias, eps, rms)
    -> (norm(x + residual), x + residual)``"""

    @staticmethod
    def forward(ctx, x, residual, normalized_shape, weight, bias, eps, rms):
        return _forward(ctx, x, residual, normalized_shape, weight, bias, eps, rms)

    @staticmethod
    def backward(ctx, dy, dh):
        dx, dres, dw, db = _backward(ctx, dy, dh)
        return dx, dres, None, dw, db, None, None


# ----------------------------------------------------------------------------- bias + Leaky ReLU
def _in_place_layout(x) -> bool:
    """Contiguous and channels_last(_3d): the layouts the kernels read in place and give back."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return x.is_contiguous() or (fmt is not None and x.is_contiguous(memory_format=fmt))


def _memory_order_2d(x, dim):
    """x's dims in memory order, split at ``dim`` into (outer, C, inner): returns (order, permuted
    shape, (R, L), per_row). Rows of C (per-column bias) when inner == 1, e.g. a Linear output or
    channels_last NCHW with dim=1; else rows of inner, bias index row % C. Contiguous and
    channels_last(_3d) x are read in place (``x.permute(order).reshape(R, L)`` is a view); any other
    layout is read through a contiguous copy. (No sort on strides: under dynamic shapes they are
    symbolic.)"""
    order = list(range(x.dim()))
    if not x.is_contiguous() and _in_place_layout(x):  # channels_last(_3d)
        order = [0, *range(2, x.dim()), 1]
    shape = [x.shape[i] for i in order]
    p = order.index(dim)
    outer, C, inner = math.prod(shape[:p]), shape[p], math.prod(shape[p + 1:])
    per_row = inner != 1
    return order, shape, ((outer * C, inner) if per_row else (outer, C)), per_row


def _from_2d(t2, order, shape):
    """Inverse of the 2-D view: x's shape, with x's memory layout when x was dense."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return t2.view(shape).permute(inverse)


def _act_saved(y, mask, slope):
    return mask if ops.bias_leaky_relu.saves_mask(slope) else y


class BiasLeakyReLUFunction(torch.autograd.Function):
    """``BiasLeakyReLUFunction.apply(x, bias, negative_slope, dim) -> leaky_relu(x + bias)``, the bias
    (or None) broadcast along ``dim`` (a non-negative dim of x)."""

    @staticmethod
    def forward(ctx, x, bias, negative_slope, dim):
        order, shape, rl, per_row = _memory_order_2d(x, dim)
        y2, mask = _ops.bias_leaky_relu_fwd(x.permute(order).reshape(rl), bias, negative_slope, per_row)
        ctx.backend = None if torch.compiler.is_compiling() else backend.get_backend()
        ctx.layout, ctx.slope, ctx.x_dtype = (order, shape, rl, per_row), negative_slope, x.dtype
        ctx.bias_dtype, ctx.C = (None, 1) if bias is None else (bias.dtype, bias.shape[0])
        ctx.save_for_backward(_act_saved(y2, mask, negative_slope))
        return _from_2d(y2, order, shape)

    @staticmethod
    def backward(ctx, dy):
        (saved,) = ctx.saved_tensors
        order, shape, rl, per_row = ctx.layout
        need_dx, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with backend.use_backend(ctx.backend) if ctx.backend else contextlib.nullcontext():
            dx2, db = _ops.bias_leaky_relu_bwd(dy.permute(order).reshape(rl), saved, ctx.slope, per_row,
                                               ctx.C, ctx.x_dtype, need_dx, need_db)
        return (_from_2d(dx2, order, shape) if need_dx else None,
                db.to(ctx.bias_dtype) if need_db else None, None, None)


class LinearLeakyReLUFunction(torch.autograd.Function):
    """``LinearLeakyReLUFunction.apply(x, weight, bias, negative_slope) -> leaky_relu(x @ weight.T + bias)``
    for x (*, K), weight (N, K), bias (N,) or None. Backward: one pass turns dy into dz and dbias,
    then dz @ weight and dz.T @ x (cuBLAS through torch)."""

    @staticmethod
    def forward(ctx, x, weight, bias, negative_slope):
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
        y2, mask = _ops.linear_leaky_relu_fwd(x2, weight, bias, negative_slope)
        ctx.backend = None if torch.compiler.is_compiling() else backend.get_backend()
        ctx.slope, ctx.x_shape = negative_slope, x.shape
        ctx.save_for_backward(x2, weight, _act_saved(y2, mask, negative_slope))
        return y2.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        N = weight.shape[0]
        with backend.use_backend(ctx.backend) if ctx.backend else contextlib.nullcontext():
            dz, db = _ops.bias_leaky_relu_bwd(dy.reshape(x2.shape[0], N), saved, ctx.slope, False, N, x2.dtype,
                                              need_x or need_w, need_b)
        dx = (dz @ weight).view(ctx.x_shape) if need_x else None
        dw = dz.t() @ x2 if need_w else None
        return dx, dw, db.to(x2.dtype) if need_b else None, None


# ----------------------------------------------------------------------------- GroupNorm (+ activation)
def _channels_view(x):
    """(N, C, S) view of x (N, C, *): contiguous and channels_last(_3d) inputs stay views (the kernels
    read them in place with their strides); other layouts are read through a contiguous copy."""
    x = x if _in_place_layout(x) else x.contiguous()
    return x.unsqueeze(-1) if x.dim() == 2 else x.flatten(2)


class GroupNormFunction(torch.autograd.Function):
    """``GroupNormFunction.apply(input, num_groups, weight, bias, eps, activation, negative_slope)
    -> act(group_norm(input))``, activation one of "none", "relu", "leaky_relu", "silu"."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, activation, negative_slope):
        x3 = _channels_view(x)
        y3, mean, rstd = _ops.group_norm_fwd(x3, weight, bias, num_groups, eps, activation, negative_slope)
        ctx.backend = None if torch.compiler.is_compiling() else backend.get_backend()
        ctx.args = (num_groups, activation, negative_slope)
        ctx.save_for_backward(x3, weight, bias, mean, rstd)
        return y3.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x3, w, b, mean, rstd = ctx.saved_tensors
        with backend.use_backend(ctx.backend) if ctx.backend else contextlib.nullcontext():
            dx3, dw, db = _ops.group_norm_bwd(dy.reshape(x3.shape), x3, w, b, mean, rstd, *ctx.args)
        return (dx3.view(dy.shape), None, None if w is None else dw.to(w.dtype),
                None if b is None else db.to(b.dtype), None, None, None)


# ----------------------------------------------------------------------------- BatchNorm (+ activation)
def _bn_backward(ctx, dy, coef_of):
    """dx, dweight, dbias of BatchNorm from the saved (x3, w, b, mean, rstd); ``coef_of(sums)`` gives
    (mean(dz), mean(dz * xhat)) from the local (sum(dz), sum(dz * xhat)), or None (eval mode)."""
    x3, w, b, mean, rstd = ctx.saved_tensors
    act, slope = ctx.act
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dy3 = dy.reshape(x3.shape)
    dx = dw = db = None
    with backend.use_backend(ctx.backend) if ctx.backend else contextlib.nullcontext():
        sums = None
        if need_w or need_b or (need_x and ctx.training):
            sums = _ops.batch_norm_bwd_reduce(dy3, x3, w, b, mean, rstd, act, slope)
        if need_x:
            coef = coef_of(sums) if ctx.training else None
            dx = _ops.batch_norm_bwd_elemt(dy3, x3, w, b, mean, rstd, coef, act, slope).view(dy.shape)
    if need_w and w is not None:
        dw = sums[1].to(w.dtype)
    if need_b and b is not None:
        db = sums[0].to(b.dtype)
    return dx, dw, db


def _bn_save(ctx, x3, weight, bias, mean, rstd, activation, negative_slope, training):
    ctx.backend = None if torch.compiler.is_compiling() else backend.get_backend()
    ctx.act, ctx.training = (activation, negative_slope), training
    ctx.save_for_backward(x3, weight, bias, mean, rstd)


class BatchNormFunction(torch.autograd.Function):
    """``BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training, eps, activation,
    negative_slope) -> (act(batch_norm(input)), stats)``, activation one of "none", "relu", "leaky_relu",
    "silu". In training the batch statistics normalize and ``stats`` (3, C) holds their count, mean and
    M2 (sum of squared deviations), from which the caller updates the running statistics; in eval the
    running statistics normalize and ``stats`` is empty."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps, activation, negative_slope):
        x3 = _channels_view(x)
        if training:
            stats = _ops.batch_norm_stats(x3)
            mean, rstd = stats[1], torch.rsqrt(stats[2] / stats[0] + eps)
        else:
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            mean, rstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)
            stats = mean.new_empty((0, x.shape[1]))
        y3 = _ops.batch_norm_elemt(x3, weight, bias, mean, rstd, activation, negative_slope)
        _bn_save(ctx, x3, weight, bias, mean, rstd, activation, negative_slope, training)
        ctx.count = x3.shape[0] * x3.shape[2]
        ctx.mark_non_differentiable(stats)
        return y3.view(x.shape), stats

    @staticmethod
    def backward(ctx, dy, _dstats):
        dx, dw, db = _bn_backward(ctx, dy, lambda sums: sums / ctx.count)
        return dx, dw, db, None, None, None, None, None, None


class SyncBatchNormFunction(torch.autograd.Function):
    """``SyncBatchNormFunction.apply(input, weight, bias, eps, activation, negative_slope, process_group,
    world_size) -> (output, stats)``: BatchNorm in training over the batch of every process of the group.
    The local (count, mean, M2) are all-gathered and combined (Chan's formula, in rank order: every rank
    gets the same statistics, whatever each rank's batch size, 0 included); ``stats`` (3, C) are the
    combined ones. Backward all-reduces sum(dz) and sum(dz * xhat) for dinput; dweight and dbias stay
    the rank's own, as torch.nn.SyncBatchNorm's (data parallelism reduces them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, activation, negative_slope, process_group, world_size):
        import torch.distributed as dist

        from .reference import chan_combine

        x3 = _channels_view(x)
        local = _ops.batch_norm_stats(x3)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=process_group)
        count, mean, m2 = chan_combine(*torch.stack(gathered, 1), dim=0)
        rstd = torch.rsqrt(m2 / count + eps)
        y3 = _ops.batch_norm_elemt(x3, weight, bias, mean, rstd, activation, negative_slope)
        _bn_save(ctx, x3, weight, bias, mean, rstd, activation, negative_slope, True)
        ctx.count, ctx.group = count, process_group
        stats = torch.stack([count, mean, m2])
        ctx.mark_non_differentiable(stats)
        return y3.view(x.shape), stats

    @staticmethod
    def backward(ctx, dy, _dstats):
        import torch.distributed as dist

        def coef_of(sums):
            total = sums.clone()
            dist.all_reduce(total, dist.ReduceOp.SUM, group=ctx.group)
            return total / ctx.count

        dx, dw, db = _bn_backward(ctx, dy, coef_of)
        return dx, dw, db, None, None, None, None, None


# ----------------------------------------------------------------------------- attention
class _BroadcastTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, shape):
        ctx.shape, ctx.dtype = t.shape, t.dtype
        return t.expand(shape)

    @staticmethod
    def backward(ctx, g):
        acc = torch.float64 if ctx.dtype == torch.float64 else torch.float32
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
        ctx.backend = None if torch.compiler.is_compiling() else backend.get_backend()
        ctx.args = (is_causal, scale, dropout_p, seed, offset)
        ctx.save_for_backward(q, k, v, o, lse, attn_mask)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, attn_mask = ctx.saved_tensors
        B, Hq, L, _ = q.shape
        mask = None if attn_mask is None else attn_mask.expand(B, Hq, L, k.shape[2])
        need_mask = attn_mask is not None and ctx.needs_input_grad[3]
        with backend.use_backend(ctx.backend) if ctx.backend else contextlib.nullcontext():
            dq, dk, dv, dmask = _ops.attention_bwd(do, q, k, v, o, lse, mask, *ctx.args, need_mask)
        dmask = dmask.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if need_mask else None
        return dq, dk, dv, dmask, None, None, None, None, None
