"""torch.autograd.Function classes composing the fusedstab forward and backward ops, one file per op.

Each takes already-validated arguments (see fusedstab.functional, which checks them as torch does).
"""
from .attention import ScaledDotProductAttentionFunction, broadcast_to
from .batch_norm import BatchNormFunction, SyncBatchNormFunction
from .bias_leaky_relu import BiasLeakyReLUFunction
from .group_norm import GroupNormFunction
from .layer_norm import AddLayerNormFunction, LayerNormFunction, RMSNormFunction
from .linear_leaky_relu import LinearLeakyReLUFunction

__all__ = ["AddLayerNormFunction", "BatchNormFunction", "BiasLeakyReLUFunction", "GroupNormFunction",
           "LayerNormFunction", "LinearLeakyReLUFunction", "RMSNormFunction", "ScaledDotProductAttentionFunction",
           "SyncBatchNormFunction", "broadcast_to"]
