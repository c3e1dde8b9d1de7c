"""GroupNorm with an optional fused activation, as torch.library custom ops.

``fusedstab::group_norm_fwd(x, weight, bias, num_groups, eps, activation, slope) -> (y, mean, rstd)``
``fusedstab::group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, activation, slope)
  -> (dx, dweight, dbias)``

x is an (N, C, S) view with any strides (fusedstab.autograd flattens the spatial dims so that NCHW
and channels_last are both views); y and dx are ``empty_like(x)`` (the same strides when x is dense).
mean and rstd are (N, G) in the accumulation dtype. ``activation`` is "none", "relu", "leaky_relu"
(with ``slope``) or "silu", applied to weight * xhat + bias; backward recomputes its input from x.
dweight / dbias come back in the accumulation dtype, empty when weight / bias is None.
On the triton backend dense channels-last input runs on the BatchNorm kernels (whole rows of C read
per sample, per-(sample, channel) statistics combined into groups here), any other layout on the
per-group kernels of fusedstab.kernels.group_norm.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from . import batch_norm
from .batch_norm import _dense
from ..reference import acc_dtype

_EMPTY = (0,)


def _stats(x, G):
    acc = acc_dtype(x.dtype)
    return x.new_empty((x.shape[0], G), dtype=acc), x.new_empty((x.shape[0], G), dtype=acc)


@torch.library.custom_op("fusedstab::group_norm_fwd", mutates_args=())
def group_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                   activation: str, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    return backend.dispatch("group_norm_fwd", x.device.type, x, weight, bias, num_groups, eps, activation, slope)


@group_norm_fwd.register_fake
def _(x, weight, bias, num_groups, eps, activation, slope):
    return (torch.empty_like(x), *_stats(x, num_groups))


@torch.library.custom_op("fusedstab::group_norm_bwd", mutates_args=())
def group_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                   rstd: Tensor, num_groups: int, activation: str, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    return backend.dispatch("group_norm_bwd", x.device.type, dy, x, weight, bias, mean, rstd, num_groups,
                            activation, slope)


def _bwd_outputs(x, weight, bias, acc):
    dw = x.new_empty(_EMPTY if weight is None else weight.shape, dtype=acc)
    db = x.new_empty(_EMPTY if bias is None else bias.shape, dtype=acc)
    return torch.empty_like(x), dw, db


@group_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, activation, slope):
    return _bwd_outputs(x, weight, bias, mean.dtype)


def _empty_fwd(x, G):
    mean, rstd = _stats(x, G)
    return torch.empty_like(x), mean.zero_(), rstd.fill_(float("nan"))  # groups of no elements


# ----------------------------------------------------------------------------- torch backend
def _fwd_torch(x, weight, bias, G, eps, act, slope):
    if not x.numel():
        return _empty_fwd(x, G)
    y, mean, rstd = reference.group_norm_fwd(x, weight, bias, G, eps, act, slope)
    out = torch.empty_like(x)
    out.copy_(y)  # in x's layout, as the op promises
    return out, mean, rstd


def _bwd_torch(dy, x, weight, bias, mean, rstd, G, act, slope):
    dx, dw, db = _bwd_outputs(x, weight, bias, mean.dtype)
    if not x.numel():
        return dx, dw.zero_(), db.zero_()
    gx, gw, gb = reference.group_norm_bwd(dy, x, weight, bias, mean, rstd, G, act, slope)
    dx.copy_(gx)
    return dx, (dw if weight is None else dw.copy_(gw)), (db if bias is None else db.copy_(gb))


backend.register("group_norm_fwd", "torch", _fwd_torch)
backend.register("group_norm_bwd", "torch", _bwd_torch)


# ----------------------------------------------------------------------------- triton backend
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _triton_ok(*args) -> str | None:
    for t in args:
        if isinstance(t, Tensor) and t.dtype not in _FLOATS:
            return f"dtype {t.dtype} is not supported by the triton kernels"
    return None


def _fwd_channels_inner(x, weight, bias, G, eps, act, slope):
    """Channels-last: the BatchNorm kernels read whole rows of C (a group's C/G channels alone would be
    runs of a few bytes) and give per-(sample, channel) statistics, combined into groups here."""
    from ..kernels import batch_norm as KB

    N, C, S = x.shape
    acc = acc_dtype(x.dtype)
    count, pivot, pmean, pm2 = KB.stats(x, True, acc, per_sample=True).double().unbind(1)  # (N, SPLIT, C)
    count, mean, m2 = reference.chan_combine(count, pivot + pmean, pm2, dim=1)  # (N, C), float64
    count, mean, m2 = reference.chan_combine(*(t.view(N, G, C // G) for t in (count, mean, m2)), dim=2)
    mean, rstd = mean.to(acc), torch.rsqrt(m2 / count + eps).to(acc)
    y = torch.empty_like(x)
    KB.elemt(x, _dense(weight), _dense(bias), y, *(t.repeat_interleave(C // G, 1) for t in (mean, rstd)), act,
             slope, True, per_sample=True)
    return y, mean, rstd


def _bwd_channels_inner(dy, x, weight, bias, mean, rstd, G, act, slope):
    """Backward of _fwd_channels_inner: per-(sample, channel) sum(dz) and sum(dz * xhat) give dbias,
    dweight and the group means of gw = dz * w and gw * xhat for dx."""
    from ..kernels import batch_norm as KB

    N, C, S = x.shape
    w, b = _dense(weight), _dense(bias)
    mean_c, rstd_c = (t.contiguous().repeat_interleave(C // G, 1) for t in (mean, rstd))
    dy = batch_norm._as(dy, x)
    sdz, sdzx = KB.bwd_reduce(dy, x, w, b, mean_c, rstd_c, act, slope, True, per_sample=True).sum(2).unbind(1)
    wv = 1.0 if weight is None else weight.to(mean.dtype)
    coef = torch.stack([(t * wv).view(N, G, -1).sum(2).div(C // G * S).repeat_interleave(C // G, 1)
                        for t in (sdz, sdzx)], 1)  # (N, 2, C): group means of gw and gw * xhat
    dx = torch.empty_like(x)
    KB.bwd_elemt(dy, x, w, b, dx, mean_c, rstd_c, coef, act, slope, True, per_sample=True)
    return dx, sdzx.sum(0), sdz.sum(0)


def _fwd_triton(x, weight, bias, G, eps, act, slope):
    from ..kernels import batch_norm as KB
    from ..kernels import group_norm as K

    if not x.numel():
        return _empty_fwd(x, G)
    if x.shape[2] == 1 and K.rows_ok(x.shape[1], G):  # (N, C) rows: a group is C/G adjacent channels
        y, (mean, rstd) = torch.empty_like(x), _stats(x, G)
        K.rows_fwd(x[:, :, 0], _dense(weight), _dense(bias), y[:, :, 0], mean, rstd, G, eps, act, slope)
        return y, mean, rstd
    if batch_norm.channels_inner(x):
        return _fwd_channels_inner(x, weight, bias, G, eps, act, slope)
    N = x.shape[0]
    count, mean, m2 = KB.combine(K.fwd_stats(x, G), acc_dtype(x.dtype))  # per group, (N*G,) each
    rstd = torch.rsqrt(m2 / count + eps).view(N, G)
    mean = mean.view(N, G).clone()  # its own storage, as the fake promises
    y = torch.empty_like(x)
    K.fwd_norm(x, _dense(weight), _dense(bias), y, mean, rstd, G, act, slope)
    return y, mean, rstd


def _bwd_triton(dy, x, weight, bias, mean, rstd, G, act, slope):
    from ..kernels import group_norm as K

    dx, dw, db = _bwd_outputs(x, weight, bias, mean.dtype)
    if not x.numel():
        return dx, dw.zero_(), db.zero_()
    if x.shape[2] == 1 and K.rows_ok(x.shape[1], G):
        K.rows_bwd(dy[:, :, 0], x[:, :, 0], _dense(weight), _dense(bias), mean.contiguous(), rstd.contiguous(),
                   dx[:, :, 0], dw if weight is not None else None, db if bias is not None else None, G, act, slope)
        return dx, dw, db
    if batch_norm.channels_inner(x):
        gx, gw, gb = _bwd_channels_inner(dy, x, weight, bias, mean, rstd, G, act, slope)
        return gx, (dw if weight is None else dw.copy_(gw)), (db if bias is None else db.copy_(gb))
    w, b = _dense(weight), _dense(bias)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    gpart, cpart = K.bwd_reduce(dy, x, w, b, mean, rstd, G, act, slope)
    K.bwd_dx(dy, x, w, b, dx, mean, rstd, gpart.sum(1), G, act, slope)
    if weight is not None:
        dw.copy_(cpart[:, :, 0].sum((0, 1)))
    if bias is not None:
        db.copy_(cpart[:, :, 1].sum((0, 1)))
    return dx, dw, db


backend.register("group_norm_fwd", "triton", _fwd_triton, _triton_ok)
backend.register("group_norm_bwd", "triton", _bwd_triton, _triton_ok)
