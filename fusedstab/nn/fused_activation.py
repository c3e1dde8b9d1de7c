"""What the norms with a fused activation (GroupNorm, the BatchNorms) share: torch's constructor plus
``activation`` / ``negative_slope``, and torch's repr plus the activation."""
import inspect

from .. import functional as F


def init_norm(self, torch_cls, args, bias, activation, negative_slope):
    """torch_cls.__init__(self, *args) with the keyword ``bias`` (passed on where this torch's module
    has it, done here where it does not: torch < 2.13), and the fused activation."""
    F.check_activation(activation, negative_slope)
    if "bias" in inspect.signature(torch_cls.__init__).parameters:
        torch_cls.__init__(self, *args, bias=bias)
    else:
        torch_cls.__init__(self, *args)
        if not bias and self.bias is not None:
            self.bias = None
    self.activation, self.negative_slope = activation, negative_slope


class FusedActivation:
    """repr: torch's, plus the activation when one is set."""

    def extra_repr(self) -> str:
        act = "" if self.activation is None else f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            act += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + act
