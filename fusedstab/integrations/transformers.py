"""Hugging Face transformers: fusedstab's attention as an attention implementation.

``register()`` adds "fusedstab" to transformers' ``AttentionInterface`` (and the matching mask
function, sdpa's boolean masks, to ``AttentionMaskInterface``), so that
``AutoModel.from_config(config, attn_implementation="fusedstab")`` or
``model.set_attn_implementation("fusedstab")`` runs every attention layer on
``fusedstab.functional.scaled_dot_product_attention``: padding masks, causal masks, grouped-query
attention (without repeating the key/value heads), T5's position bias (as an additive mask, with its
gradient) and dropout included. ``apply(model)`` does both; ``fusedstab.nn.replace_modules`` calls it
for transformers models. Importing this module imports transformers.
"""
from __future__ import annotations

import torch

from .. import functional as F

NAME = "fusedstab"


def fusedstab_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None,
                                position_bias: torch.Tensor | None = None, **kwargs):
    """transformers' attention-function signature (as its ``sdpa_attention_forward``): q (B, H, L, E),
    k / v (B, Hkv, S, E); returns (output (B, L, H, Ev), None). The decisions are sdpa's: the causal
    flag only without a mask and for more than one query, a static cache's empty keys cropped at
    prefill, T5's position bias merged into an additive mask."""
    if kwargs.get("softcap") is not None:
        raise ValueError("fusedstab attention does not support `softcap`; use `eager` or `flex_attention`")
    q_length = query.shape[2]
    groups = getattr(module, "num_key_value_groups", 1)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_length:  # prefill into an empty static cache: the rest is masked anyway
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         is_causal=is_causal, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make "fusedstab" an attention implementation of transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, fusedstab_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def apply(model) -> object:
    """Run every attention layer of the transformers ``model`` on fusedstab's kernels; returns model."""
    register()
    model.set_attn_implementation(NAME)
    return model
