"""Drop-in replacements for torch.nn modules, and fused blocks."""
from .activation import BiasLeakyReLU, LinearLeakyReLU
from .normalization import LayerNorm, RMSNorm
from .replace import replace_modules

__all__ = ["BiasLeakyReLU", "LayerNorm", "LinearLeakyReLU", "RMSNorm", "replace_modules"]
