"""Drop-in replacements for torch.nn modules."""
from .normalization import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
