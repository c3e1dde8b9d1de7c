"""BatchNorm with an optional fused activation, as torch.library custom ops (the steps that
SyncBatchNorm needs to reduce across processes in between, as torch's batch_norm_stats / _elemt /
_backward_reduce / _backward_elemt are).

``fusedstab::batch_norm_stats(x) -> stats (3, C)``: count, mean and M2 per channel
``fusedstab::batch_norm_elemt(x, weight, bias, mean, rstd, activation, slope) -> y``
``fusedstab::batch_norm_bwd_reduce(dy, x, weight, bias, mean, rstd, activation, slope) -> sums (2, C)``:
  sum(dz) and sum(dz * xhat), which are dbias and dweight
``fusedstab::batch_norm_bwd_elemt(dy, x, weight, bias, mean, rstd, coef, activation, slope) -> dx``:
  coef = sums / count in training, None in eval

x is the caller's (N, C, *) tensor (dy likewise): dense NCHW or dense with the channels innermost
(channels_last, and (N, C) input) is read in place, any other layout through a contiguous copy
(fusedstab.ops.layout.channels_first). y and dx have x's shape and that layout's strides, so that a
user may modify y in place. mean, rstd, stats, sums and coef are in the accumulation dtype.

What every backend may assume (and the C++ kernels check): numel > 0; x the (N, C, S) view of one of
the layouts of fusedstab.ops.layout (dense NCHW or channels-inner), dy and the y / dx it writes with
x's strides; weight and bias contiguous (C,) (the input's dtype, or fp32 for fp16/bf16 input); mean,
rstd (C,) and coef (2, C) contiguous in the accumulation dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..numerics import acc_dtype, params_unsupported, unsupported
from .layout import channels_first, channels_inner, like, ncs


def _per_channel(x: Tensor, rows: int) -> Tensor:
    return x.new_empty((rows, x.shape[1]), dtype=acc_dtype(x.dtype))


def _dense(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.contiguous()


def _like_x(x: Tensor) -> Tensor:
    return torch.empty_like(channels_first(x))


@torch.library.custom_op("fusedstab::batch_norm_stats", mutates_args=())
def batch_norm_stats(x: Tensor) -> Tensor:
    stats = _per_channel(x, 3)
    if not x.numel():  # an empty batch: count 0, mean 0, M2 0
        return stats.zero_()
    backend.dispatch("batch_norm_stats", x.device.type, (stats,), ncs(channels_first(x)))
    return stats


@batch_norm_stats.register_fake
def _(x):
    return _per_channel(x, 3)


@torch.library.custom_op("fusedstab::batch_norm_elemt", mutates_args=())
def batch_norm_elemt(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                     activation: str, slope: float) -> Tensor:
    x = channels_first(x)
    y = torch.empty_like(x)
    if x.numel():
        backend.dispatch("batch_norm_elemt", x.device.type, (ncs(y),), ncs(x), _dense(weight), _dense(bias),
                         mean.contiguous(), rstd.contiguous(), activation, slope)
    return y


@batch_norm_elemt.register_fake
def _(x, weight, bias, mean, rstd, activation, slope):
    return _like_x(x)


@torch.library.custom_op("fusedstab::batch_norm_bwd_reduce", mutates_args=())
def batch_norm_bwd_reduce(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                          rstd: Tensor, activation: str, slope: float) -> Tensor:
    sums = _per_channel(x, 2)
    if not x.numel():
        return sums.zero_()
    x = channels_first(x)
    backend.dispatch("batch_norm_bwd_reduce", x.device.type, (sums,), ncs(like(dy, x)), ncs(x), _dense(weight),
                     _dense(bias), mean.contiguous(), rstd.contiguous(), activation, slope)
    return sums


@batch_norm_bwd_reduce.register_fake
def _(dy, x, weight, bias, mean, rstd, activation, slope):
    return _per_channel(x, 2)


@torch.library.custom_op("fusedstab::batch_norm_bwd_elemt", mutates_args=())
def batch_norm_bwd_elemt(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                         rstd: Tensor, coef: Optional[Tensor], activation: str, slope: float) -> Tensor:
    x = channels_first(x)
    dx = torch.empty_like(x)
    if x.numel():
        backend.dispatch("batch_norm_bwd_elemt", x.device.type, (ncs(dx),), ncs(like(dy, x)), ncs(x),
                         _dense(weight), _dense(bias), mean.contiguous(), rstd.contiguous(),
                         None if coef is None else coef.contiguous(), activation, slope)
    return dx


@batch_norm_bwd_elemt.register_fake
def _(dy, x, weight, bias, mean, rstd, coef, activation, slope):
    return _like_x(x)


# ----------------------------------------------------------------------------- torch backend
def _copy_into(fn):
    def impl(outs, *args):
        outs[0].copy_(fn(*args))
    return impl


backend.register("batch_norm_stats", "torch", _copy_into(reference.batch_norm_stats))
backend.register("batch_norm_elemt", "torch", _copy_into(reference.batch_norm_elemt))
backend.register("batch_norm_bwd_reduce", "torch", _copy_into(reference.batch_norm_bwd_reduce))
backend.register("batch_norm_bwd_elemt", "torch", _copy_into(reference.batch_norm_bwd_elemt))


# ----------------------------------------------------------------------------- triton backend
def _triton_ok(*args) -> str | None:
    return unsupported(args, what="the triton kernels")


def _stats_triton(outs, x):
    from ..kernels import batch_norm as K

    acc = acc_dtype(x.dtype)
    outs[0].copy_(K.combine(K.stats(x, channels_inner(x), acc)[0], acc))


def _elemt_triton(outs, x, weight, bias, mean, rstd, act, slope):
    from ..kernels import batch_norm as K

    K.elemt(x, weight, bias, outs[0], mean, rstd, act, slope, channels_inner(x))


def _bwd_reduce_triton(outs, dy, x, weight, bias, mean, rstd, act, slope):
    from ..kernels import batch_norm as K

    part = K.bwd_reduce(dy, x, weight, bias, mean, rstd, act, slope, channels_inner(x))
    outs[0].copy_(part[0].sum(1))  # (2, SPLIT, C): programs in a fixed order


def _bwd_elemt_triton(outs, dy, x, weight, bias, mean, rstd, coef, act, slope):
    from ..kernels import batch_norm as K

    if coef is not None:  # the kernel takes (w * mean(dz), w * mean(dz * xhat))
        coef = coef.to(mean.dtype) * (1.0 if weight is None else weight.to(mean.dtype))
    K.bwd_elemt(dy, x, weight, bias, outs[0], mean, rstd, coef, act, slope, channels_inner(x))


backend.register("batch_norm_stats", "triton", _stats_triton, _triton_ok)
backend.register("batch_norm_elemt", "triton", _elemt_triton, _triton_ok)
backend.register("batch_norm_bwd_reduce", "triton", _bwd_reduce_triton, _triton_ok)
backend.register("batch_norm_bwd_elemt", "triton", _bwd_elemt_triton, _triton_ok)


# ----------------------------------------------------------------------------- cpu backend (csrc/cpu/batch_norm.cpp)
def _cpp_ok(*args) -> str | None:
    return unsupported(args, what="the C++ kernels")


for _op in ("batch_norm_stats", "batch_norm_elemt", "batch_norm_bwd_reduce", "batch_norm_bwd_elemt"):
    backend.register(_op, "cpu", backend.cpp(_op), _cpp_ok)


# ----------------------------------------------------------------------------- cuda backend
def _cuda_ok(x, weight=None, bias=None) -> str | None:
    """The CUDA kernels (csrc/cuda/batch_norm.h) take float x with parameters of its dtype, or fp32
    ones for fp16/bf16 x."""
    return (unsupported((x, weight, bias), what="the cuda kernels")
            or params_unsupported(x.dtype, (weight, bias), what="the cuda kernels"))


backend.register("batch_norm_stats", "cuda", backend.cpp("batch_norm_stats"), _cuda_ok)
backend.register("batch_norm_elemt", "cuda", backend.cpp("batch_norm_elemt"),
                 lambda x, weight, bias, *rest: _cuda_ok(x, weight, bias))
backend.register("batch_norm_bwd_reduce", "cuda", backend.cpp("batch_norm_bwd_reduce"),
                 lambda dy, x, weight, bias, *rest: _cuda_ok(x, weight, bias))
backend.register("batch_norm_bwd_elemt", "cuda", backend.cpp("batch_norm_bwd_elemt"),
                 lambda dy, x, weight, bias, *rest: _cuda_ok(x, weight, bias))
