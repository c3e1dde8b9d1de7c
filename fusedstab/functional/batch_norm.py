"""BatchNorm and SyncBatchNorm (+ a fused activation) with torch.nn.functional's signature and errors."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ..autograd import BatchNormFunction, SyncBatchNormFunction
from .checks import check_activation, check_param_dtypes, type_name


def _check_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      verify_batch_size=True) -> None:
    """Raise what torch.nn.functional.batch_norm raises, in its order (same exception types)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm(): argument 'input' must be Tensor, not {type(input).__name__}")
    if training and verify_batch_size:  # torch's _verify_batch_size
        size = list(input.shape)
        if math.prod(size[:1] + size[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not isinstance(momentum, numbers.Real):
        raise TypeError(f"batch_norm(): argument 'momentum' (position 7) must be float, not {type(momentum).__name__}")
    if input.dim() < 1:
        raise RuntimeError(f"batch_norm: expected input of shape (N, C, *), got {input.dim()}-D input")
    if not training and input.numel():  # torch returns an empty input's empty result without them
        for name, r in (("running_mean", running_mean), ("running_var", running_var)):
            if r is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    C = input.shape[1] if input.dim() > 1 else 0  # an empty 1-D input has no channels, as in torch
    params = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for name, p in params.items():
        if p is not None and p.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {p.numel()}")
        if p is not None and p.device != input.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"{input.device} and {p.device}!")
    if input.dim() == 1 and input.numel():  # torch reads the channel count from dim 1 of any input
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    if not input.is_floating_point():
        raise NotImplementedError(f'"batch_norm" not implemented for \'{type_name(input.dtype)}\'')
    check_param_dtypes("batch_norm", input, params)


def _update_running(running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch statistic, the variance unbiased."""
    count, mean, m2 = stats
    with torch.no_grad():  # in the statistics' dtype, one rounding into the buffer
        for r, batch in ((running_mean, mean), (running_var, m2 / (count - 1))):
            r.copy_(torch.lerp(r.to(batch.dtype), batch, momentum))


def _flat(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.reshape(-1)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, activation: Optional[str] = None,
               negative_slope: float = 0.01) -> Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm``, then ``activation`` (None, "relu", "leaky_relu"
    with ``negative_slope``, "silu") in the same kernel, forward and backward.

    Training normalizes by the batch statistics (biased variance) and updates ``running_mean`` and
    ``running_var`` in place when given (unbiased variance; an empty batch leaves them as they are);
    eval normalizes by the running statistics. Input (N, C) or (N, C, *): NCHW and channels_last(_3d)
    are read in place and the output keeps the layout; each channel's reduction is split across
    programs. Statistics in fp32 (fp64 for fp64 input); dweight and dbias are deterministic.
    """
    act, slope = check_activation(activation, negative_slope)
    _check_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.dim() == 1 or (not input.numel() and not training and running_mean is None):
        return input.clone()  # empty (the check refused the other 1-D inputs), as torch
    y, stats = BatchNormFunction.apply(input, _flat(weight), _flat(bias), _flat(running_mean), _flat(running_var),
                                       bool(training), float(eps), act, slope)
    if training and running_mean is not None and input.numel():
        _update_running(running_mean, running_var, stats.view(3, *running_mean.shape), float(momentum))
    return y


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float, process_group,
                    activation: Optional[str] = None, negative_slope: float = 0.01) -> Tensor:
    """``batch_norm`` in training over the batches of every process of ``process_group`` (a
    torch.distributed group; None: the default group), as torch.nn.SyncBatchNorm computes it: the same
    output and running statistics on every rank as one BatchNorm over the concatenated batch (ranks may
    hold different batch sizes, 0 included), dinput as that BatchNorm's; dweight and dbias are the rank's
    own contribution (data parallelism reduces them). Runs on any device its process group serves
    (gloo: CPU tensors too)."""
    import torch.distributed as dist

    act, slope = check_activation(activation, negative_slope)
    # one value per channel on this rank is fine: the group's batch counts (as torch's SyncBatchNorm)
    _check_batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps, verify_batch_size=False)
    group = process_group if process_group is not None else dist.group.WORLD
    y, stats = SyncBatchNormFunction.apply(input, _flat(weight), _flat(bias), float(eps), act, slope, group,
                                           dist.get_world_size(group))
    if running_mean is not None:
        _update_running(running_mean, running_var, stats.view(3, *running_mean.shape), float(momentum))
    return y
