"""LinearLeakyReLU: a torch.nn.Linear whose bias and Leaky ReLU ride in the matmul epilogue (parameters
and state_dict are Linear's)."""
import torch

from .. import functional as F


class LinearLeakyReLU(torch.nn.Linear):
    """``leaky_relu(torch.nn.Linear(...)(x), negative_slope)`` in one Triton matmul. A subclass of
    torch.nn.Linear: same constructor (plus negative_slope), initialisation and state_dict, so the
    weights of a Linear load as they are."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, negative_slope: float = 0.01,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.negative_slope = negative_slope

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear_leaky_relu(input, self.weight, self.bias, self.negative_slope)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, negative_slope={self.negative_slope}"
