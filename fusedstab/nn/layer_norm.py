"""Drop-in LayerNorm and RMSNorm: subclasses of the torch.nn modules, so the constructor, defaults,
parameters, state_dict keys, repr and reset_parameters are torch's own; only forward is fused."""
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
