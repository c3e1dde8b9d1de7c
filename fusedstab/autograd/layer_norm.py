"""LayerNorm, RMSNorm and the fused residual add + norm: autograd.Functions over
``fusedstab::layer_norm_fwd`` / ``layer_norm_bwd``."""
from __future__ import annotations

import math

import torch

from .. import ops  # noqa: F401  (registers torch.ops.fusedstab.*)
from .common import forward_backend, remember_backend

_ops = torch.ops.fusedstab


def _rows(t, normalized_shape):
    """(M, N) view of t over its trailing normalized_shape (a copy only where no view exists)."""
    n = math.prod(normalized_shape)
    m = math.prod(t.shape[: t.dim() - len(normalized_shape)])
    return t.reshape(m, n)


def _flat(p):
    return None if p is None else p.reshape(-1)


def _forward(ctx, x, residual, normalized_shape, weight, bias, eps, rms):
    """Shared forward: returns (y, h) with h = x + residual, or None without one, both in x's shape
    (the op's own outputs, which a user may modify in place)."""
    normalized_shape = tuple(normalized_shape)
    w, b = _flat(weight), _flat(bias)
    y, h, mean, rstd = _ops.layer_norm_fwd(x, w, b, residual, eps, rms, len(normalized_shape))
    remember_backend(ctx)
    ctx.rms, ctx.normalized_shape, ctx.shape = rms, normalized_shape, x.shape
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
    # Backward needs the normalized h: x itself, or with a residual the h just written (an output:
    # an in-place op on it then raises autograd's version-counter error, as after torch's layer_norm).
    ctx.save_for_backward(x if residual is None else h, w, b, mean, rstd)
    return y, h if residual is not None else None


def _backward(ctx, dy, dh=None):
    """Shared backward: returns (dx, dresidual or None, dweight or None, dbias or None)."""
    h, w, b, mean, rstd = ctx.saved_tensors
    ns = ctx.normalized_shape
    dh2 = None if dh is None else _rows(dh, ns)
    with forward_backend(ctx):
        dx, dw, db = _ops.layer_norm_bwd(_rows(dy, ns), _rows(h, ns), w, b, mean, rstd, dh2, ctx.rms)
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
        # An output nobody used gets None, not a materialized zero tensor: the common pre-norm block
        # uses both, but where h is dropped a zero dh would cost a write and a read of M x N.
        ctx.set_materialize_grads(False)
        return _forward(ctx, x, residual, normalized_shape, weight, bias, eps, rms)

    @staticmethod
    def backward(ctx, dy, dh):
        if dy is None:  # only h = x + residual was used: it passes dh on to both
            if dh is None:
                return (None,) * 7
            x_dtype, r_dtype = ctx.dtypes
            return dh.to(x_dtype), dh.to(r_dtype), None, None, None, None, None
        dx, dres, dw, db = _backward(ctx, dy, dh)
        return dx, dres, None, dw, db, None, None
