"""BiasLeakyReLU: a module that owns a bias and applies leaky_relu(x + bias) in one kernel."""
import torch

from .. import functional as F


class BiasLeakyReLU(torch.nn.Module):
    """``leaky_relu(x + bias)`` with the learnable bias (num_features,) broadcast along ``dim``
    (-1 after a Linear without bias, 1 after an NCHW convolution without bias). The bias starts at 0."""

    def __init__(self, num_features: int, negative_slope: float = 0.01, dim: int = -1,
                 device=None, dtype=None):
        super().__init__()
        self.num_features, self.negative_slope, self.dim = num_features, negative_slope, dim
        self.bias = torch.nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.bias_leaky_relu(input, self.bias, self.negative_slope, self.dim)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, negative_slope={self.negative_slope}, dim={self.dim}"
