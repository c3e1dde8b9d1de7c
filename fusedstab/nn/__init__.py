"""Drop-in replacements for torch.nn modules, and fused blocks."""
from .activation import BiasLeakyReLU, LinearLeakyReLU
from .attention import MultiheadAttention
from .normalization import BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, LayerNorm, RMSNorm, SyncBatchNorm
from .replace import replace_modules

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BiasLeakyReLU", "GroupNorm", "LayerNorm", "LinearLeakyReLU",
           "MultiheadAttention", "RMSNorm", "SyncBatchNorm", "replace_modules"]
