"""Drop-in BatchNorm1d/2d/3d and SyncBatchNorm (subclasses of torch's) with an optional fused activation."""
import torch

from .. import functional as F
from .fused_activation import FusedActivation, init_norm


class _BatchNorm(FusedActivation):
    """forward as torch's _BatchNorm.forward, through fusedstab.functional.batch_norm."""

    def _factor_and_buffers(self):
        """(momentum factor, bn_training, running_mean, running_var) as torch's _BatchNorm.forward
        decides them (counting the step in num_batches_tracked)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats  # buffers passed only to be used or updated
        return (factor, bn_training, self.running_mean if tracked else None,
                self.running_var if tracked else None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor, bn_training, running_mean, running_var = self._factor_and_buffers()
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                            self.eps, self.activation, self.negative_slope)


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by fusedstab's kernels, optionally followed by a fused activation."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation: str | None = None, negative_slope: float = 0.01):
        init_norm(self, torch.nn.BatchNorm1d, (num_features, eps, momentum, affine, track_running_stats, device,
                                                dtype), bias, activation, negative_slope)


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by fusedstab's kernels, optionally followed by a fused activation."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation: str | None = None, negative_slope: float = 0.01):
        init_norm(self, torch.nn.BatchNorm2d, (num_features, eps, momentum, affine, track_running_stats, device,
                                                dtype), bias, activation, negative_slope)


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by fusedstab's kernels, optionally followed by a fused activation."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation: str | None = None, negative_slope: float = 0.01):
        init_norm(self, torch.nn.BatchNorm3d, (num_features, eps, momentum, affine, track_running_stats, device,
                                                dtype), bias, activation, negative_slope)


class SyncBatchNorm(_BatchNorm, torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` computed by fusedstab's kernels, optionally followed by a fused
    activation: in training under torch.distributed the statistics and backward sums are reduced across
    ``process_group`` (see fusedstab.functional.sync_batch_norm). Unlike torch's it runs on CPU tensors
    too (gloo)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True, activation: str | None = None, negative_slope: float = 0.01):
        init_norm(self, torch.nn.SyncBatchNorm, (num_features, eps, momentum, affine, track_running_stats,
                                                  process_group, device, dtype), bias, activation, negative_slope)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor, bn_training, running_mean, running_var = self._factor_and_buffers()
        group = None
        if bn_training and self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = self.process_group or torch.distributed.group.WORLD
            group = group if torch.distributed.get_world_size(group) > 1 else None
        if group is None:  # no one to synchronize with: plain BatchNorm
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                                self.eps, self.activation, self.negative_slope)
        return F.sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor, self.eps, group,
                                 self.activation, self.negative_slope)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, giving fusedstab SyncBatchNorm modules
        (that share the parameters and buffers, and keep a fusedstab BatchNorm's activation)."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, bias=module.bias is not None,
                      activation=getattr(module, "activation", None),
                      negative_slope=getattr(module, "negative_slope", 0.01))
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return out
