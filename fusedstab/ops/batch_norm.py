"""BatchNorm with an optional fused activation, as torch.library custom ops (the steps that
SyncBatchNorm needs to reduce across processes in between, as torch's batch_norm_stats / _elemt /
_backward_reduce / _backward_elemt are).

``fusedstab::batch_norm_stats(x) -> stats (3, C)``: count, mean and M2 per channel
``fusedstab::batch_norm_elemt(x, weight, bias, mean, rstd, activation, slope) -> y``
``fusedstab::batch_norm_bwd_reduce(dy, x, weight, bias, mean, rstd, activation, slope) -> sums (2, C)``:
  sum(dz) and sum(dz * xhat), which are dbias and dweight
``fusedstab::batch_norm_bwd_elemt(dy, x, weight, bias, mean, rstd, coef, activation, slope) -> dx``:
  coef = sums / count in training, None in eval

x is an (N, C, S) view (fusedstab.autograd flattens the spatial dims): dense NCHW or dense
channels-last is read in place, any other layout through a contiguous copy. y and dx are
``empty_like(x)``. mean, rstd, stats, sums and coef are in the accumulation dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..reference import acc_dtype


def _per_channel(x: Tensor, rows: int) -> Tensor:
    return x.new_empty((rows, x.shape[1]), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("fusedstab::batch_norm_stats", mutates_args=())
def batch_norm_stats(x: Tensor) -> Tensor:
    return backend.dispatch("batch_norm_stats", x.device.type, x)


@batch_norm_stats.register_fake
def _(x):
    return _per_channel(x, 3)


@torch.library.custom_op("fusedstab::batch_norm_elemt", mutates_args=())
def batch_norm_elemt(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                     activation: str, slope: float) -> Tensor:
    return backend.dispatch("batch_norm_elemt", x.device.type, x, weight, bias, mean, rstd, activation, slope)


@batch_norm_elemt.register_fake
def _(x, weight, bias, mean, rstd, activation, slope):
    return torch.empty_like(x)


@torch.library.custom_op("fusedstab::batch_norm_bwd_reduce", mutates_args=())
def batch_norm_bwd_reduce(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                          rstd: Tensor, activation: str, slope: float) -> Tensor:
    return backend.dispatch("batch_norm_bwd_reduce", x.device.type, dy, x, weight, bias, mean, rstd, activation,
                            slope)


@batch_norm_bwd_reduce.register_fake
def _(dy, x, weight, bias, mean, rstd, activation, slope):
    return _per_channel(x, 2)


@torch.library.custom_op("fusedstab::batch_norm_bwd_elemt", mutates_args=())
def batch_norm_bwd_elemt(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                         rstd: Tensor, coef: Optional[Tensor], activation: str, slope: float) -> Tensor:
    return backend.dispatch("batch_norm_bwd_elemt", x.device.type, dy, x, weight, bias, mean, rstd, coef,
                            activation, slope)


@batch_norm_bwd_elemt.register_fake
def _(dy, x, weight, bias, mean, rstd, coef, activation, slope):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------- torch backend
def _into(out: Tensor, value: Tensor) -> Tensor:
    return out.copy_(value)  # in x's layout, as the ops promise


backend.register("batch_norm_stats", "torch", reference.batch_norm_stats)
backend.register("batch_norm_elemt", "torch",
                 lambda x, *args: _into(torch.empty_like(x), reference.batch_norm_elemt(x, *args)))
backend.register("batch_norm_bwd_reduce", "torch", reference.batch_norm_bwd_reduce)
backend.register("batch_norm_bwd_elemt", "torch",
                 lambda dy, x, *args: _into(torch.empty_like(x), reference.batch_norm_bwd_elemt(dy, x, *args)))


# ----------------------------------------------------------------------------- triton backend
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _triton_ok(*args) -> str | None:
    for t in args:
        if isinstance(t, Tensor) and t.dtype not in _FLOATS:
            return f"dtype {t.dtype} is not supported by the triton kernels"
    return None


def channels_inner(x: Tensor) -> bool:
    """x (N, C, S) dense with the channels innermost: channels-last, or (N, C) input as (N, C, 1)."""
    return x.transpose(1, 2).is_contiguous() and (x.shape[2] == 1 or not x.is_contiguous())


def _layout(x: Tensor) -> tuple[Tensor, bool]:
    """(x dense, channels-last?): NCHW and channels-last are read in place; (N, C, 1) reads as rows of C."""
    xk = x if channels_inner(x) or x.is_contiguous() else x.contiguous()
    return xk, channels_inner(xk)


def _as(t: Tensor, ref: Tensor) -> Tensor:
    """t with ref's strides (a copy only where they differ)."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref).copy_(t)


def _dense(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.contiguous()


def _out(x: Tensor, xk: Tensor, fill) -> Tensor:
    """``empty_like(x)`` filled by ``fill(buffer in xk's layout)``."""
    out = torch.empty_like(x)
    buf = out if out.stride() == xk.stride() else torch.empty_like(xk)
    fill(buf)
    return out if buf is out else out.copy_(buf)


def _stats_triton(x):
    from ..kernels import batch_norm as K

    acc = acc_dtype(x.dtype)
    if not x.numel():
        return _per_channel(x, 3).zero_()
    xk, cl = _layout(x)
    return K.combine(K.stats(xk, cl, acc)[0], acc)


def _elemt_triton(x, weight, bias, mean, rstd, act, slope):
    from ..kernels import batch_norm as K

    if not x.numel():
        return torch.empty_like(x)
    xk, cl = _layout(x)
    return _out(x, xk, lambda y: K.elemt(xk, _dense(weight), _dense(bias), y, mean.contiguous(),
                                         rstd.contiguous(), act, slope, cl))


def _bwd_reduce_triton(dy, x, weight, bias, mean, rstd, act, slope):
    from ..kernels import batch_norm as K

    if not x.numel():
        return _per_channel(x, 2).zero_()
    xk, cl = _layout(x)
    part = K.bwd_reduce(_as(dy, xk), xk, _dense(weight), _dense(bias), mean.contiguous(), rstd.contiguous(), act,
                        slope, cl)
    return part[0].sum(1)  # (2, SPLIT, C): programs in a fixed order


def _bwd_elemt_triton(dy, x, weight, bias, mean, rstd, coef, act, slope):
    from ..kernels import batch_norm as K

    if not x.numel():
        return torch.empty_like(x)
    xk, cl = _layout(x)
    if coef is not None:  # the kernel takes (w * mean(dz), w * mean(dz * xhat))
        coef = coef.to(mean.dtype) * (1.0 if weight is None else weight.to(mean.dtype))
    return _out(x, xk, lambda dx: K.bwd_elemt(_as(dy, xk), xk, _dense(weight), _dense(bias), dx, mean.contiguous(),
                                              rstd.contiguous(), coef, act, slope, cl))


backend.register("batch_norm_stats", "triton", _stats_triton, _triton_ok)
backend.register("batch_norm_elemt", "triton", _elemt_triton, _triton_ok)
backend.register("batch_norm_bwd_reduce", "triton", _bwd_reduce_triton, _triton_ok)
backend.register("batch_norm_bwd_elemt", "triton", _bwd_elemt_triton, _triton_ok)
