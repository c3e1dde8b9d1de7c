"""BatchNorm and SyncBatchNorm (+ activation): autograd.Functions over the four
``fusedstab::batch_norm_*`` ops."""
from __future__ import annotations

import math

import torch

from .. import ops  # noqa: F401  (registers torch.ops.fusedstab.*)
from ..numerics import acc_dtype, chan_combine
from .common import forward_backend, layout_in_place, remember_backend

_ops = torch.ops.fusedstab


def _bn_backward(ctx, dy, coef_of):
    """dx, dweight, dbias of BatchNorm from the saved (x, w, b, mean, rstd); ``coef_of(sums)`` gives
    (mean(dz), mean(dz * xhat)) from the local (sum(dz), sum(dz * xhat)), or None (eval mode)."""
    x, w, b, mean, rstd = ctx.saved_tensors
    act, slope = ctx.act
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx = dw = db = None
    with forward_backend(ctx):
        sums = None
        if need_w or need_b or (need_x and ctx.training):
            sums = _ops.batch_norm_bwd_reduce(dy, x, w, b, mean, rstd, act, slope)
        if need_x:
            coef = coef_of(sums) if ctx.training else None
            dx = _ops.batch_norm_bwd_elemt(dy, x, w, b, mean, rstd, coef, act, slope)
    if need_w and w is not None:
        dw = sums[1].to(w.dtype)
    if need_b and b is not None:
        db = sums[0].to(b.dtype)
    return dx, dw, db


def _bn_save(ctx, x, weight, bias, mean, rstd, activation, negative_slope, training):
    remember_backend(ctx)
    ctx.act, ctx.training = (activation, negative_slope), training
    ctx.save_for_backward(x, weight, bias, mean, rstd)


class BatchNormFunction(torch.autograd.Function):
    """``BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training, eps, activation,
    negative_slope) -> (act(batch_norm(input)), stats)``, activation one of "none", "relu", "leaky_relu",
    "silu". In training the batch statistics normalize and ``stats`` (3, C) holds their count, mean and
    M2 (sum of squared deviations), from which the caller updates the running statistics; in eval the
    running statistics normalize and ``stats`` is empty."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps, activation, negative_slope):
        x = layout_in_place(x)
        if training:
            stats = _ops.batch_norm_stats(x)
            mean, rstd = stats[1], torch.rsqrt(stats[2] / stats[0] + eps)
        else:
            acc = acc_dtype(x.dtype)
            mean, rstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)
            stats = mean.new_empty((0, x.shape[1]))
        y = _ops.batch_norm_elemt(x, weight, bias, mean, rstd, activation, negative_slope)
        _bn_save(ctx, x, weight, bias, mean, rstd, activation, negative_slope, training)
        ctx.count = x.shape[0] * math.prod(x.shape[2:])
        ctx.mark_non_differentiable(stats)
        return y, stats

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


        x = layout_in_place(x)
        local = _ops.batch_norm_stats(x)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=process_group)
        count, mean, m2 = chan_combine(*torch.stack(gathered, 1), dim=0)
        rstd = torch.rsqrt(m2 / count + eps)
        y = _ops.batch_norm_elemt(x, weight, bias, mean, rstd, activation, negative_slope)
        _bn_save(ctx, x, weight, bias, mean, rstd, activation, negative_slope, True)
        ctx.count, ctx.group = count, process_group
        stats = torch.stack([count, mean, m2])
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    def backward(ctx, dy, _dstats):
        import torch.distributed as dist

        def coef_of(sums):
            total = sums.clone()
            dist.all_reduce(total, dist.ReduceOp.SUM, group=ctx.group)
            return total / ctx.count

        dx, dw, db = _bn_backward(ctx, dy, coef_of)
        return dx, dw, db, None, None, None, None, None
