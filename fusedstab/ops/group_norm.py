"""GroupNorm with an optional fused activation, as torch.library custom ops.

``fusedstab::group_norm_fwd(x, weight, bias, num_groups, eps, activation, slope) -> (y, mean, rstd)``
``fusedstab::group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, activation, slope)
  -> (dx, dweight, dbias)``

x is the caller's (N, C, *) tensor: dense NCHW or dense with the channels innermost (channels_last,
and its 3-D (N, C, L) kin) is read in place, any other layout through a contiguous copy
(fusedstab.ops.layout.channels_first). y and dx have x's shape and that layout's strides, so that a
user may modify y in place. mean and rstd are (N, G) in the accumulation dtype. ``activation`` is
"none", "relu", "leaky_relu" (with ``slope``) or "silu", applied to weight * xhat + bias; backward
recomputes its input from x. dweight / dbias come back in the accumulation dtype, empty when weight /
bias is None.
On the triton backend dense channels-last input runs on the BatchNorm kernels (whole rows of C read
per sample, per-(sample, channel) statistics combined into groups here), any other layout on the
per-group kernels of fusedstab.kernels.group_norm.

What every backend may assume (and the C++ kernels check): numel > 0; x the (N, C, S) view of one of
the layouts of fusedstab.ops.layout (dense NCHW or channels-inner), dy and the y / dx it writes with
x's strides; weight and bias contiguous (C,) of any float dtype; mean, rstd (N, G) contiguous.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..numerics import acc_dtype, chan_combine, params_unsupported, unsupported
from .layout import channels_first, channels_inner, like, ncs

_EMPTY = (0,)


def _stats(x, G):
    acc = acc_dtype(x.dtype)
    return x.new_empty((x.shape[0], G), dtype=acc), x.new_empty((x.shape[0], G), dtype=acc)


def _bwd_outputs(x, weight, bias, acc):
    dw = x.new_empty(_EMPTY if weight is None else weight.shape, dtype=acc)
    db = x.new_empty(_EMPTY if bias is None else bias.shape, dtype=acc)
    return torch.empty_like(channels_first(x)), dw, db


def _dense(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.contiguous()


@torch.library.custom_op("fusedstab::group_norm_fwd", mutates_args=())
def group_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                   activation: str, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    x = channels_first(x)
    y, (mean, rstd) = torch.empty_like(x), _stats(x, num_groups)
    if not x.numel():  # groups of no elements
        return y, mean.zero_(), rstd.fill_(float("nan"))
    backend.dispatch("group_norm_fwd", x.device.type, (ncs(y), mean, rstd), ncs(x), _dense(weight), _dense(bias),
                     num_groups, eps, activation, slope)
    return y, mean, rstd


@group_norm_fwd.register_fake
def _(x, weight, bias, num_groups, eps, activation, slope):
    return (torch.empty_like(channels_first(x)), *_stats(x, num_groups))


@torch.library.custom_op("fusedstab::group_norm_bwd", mutates_args=())
def group_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                   rstd: Tensor, num_groups: int, activation: str, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _bwd_outputs(x, weight, bias, mean.dtype)
    if not x.numel():
        return dx, dw.zero_(), db.zero_()
    x = channels_first(x)
    backend.dispatch("group_norm_bwd", x.device.type, (ncs(dx), dw, db), ncs(like(dy, x)), ncs(x), _dense(weight),
                     _dense(bias), mean.contiguous(), rstd.contiguous(), num_groups, activation, slope)
    return dx, dw, db


@group_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, activation, slope):
    return _bwd_outputs(x, weight, bias, mean.dtype)


# ----------------------------------------------------------------------------- torch backend
def _fwd_torch(outs, x, weight, bias, G, eps, act, slope):
    for out, t in zip(outs, reference.group_norm_fwd(x, weight, bias, G, eps, act, slope)):
        out.copy_(t)


def _bwd_torch(outs, dy, x, weight, bias, mean, rstd, G, act, slope):
    dx, dw, db = outs
    gx, gw, gb = reference.group_norm_bwd(dy, x, weight, bias, mean, rstd, G, act, slope)
    dx.copy_(gx)
    if weight is not None:
        dw.copy_(gw)
    if bias is not None:
        db.copy_(gb)


backend.register("group_norm_fwd", "torch", _fwd_torch)
backend.register("group_norm_bwd", "torch", _bwd_torch)


# ----------------------------------------------------------------------------- triton backend
def _triton_ok(*args) -> str | None:
    return unsupported(args, what="the triton kernels")


def _fwd_channels_inner(outs, x, weight, bias, G, eps, act, slope):
    """Channels-last: the BatchNorm kernels read whole rows of C (a group's C/G channels alone would be
    runs of a few bytes) and give per-(sample, channel) statistics, combined into groups here."""
    from ..kernels import batch_norm as KB

    y, mean, rstd = outs
    N, C, S = x.shape
    acc = acc_dtype(x.dtype)
    count, pivot, pmean, pm2 = KB.stats(x, True, acc, per_sample=True).double().unbind(1)  # (N, SPLIT, C)
    count, gmean, m2 = chan_combine(count, pivot + pmean, pm2, dim=1)  # (N, C), float64
    count, gmean, m2 = chan_combine(*(t.view(N, G, C // G) for t in (count, gmean, m2)), dim=2)
    mean.copy_(gmean), rstd.copy_(torch.rsqrt(m2 / count + eps))
    KB.elemt(x, weight, bias, y, *(t.repeat_interleave(C // G, 1) for t in (mean, rstd)), act, slope, True,
             per_sample=True)


def _bwd_channels_inner(outs, dy, x, weight, bias, mean, rstd, G, act, slope):
    """Backward of _fwd_channels_inner: per-(sample, channel) sum(dz) and sum(dz * xhat) give dbias,
    dweight and the group means of gw = dz * w and gw * xhat for dx."""
    from ..kernels import batch_norm as KB

    dx, dw, db = outs
    N, C, S = x.shape
    mean_c, rstd_c = (t.repeat_interleave(C // G, 1) for t in (mean, rstd))
    sdz, sdzx = KB.bwd_reduce(dy, x, weight, bias, mean_c, rstd_c, act, slope, True, per_sample=True).sum(2).unbind(1)
    wv = 1.0 if weight is None else weight.to(mean.dtype)
    coef = torch.stack([(t * wv).view(N, G, -1).sum(2).div(C // G * S).repeat_interleave(C // G, 1)
                        for t in (sdz, sdzx)], 1)  # (N, 2, C): group means of gw and gw * xhat
    KB.bwd_elemt(dy, x, weight, bias, dx, mean_c, rstd_c, coef, act, slope, True, per_sample=True)
    if weight is not None:
        dw.copy_(sdzx.sum(0))
    if bias is not None:
        db.copy_(sdz.sum(0))


def _fwd_triton(outs, x, weight, bias, G, eps, act, slope):
    from ..kernels import batch_norm as KB
    from ..kernels import group_norm as K

    y, mean, rstd = outs
    if x.shape[2] == 1 and K.rows_ok(x.shape[1], G):  # (N, C) rows: a group is C/G adjacent channels
        K.rows_fwd(x[:, :, 0], weight, bias, y[:, :, 0], mean, rstd, G, eps, act, slope)
        return
    if channels_inner(x):
        return _fwd_channels_inner(outs, x, weight, bias, G, eps, act, slope)
    count, gmean, m2 = KB.combine(K.fwd_stats(x, G), acc_dtype(x.dtype))  # per group, (N*G,) each
    mean.copy_(gmean.view(mean.shape)), rstd.copy_(torch.rsqrt(m2 / count + eps).view(rstd.shape))
    K.fwd_norm(x, weight, bias, y, mean, rstd, G, act, slope)


def _bwd_triton(outs, dy, x, weight, bias, mean, rstd, G, act, slope):
    from ..kernels import group_norm as K

    dx, dw, db = outs
    if x.shape[2] == 1 and K.rows_ok(x.shape[1], G):
        K.rows_bwd(dy[:, :, 0], x[:, :, 0], weight, bias, mean, rstd, dx[:, :, 0], dw if weight is not None else None,
                   db if bias is not None else None, G, act, slope)
        return
    if channels_inner(x):
        return _bwd_channels_inner(outs, dy, x, weight, bias, mean, rstd, G, act, slope)
    gpart, cpart = K.bwd_reduce(dy, x, weight, bias, mean, rstd, G, act, slope)
    K.bwd_dx(dy, x, weight, bias, dx, mean, rstd, gpart.sum(1), G, act, slope)
    if weight is not None:
        dw.copy_(cpart[:, :, 0].sum((0, 1)))
    if bias is not None:
        db.copy_(cpart[:, :, 1].sum((0, 1)))


backend.register("group_norm_fwd", "triton", _fwd_triton, _triton_ok)
backend.register("group_norm_bwd", "triton", _bwd_triton, _triton_ok)


# ----------------------------------------------------------------------------- cpu backend (csrc/cpu/group_norm.cpp)
def _cpp_ok(*args) -> str | None:
    return unsupported(args, what="the C++ kernels")


backend.register("group_norm_fwd", "cpu", backend.cpp("group_norm_fwd"), _cpp_ok)
backend.register("group_norm_bwd", "cpu", backend.cpp("group_norm_bwd"), _cpp_ok)

# ----------------------------------------------------------------------------- cuda backend
def _cuda_dtypes_ok(x, params) -> str | None:
    """The CUDA kernels (csrc/cuda/group_norm.h) take float x with parameters of its dtype, or fp32
    ones for fp16/bf16 x."""
    return (unsupported((x, *params), what="the cuda kernels")
            or params_unsupported(x.dtype, params, what="the cuda kernels"))


def _cuda_fwd_ok(x, weight, bias, G, eps, act, slope) -> str | None:
    return _cuda_dtypes_ok(x, (weight, bias))


def _cuda_bwd_ok(dy, x, weight, bias, mean, rstd, G, act, slope) -> str | None:
    return _cuda_dtypes_ok(x, (weight, bias))


backend.register("group_norm_fwd", "cuda", backend.cpp("group_norm_fwd"), _cuda_fwd_ok)
backend.register("group_norm_bwd", "cuda", backend.cpp("group_norm_bwd"), _cuda_bwd_ok)
