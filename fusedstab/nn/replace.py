"""replace_modules(): switch a model's torch.nn norms and attention to fusedstab's in place."""
import torch

from .attention import MultiheadAttention
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm
from .group_norm import GroupNorm
from .layer_norm import LayerNorm, RMSNorm

# torch.nn class -> fusedstab subclass with the same state (so swapping the class is enough; the fused
# activation, which torch's modules lack, starts as None).
_DROP_INS = {torch.nn.LayerNorm: LayerNorm, torch.nn.RMSNorm: RMSNorm, torch.nn.GroupNorm: GroupNorm,
             torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d,
             torch.nn.SyncBatchNorm: SyncBatchNorm, torch.nn.MultiheadAttention: MultiheadAttention}


def replace_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Make every exact torch.nn LayerNorm, RMSNorm, GroupNorm, BatchNorm1d/2d/3d, SyncBatchNorm and
    MultiheadAttention in ``model`` (the model itself included) a fusedstab module, keeping its
    parameters, buffers and hooks. Returns ``model``."""
    for module in model.modules():
        new = _DROP_INS.get(type(module))
        if new is not None:
            module.__class__ = new
            if new not in (LayerNorm, RMSNorm, MultiheadAttention):
                module.activation, module.negative_slope = None, 0.01
    return model
