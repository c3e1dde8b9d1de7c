"""Drop-in replacements for torch.nn modules, and fused blocks."""
from .activation import BiasLeakyReLU, LinearLeakyReLU
from .normalization import GroupNorm, LayerNorm, RMSNorm
from .replace import replace_modules

__all__ = ["BiasLeakyReLU", "GroupNorm", "LayerNorm", "LinearLeakyReLU", "RMSNorm", "replace_modules"]
