"""Gradient clipping with torch.nn.utils' signatures and semantics, on multi-tensor kernels.

The norm of every gradient of one (device, dtype) group is one launch (plus a per-tensor finish),
the clip coefficient is computed on the device, and the scaling is one more launch per group: no
host sync and no data-dependent Python control flow unless ``error_if_nonfinite`` asks for one, so
the whole clip can be captured in a CUDA graph.

Beyond torch: ``max_norm`` may be a tensor; ``get_total_norm(..., return_per_tensor=True)`` also
gives every tensor's own norm from the same pass; ``nonfinite="skip"`` zeroes the gradients instead
of scaling them when the total norm is NaN/Inf (the returned norm tells, without a sync);
``process_group`` (or DTensor gradients sharded over one mesh) makes the norm global over ranks with
one all-reduce of the per-tensor reductions.
"""
from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Iterable
from typing import Optional, Union

import torch
from torch import Tensor

from .. import ops  # noqa: F401  (registers torch.ops.fusedstab.*)

_ops = torch.ops.fusedstab
_tensor_or_tensors = Union[Tensor, Iterable[Tensor]]

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_", "get_total_norm"]


def _as_list(tensors) -> list:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def _grouped(tensors: list[Tensor]) -> dict:
    """(device, dtype) -> indices into ``tensors``, in first-seen order."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def _unshard(tensors: list[Tensor], process_group):
    """Local tensors and the group to all-reduce over: an explicit group (the tensors are shards),
    or the mesh of DTensor gradients that are all sharded on one 1-D mesh."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:
        return tensors, process_group
    dts = [t for t in tensors if isinstance(t, DTensor)]
    if not dts:
        return tensors, process_group
    mesh = dts[0].device_mesh
    if (len(dts) != len(tensors) or mesh.ndim != 1 or process_group is not None
            or any(t.device_mesh != mesh or not all(isinstance(p, Shard) for p in t.placements) for t in dts)):
        raise NotImplementedError("fusedstab clipping takes DTensor gradients sharded (Shard placements) "
                                  "over one 1-D mesh, all of them, and no explicit process_group")
    return [t.to_local() for t in dts], mesh.get_group()


def _per_tensor_reductions(tensors: list[Tensor], norm_type: float, sharded: bool) -> Tensor:
    """multi_tensor_norm over every (device, dtype) group, on the first tensor's device, input order."""
    first = tensors[0].device
    for t in tensors:
        if not (t.is_floating_point() or t.is_complex()):
            raise RuntimeError(f"linalg.vector_norm: Expected a floating point or complex tensor as input. "
                               f"Got {t.dtype}")
        # torch refuses the norms without an identity (inf, -inf, p < 0) on an empty tensor; a rank's
        # empty shard is fine (the op gives the identity).
        if t.numel() == 0 and (norm_type < 0 or norm_type == float("inf")) and not sharded:
            raise RuntimeError(f"linalg.vector_norm cannot compute the {norm_type} norm on an empty tensor "
                               "because the operation does not have an identity")
    acc = torch.float64 if any(_real_dtype(t) == torch.float64 for t in tensors) else torch.float32
    parts, order = [], []
    for idx in _grouped(tensors).values():
        parts.append(_ops.multi_tensor_norm([tensors[i] for i in idx], norm_type).to(first, acc))
        order += idx
    red = torch.cat(parts) if len(parts) > 1 else parts[0]
    if order != list(range(len(tensors))):
        red = red[_inverse_permutation(tuple(order), first)]
    return red


@functools.lru_cache(64)
def _inverse_permutation(order: tuple, device: torch.device) -> Tensor:
    """Back to input order after grouping by dtype; cached on the device, so that steady-state steps
    (and CUDA-graph replays, after a warm-up call) copy nothing from the host."""
    inverse = torch.empty(len(order), dtype=torch.int64)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return inverse.to(device)


