"""Multi-tensor reductions and scaling (global-norm gradient clipping) as torch.library custom ops.

``fusedstab::multi_tensor_norm(tensors, norm_type) -> per-tensor reductions`` (see
  fusedstab.reference.multi_tensor_norm: sum |x|^p, or max/min |x|, or the count of nonzeros)
``fusedstab::multi_tensor_scale_(tensors, coef, zero_nonfinite) -> ()``: tensors *= coef in place

Every tensor of one call shares a device and a dtype (callers group them). The Triton backend serves
dense real floating tensors in one launch per op; other tensors of the list (strided views, complex)
take the reference path inside the same call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend, reference
from ..reference import acc_dtype


@torch.library.custom_op("fusedstab::multi_tensor_norm", mutates_args=())
def multi_tensor_norm(tensors: list[Tensor], norm_type: float) -> Tensor:
    return backend.dispatch("multi_tensor_norm", tensors[0].device.type, tensors, norm_type)


@multi_tensor_norm.register_fake
def _(tensors, norm_type):
    return tensors[0].new_empty((len(tensors),), dtype=_acc(tensors))


@torch.library.custom_op("fusedstab::multi_tensor_scale_", mutates_args=("tensors",))
def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor, zero_nonfinite: bool) -> None:
    backend.dispatch("multi_tensor_scale_", tensors[0].device.type, tensors, coef, zero_nonfinite)


@multi_tensor_scale_.register_fake
def _(tensors, coef, zero_nonfinite):
    return None


def _acc(tensors) -> torch.dtype:
    t = tensors[0]
    return acc_dtype(t.real.dtype if t.is_complex() else t.dtype)


def _norm_torch(tensors, norm_type):
    return reference.multi_tensor_norm(tensors, norm_type).to(_acc(tensors))


def _scale_torch(tensors, coef, zero_nonfinite):
    reference.multi_tensor_scale_(tensors, coef, zero_nonfinite)


backend.register("multi_tensor_norm", "torch", _norm_torch)
backend.register("multi_tensor_scale_", "torch", _scale_torch)

# ----------------------------------------------------------------------------- triton backend
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _dense(t: Tensor) -> bool:
    """Elements fill [data_ptr, data_ptr + numel) exactly, in some order (contiguous, channels_last,
    permuted): the kernels can treat the tensor as flat."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _kernel_ok(t: Tensor) -> bool:
    return t.dtype in _TRITON_DTYPES and _dense(t)


def _split(tensors):
    ok = [_kernel_ok(t) for t in tensors]
    return [i for i, k in enumerate(ok) if k], [i for i, k in enumerate(ok) if not k]


def _norm_triton(tensors, norm_type):
    from ..kernels import multi_tensor as K

    fast, slow = _split(tensors)
    out = tensors[0].new_empty((len(tensors),), dtype=_acc(tensors))
    if not slow:
        return K.norm(tensors, norm_type, out)
    if fast:
        out[fast] = K.norm([tensors[i] for i in fast], norm_type, out.new_empty((len(fast),)))
    out[slow] = reference.multi_tensor_norm([tensors[i] for i in slow], norm_type).to(out.dtype)
    return out


def _scale_triton(tensors, coef, zero_nonfinite):
    from ..kernels import multi_tensor as K

    fast, slow = _split(tensors)
    coef = coef.to(tensors[0].device)
    if fast:
        K.scale_([tensors[i] for i in fast], coef, zero_nonfinite)
    if slow:
        reference.multi_tensor_scale_([tensors[i] for i in slow], coef, zero_nonfinite)


backend.register("multi_tensor_norm", "triton", _norm_triton)
backend.register("multi_tensor_scale_", "triton", _scale_triton)
