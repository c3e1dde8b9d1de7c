"""torch.nn.functional-style functions: same signatures, semantics and errors as torch, one file per op."""
from .attention import scaled_dot_product_attention
from .batch_norm import batch_norm, sync_batch_norm
from .bias_leaky_relu import bias_leaky_relu
from .checks import check_activation  # noqa: F401  (fusedstab.nn checks its arguments with it)
from .group_norm import group_norm
from .layer_norm import add_layer_norm, layer_norm, rms_norm
from .linear_leaky_relu import linear_leaky_relu

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "bias_leaky_relu", "linear_leaky_relu", "group_norm",
           "batch_norm", "sync_batch_norm", "scaled_dot_product_attention"]
