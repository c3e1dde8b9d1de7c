"""Drop-in LayerNorm, RMSNorm and GroupNorm: subclasses of the torch.nn modules, so the constructor,
defaults, parameters, state_dict keys, repr and reset_parameters are torch's own; only forward is fused
(GroupNorm adds an optional fused activation)."""
import torch

from .. import functional as F


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by fusedstab's fused kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by fusedstab's fused kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # torch names it x here
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` computed by fusedstab's kernels, optionally followed by an activation
    fused into the same kernel (``activation``: None, "relu", "leaky_relu", "silu")."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True, activation: str | None = None,
                 negative_slope: float = 0.01):
        F.check_activation(activation, negative_slope)
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype, bias=bias)
        self.activation, self.negative_slope = activation, negative_slope

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                            self.negative_slope)

    def extra_repr(self) -> str:
        act = "" if self.activation is None else f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            act += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + act