@torch.no_grad()
def get_total_norm(tensors: _tensor_or_tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach: Optional[bool] = None, *, return_per_tensor: bool = False,
                   process_group=None):
    """``torch.nn.utils.get_total_norm``; with ``return_per_tensor`` returns ``(total, norms)``
    where ``norms[i]`` is the norm of ``tensors[i]`` (accumulation dtype, first tensor's device).

    ``foreach`` is accepted for compatibility: the fusedstab kernels always take every tensor of a
    group at once. With ``process_group`` the tensors are this rank's shards and the result is the
    norm of all ranks' shards together (one all-reduce, no host sync).
    """
    tensors = _as_list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        total = torch.tensor(0.0)
        return (total, torch.zeros(0)) if return_per_tensor else total
    out_dtype = functools.reduce(torch.promote_types, [_real_dtype(t) for t in tensors])
    tensors, group = _unshard(tensors, process_group)
    red = _per_tensor_reductions(tensors, norm_type, sharded=group is not None)
    if group is not None:
        import torch.distributed as dist

        op = {float("inf"): dist.ReduceOp.MAX, float("-inf"): dist.ReduceOp.MIN}.get(norm_type, dist.ReduceOp.SUM)
        dist.all_reduce(red, op=op, group=group)
    if norm_type == float("inf"):
        total = red.max()
    elif norm_type == float("-inf"):
        total = red.min()
    elif norm_type == 0.0:
        total = (red != 0).sum().to(red.dtype)  # torch: the 0-"norm" of the per-tensor norms
    else:
        total = red.sum().pow(1.0 / norm_type)
    total = total.to(out_dtype)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`")
    if not return_per_tensor:
        return total
    finite_p = norm_type not in (0.0, float("inf"), float("-inf"))
    return total, (red.pow(1.0 / norm_type) if finite_p else red)


@torch.no_grad()
def clip_grads_with_norm_(parameters: _tensor_or_tensors, max_norm: Union[float, Tensor], total_norm: Tensor,
                          foreach: Optional[bool] = None, *, nonfinite: str = "scale") -> None:
    """``torch.nn.utils.clip_grads_with_norm_``: grads *= min(max_norm / (total_norm + 1e-6), 1).

    ``max_norm`` may be a tensor (changing thresholds without recompiling or syncing).
    ``nonfinite="skip"``: when ``total_norm`` is NaN/Inf the grads are set to zero instead.
    """
    if nonfinite not in ("scale", "skip"):
        raise ValueError(f"nonfinite must be 'scale' or 'skip', got {nonfinite!r}")
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    if not grads:
        return
    if not isinstance(max_norm, Tensor):
        max_norm = float(max_norm)
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    if nonfinite == "skip":
        coef = torch.where(torch.isfinite(total_norm), coef, torch.zeros_like(coef))
    grads, _ = _unshard(grads, None)
    for (device, _), idx in _grouped(grads).items():
        _ops.multi_tensor_scale_([grads[i] for i in idx], coef.to(device), nonfinite == "skip")


@torch.no_grad()
def clip_grad_norm_(parameters: _tensor_or_tensors, max_norm: Union[float, Tensor], norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                    nonfinite: str = "scale", process_group=None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``: returns the total norm of the gradients (viewed as one
    vector) and scales them in place so that it is at most ``max_norm``. See the module docstring
    for ``max_norm`` as a tensor, ``nonfinite`` and ``process_group``."""
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = _as_list(parameters)
    if is_generator and not parameters:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = get_total_norm(grads, norm_type, error_if_nonfinite, foreach, process_group=process_group)
    clip_grads_with_norm_(parameters, max_norm, total, foreach, nonfinite=nonfinite)
    return total


def clip_grad_value_(parameters: _tensor_or_tensors, clip_value: float, foreach: Optional[bool] = None) -> None:
    """``torch.nn.utils.clip_grad_value_``: torch's own (already a pair of foreach clamps, one pass
    each over the gradients) so that the semantics are torch's exactly."""
    torch.nn.utils.clip_grad_value_(parameters, clip_value, foreach=foreach)
