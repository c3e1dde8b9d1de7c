"""Drop-in GroupNorm (a subclass of torch.nn.GroupNorm) with an optional fused activation."""
import torch

from .. import functional as F
from .fused_activation import FusedActivation, init_norm


class GroupNorm(FusedActivation, torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` computed by fusedstab's kernels, optionally followed by an activation
    fused into the same kernel (``activation``: None, "relu", "leaky_relu", "silu")."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True, activation: str | None = None,
                 negative_slope: float = 0.01):
        init_norm(self, torch.nn.GroupNorm, (num_groups, num_channels, eps, affine, device, dtype), bias,
                   activation, negative_slope)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                            self.negative_slope)
