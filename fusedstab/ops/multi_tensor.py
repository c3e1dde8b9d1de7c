"""Multi-tensor reductions and scaling (global-norm gradient clipping) as torch.library custom ops.

``fusedstab::multi_tensor_norm(tensors, norm_type) -> per-tensor reductions`` (see
  fusedstab.reference.multi_tensor_norm: sum |x|^p, or max/min |x|, or the count of nonzeros)
``fusedstab::multi_tensor_scale_(tensors, coef, zero_nonfinite) -> ()``: tensors *= coef in place

Every tensor of one call shares a device and a dtype (callers group them). The public op hands the
chosen backend the dense real floating tensors of the list (elements filling [data_ptr, data_ptr +
numel) in some order; empty ones included) in one call; the others (strided views, complex) take the
eager reference inside the same call. Backends get a 0-d ``coef`` on the tensors' device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend, reference
from ..numerics import FLOATS, acc_dtype


def _acc(tensors) -> torch.dtype:
    t = tensors[0]
    return acc_dtype(t.real.dtype if t.is_complex() else t.dtype)


def _dense(t: Tensor) -> bool:
    """Elements fill [data_ptr, data_ptr + numel) exactly, in some order (contiguous, channels_last,
    permuted): the kernels can treat the tensor as flat."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _split(tensors):
    """Indices of the tensors the backends serve, and of the others."""
    ok = [t.dtype in FLOATS and _dense(t) for t in tensors]
    return [i for i, k in enumerate(ok) if k], [i for i, k in enumerate(ok) if not k]


@torch.library.custom_op("fusedstab::multi_tensor_norm", mutates_args=())
def multi_tensor_norm(tensors: list[Tensor], norm_type: float) -> Tensor:
    out = tensors[0].new_empty((len(tensors),), dtype=_acc(tensors))
    fast, slow = _split(tensors)
    if fast:
        part = out if not slow else out.new_empty((len(fast),))
        backend.dispatch("multi_tensor_norm", out.device.type, (part,), [tensors[i] for i in fast], norm_type)
        if slow:
            out[fast] = part
    if slow:
        out[slow] = reference.multi_tensor_norm([tensors[i] for i in slow], norm_type).to(out.dtype)
    return out


@multi_tensor_norm.register_fake
def _(tensors, norm_type):
    return tensors[0].new_empty((len(tensors),), dtype=_acc(tensors))


@torch.library.custom_op("fusedstab::multi_tensor_scale_", mutates_args=("tensors",))
def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor, zero_nonfinite: bool) -> None:
    fast, slow = _split(tensors)
    coef = coef.to(tensors[0].device).reshape(())
    if fast:
        backend.dispatch("multi_tensor_scale_", coef.device.type, (), [tensors[i] for i in fast], coef,
                         zero_nonfinite)
    if slow:
        reference.multi_tensor_scale_([tensors[i] for i in slow], coef, zero_nonfinite)


@multi_tensor_scale_.register_fake
def _(tensors, coef, zero_nonfinite):
    return None


# ----------------------------------------------------------------------------- torch backend
def _norm_torch(outs, tensors, norm_type):
    outs[0].copy_(reference.multi_tensor_norm(tensors, norm_type))


def _scale_torch(outs, tensors, coef, zero_nonfinite):
    reference.multi_tensor_scale_(tensors, coef, zero_nonfinite)


backend.register("multi_tensor_norm", "torch", _norm_torch)
backend.register("multi_tensor_scale_", "torch", _scale_torch)


# ----------------------------------------------------------------------------- triton backend
def _norm_triton(outs, tensors, norm_type):
    from ..kernels import multi_tensor as K

    K.norm(tensors, norm_type, outs[0])


def _scale_triton(outs, tensors, coef, zero_nonfinite):
    from ..kernels import multi_tensor as K

    K.scale_(tensors, coef, zero_nonfinite)


backend.register("multi_tensor_norm", "triton", _norm_triton)
backend.register("multi_tensor_scale_", "triton", _scale_triton)


# ----------------------------------------------------------------------------- cuda backend
backend.register("multi_tensor_norm", "cuda", backend.cpp("multi_tensor_norm"))
backend.register("multi_tensor_scale_", "cuda", backend.cpp("multi_tensor_scale_"))
