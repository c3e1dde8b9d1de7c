"""Gradient statistics and the finishing program of an adaptive clipping step, as custom ops.

``fusedstab::grad_stats(tensors) -> (3, T)``: per tensor, from one read: sum |x|^2, the count of
  non-finite elements, max |x| (accumulation dtype; see fusedstab.reference.grad_stats). Every
  tensor of one call shares a device and a dtype (callers group them); as multi_tensor_norm, the
  backends get the dense real floating tensors and the others take the eager reference.
``fusedstab::grad_clip_finish(stats, state, ...) -> (total, coef, found_inf, threshold)``: the total
  norm, the mode's threshold (fixed, ZClip, running quantile), the clip coefficient and the skip flag
  from per-tensor sums, updating ``state`` and the telemetry rings in place (see
  fusedstab.reference.grad_clip_finish): one small device program, so that a clipping step never
  waits on the host.

Backends: ``torch`` (the reference), ``triton``, ``cpu`` (C++; csrc/cpu/grad_stats.cpp).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from .multi_tensor import _acc, _split

MODES = ("fixed", "zclip", "quantile")


def _stats_like(tensors) -> Tensor:
    return tensors[0].new_empty((3, len(tensors)), dtype=_acc(tensors))


@torch.library.custom_op("fusedstab::grad_stats", mutates_args=())
def grad_stats(tensors: list[Tensor]) -> Tensor:
    if not tensors:
        raise ValueError("fusedstab::grad_stats: expected a non-empty list of tensors")
    out = _stats_like(tensors)
    fast, slow = _split(tensors)
    if fast:
        part = out if not slow else out.new_empty((3, len(fast)))
        backend.dispatch("grad_stats", out.device.type, (part,), [tensors[i] for i in fast])
        if slow:
            out[:, fast] = part
    if slow:
        out[:, slow] = reference.grad_stats([tensors[i] for i in slow]).to(out.dtype)
    return out


@grad_stats.register_fake
def _(tensors):
    return _stats_like(tensors)


def _finish_outs(stats: Tensor):
    e = lambda dt: stats.new_empty((), dtype=dt)
    return e(stats.dtype), e(stats.dtype), e(torch.float32), e(stats.dtype)


def _check_finish(stats, state, max_norm, mode, ring_tensors, ring_scalars) -> None:
    if mode not in MODES:
        raise ValueError(f"grad_clip_finish: mode must be one of {MODES}, got {mode!r}")
    if stats.dim() != 2 or stats.shape[0] not in (1, 3) or stats.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"grad_clip_finish: stats must be (1 or 3, T) float32/float64, got "
                         f"{stats.dtype}{tuple(stats.shape)}")
    need = reference.WINDOW + (1 if mode == "quantile" else 0)
    if state.dtype != torch.float64 or state.dim() != 1 or state.numel() < need or state.device != stats.device:
        raise ValueError(f"grad_clip_finish: state must be a float64 vector of at least {need} elements on "
                         f"{stats.device}, got {state.dtype}{tuple(state.shape)} on {state.device}")
    if max_norm is not None and (max_norm.numel() != 1 or max_norm.device != stats.device
                                 or not max_norm.is_floating_point()):
        raise ValueError("grad_clip_finish: max_norm must be a one-element float tensor on the device of stats")
    K, T = ring_scalars.shape[0], stats.shape[1]
    if ring_scalars.dim() != 2 or ring_scalars.shape[1] != 5 or ring_scalars.device != stats.device:
        raise ValueError(f"grad_clip_finish: ring_scalars must be (K, 5) on {stats.device}")
    if ring_tensors.numel() and (tuple(ring_tensors.shape) != (K, 3, T) or stats.shape[0] != 3
                                 or ring_tensors.device != stats.device):
        raise ValueError(f"grad_clip_finish: ring_tensors must be empty or ({K}, 3, {T}) with stats of 3 rows")
    if not (stats.is_contiguous() and state.is_contiguous() and ring_tensors.is_contiguous()
            and ring_scalars.is_contiguous()):
        raise ValueError("grad_clip_finish: stats, state and the rings must be contiguous")


@torch.library.custom_op("fusedstab::grad_clip_finish", mutates_args=("state", "ring_tensors", "ring_scalars"))
def grad_clip_finish(stats: Tensor, state: Tensor, max_norm: Optional[Tensor], max_norm_value: float, clip_mode: str,
                     warmup: int, z_thresh: float, alpha: float, eps: float, q: float, skip_nonfinite: bool,
                     skip_above: float, ring_tensors: Tensor, ring_scalars: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_finish(stats, state, max_norm, clip_mode, ring_tensors, ring_scalars)
    outs = _finish_outs(stats)
    backend.dispatch("grad_clip_finish", stats.device.type, outs, stats, state, max_norm, max_norm_value, clip_mode,
                     warmup, z_thresh, alpha, eps, q, skip_nonfinite, skip_above, ring_tensors, ring_scalars)
    return outs


@grad_clip_finish.register_fake
def _(stats, state, max_norm, max_norm_value, clip_mode, warmup, z_thresh, alpha, eps, q, skip_nonfinite, skip_above,
      ring_tensors, ring_scalars):
    return _finish_outs(stats)


# ----------------------------------------------------------------------------- torch backend
def _stats_torch(outs, tensors):
    outs[0].copy_(reference.grad_stats(tensors))


def _finish_torch(outs, *args):
    for o, r in zip(outs, reference.grad_clip_finish(*args)):
        o.copy_(r)


backend.register("grad_stats", "torch", _stats_torch)
backend.register("grad_clip_finish", "torch", _finish_torch)


# ----------------------------------------------------------------------------- triton backend
def _stats_triton(outs, tensors):
    from ..kernels import grad_stats as K

    K.stats(tensors, outs[0])


def _finish_triton(outs, *args):
    from ..kernels import grad_stats as K

    K.finish(outs, *args)


backend.register("grad_stats", "triton", _stats_triton)
backend.register("grad_clip_finish", "triton", _finish_triton)


# ----------------------------------------------------------------------------- cpu backend (C++)
backend.register("grad_stats", "cpu", backend.cpp("grad_stats"))
backend.register("grad_clip_finish", "cpu", backend.cpp("grad_clip_finish"))
