"""Drop-in replacements for torch.nn modules, and fused blocks."""
from .attention import MultiheadAttention
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm
from .bias_leaky_relu import BiasLeakyReLU
from .blocks import ConvNormAct, TransformerBlock
from .group_norm import GroupNorm
from .layer_norm import LayerNorm, RMSNorm
from .linear_leaky_relu import LinearLeakyReLU
from .replace import ReplaceReport, replace_modules

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BiasLeakyReLU", "ConvNormAct", "GroupNorm", "LayerNorm",
           "LinearLeakyReLU", "MultiheadAttention", "RMSNorm", "ReplaceReport", "SyncBatchNorm", "TransformerBlock",
           "replace_modules"]
