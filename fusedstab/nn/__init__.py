"""Drop-in replacements for torch.nn modules."""
from .normalization import LayerNorm, RMSNorm
from .replace import replace_modules

__all__ = ["LayerNorm", "RMSNorm", "replace_modules"]
