"""Drop-in torch.nn.MultiheadAttention whose attention runs on fusedstab's fused kernels."""
import torch
import torch.nn.functional as TF

from .. import functional as F


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` (same constructor, parameters, state_dict, repr). With
    ``need_weights=False`` the attention is fusedstab.functional.scaled_dot_product_attention (the L x S
    weights never exist); ``need_weights=True`` has to materialize them, and runs torch's own forward
    so that the weights are exactly torch's."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        is_batched = query.dim() == 3
        key_padding_mask = TF._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                              other_type=TF._none_or_dtype(attn_mask), other_name="attn_mask",
                                              target_type=query.dtype)
        attn_mask = TF._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                       target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal)
        return (out.transpose(1, 0) if self.batch_first and is_batched else out), None

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        """torch.nn.functional.multi_head_attention_forward with need_weights=False (sequence-first
        input), the attention itself on fusedstab's kernels."""
        H = self.num_heads
        is_batched = TF._mha_shape_check(query, key, value, key_padding_mask, attn_mask, H)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None:
            attn_mask = None  # the hint stands for the mask: the kernel skips the blocks above the diagonal
        elif key_padding_mask is not None:
            is_causal = False  # merged with the padding, the mask is no longer causal
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        head_dim = embed_dim // H
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
            q, k, v = TF._in_projection_packed(query, key, value, self.in_proj_weight, self.in_proj_bias)
        else:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                     f"{value.shape[:2]}")
            b = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q, k, v = TF._in_projection(query, key, value, self.q_proj_weight, self.k_proj_weight,
                                        self.v_proj_weight, *b)
        if attn_mask is not None:
            want = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * H, tgt_len, src_len)
            if attn_mask.dim() not in (2, 3):
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
            if attn_mask.shape != want:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but "
                                   f"should be {want}.")
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.dim() == 2 else attn_mask
        extra = []  # key/value rows appended: bias_k / bias_v, then a zero row
        if self.bias_k is not None and self.bias_v is not None:
            extra.append((self.bias_k.repeat(1, bsz, 1), self.bias_v.repeat(1, bsz, 1)))
        if self.add_zero_attn:
            extra.append((k.new_zeros(1, bsz, embed_dim), v.new_zeros(1, bsz, embed_dim)))
        for bk, bv in extra:
            k, v = torch.cat([k, bk]), torch.cat([v, bv])
            attn_mask = None if attn_mask is None else TF.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else TF.pad(key_padding_mask, (0, 1))
        src_len = k.shape[0]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                                     f"{key_padding_mask.shape}")
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, H, -1, -1).reshape(bsz * H, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        if attn_mask is not None:  # (1 or bsz * H, L, S) -> broadcastable to (bsz, H, L, S)
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(bsz, H, -1, src_len)
        # (L, bsz, E) -> (bsz, H, L, head_dim) views: the kernels read them in place
        q, k, v = (t.view(t.shape[0], bsz, H, head_dim).permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, self.dropout if self.training else 0.0, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
        out = TF.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
        return out if is_batched else out.squeeze(1)
