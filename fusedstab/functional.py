"""torch.nn.functional-style functions: same signatures, semantics and errors as torch."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from .autograd import (AddLayerNormFunction, BatchNormFunction, BiasLeakyReLUFunction, GroupNormFunction,
                       LayerNormFunction, LinearLeakyReLUFunction, RMSNormFunction, ScaledDotProductAttentionFunction,
                       SyncBatchNormFunction, broadcast_to)
from .reference import acc_dtype

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "bias_leaky_relu", "linear_leaky_relu", "group_norm",
           "batch_norm", "sync_batch_norm",
           "scaled_dot_product_attention"]


def _check_norm_args(name: str, input: Tensor, normalized_shape, params: dict) -> tuple:
    """Raise what torch raises for bad input (same exception types, similar messages)."""
    if isinstance(normalized_shape, numbers.Integral):
        raise TypeError(f"{name}(): argument 'normalized_shape' (position 2) must be tuple of ints, not int")
    shape = tuple(int(d) for d in normalized_shape)
    if not shape:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
                           f"least one element, but got normalized_shape = {list(shape)}")
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}(): argument 'input' must be Tensor, not {type(input).__name__}")
    if input.dim() < len(shape) and name == "rms_norm":
        raise ValueError(f"Input tensor must have at least {len(shape)} dimensions (normalized_shape="
                         f"{list(shape)}), but got {input.dim()}")
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(f"Given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of size{list(input.shape)}")
    if not input.is_floating_point() and name == "layer_norm" and any(p is not None for p in params.values()):
        raise RuntimeError("mixed dtype: all inputs must share same datatype (input is "
                           f"{input.dtype}, a floating-point weight or bias was given)")
    if not input.is_floating_point():
        raise NotImplementedError(f'"{name}" not implemented for \'{_type_name(input.dtype)}\'')
    for pname, p in params.items():
        if p is None:
            continue
        if tuple(p.shape) != shape:
            raise RuntimeError(f"Expected {pname} to be of same shape as normalized_shape, but got {pname} "
                               f"of shape {list(p.shape)} and normalized_shape = {list(shape)}")
        if p.device != input.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                               f"devices, {input.device} and {p.device}!")
        if not p.is_floating_point():
            raise RuntimeError(f"expected {pname} to have a floating-point dtype, got {p.dtype}")
    return shape


def _type_name(dtype: torch.dtype) -> str:
    return {torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
            torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
            torch.complex128: "ComplexDouble"}.get(dtype, str(dtype))


def _autocast_to_fp32(t: Tensor) -> bool:
    return t.device.type == "cuda" and torch.is_autocast_enabled("cuda")


def _float(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.float()


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Drop-in for ``torch.nn.functional.layer_norm``, one fused kernel forward and backward."""
    shape = _check_norm_args("layer_norm", input, normalized_shape, {"weight": weight, "bias": bias})
    if _autocast_to_fp32(input):
        # CUDA autocast runs layer_norm in fp32 (its fp32 op list): same numbers and output dtype.
        with torch.autocast("cuda", enabled=False):
            return layer_norm(input.float(), shape, _float(weight), _float(bias), eps)
    return LayerNormFunction.apply(input, shape, weight, bias, float(eps))


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.rms_norm``; eps=None means the machine epsilon of the
    accumulation dtype (fp32 for fp16/bf16/fp32 input, fp64 for fp64), as torch does."""
    shape = _check_norm_args("rms_norm", input, normalized_shape, {"weight": weight})
    if eps is None:
        eps = torch.finfo(acc_dtype(input.dtype)).eps
    return RMSNormFunction.apply(input, shape, weight, float(eps))


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape: Sequence[int],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: Optional[float] = 1e-5, rms: bool = False) -> tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)`` from one kernel: the pre-norm block's residual add.

    ``norm`` is layer_norm, or rms_norm when ``rms`` (then ``bias`` must be None and eps=None means
    rms_norm's default). x + residual has the promoted dtype of the two; the normalized output has
    x's dtype. Gradients flow to x, residual, weight and bias.
    """
    params = {"weight": weight} if rms else {"weight": weight, "bias": bias}
    shape = _check_norm_args("rms_norm" if rms else "layer_norm", x, normalized_shape, params)
    if rms and bias is not None:
        raise ValueError("add_layer_norm(rms=True) takes no bias: RMSNorm has none")
    if not isinstance(residual, Tensor):
        raise TypeError(f"add_layer_norm(): argument 'residual' must be Tensor, not {type(residual).__name__}")
    if residual.shape != x.shape:
        raise RuntimeError(f"add_layer_norm: residual of size {list(residual.shape)} must have the size of "
                           f"x, {list(x.shape)}")
    if residual.device != x.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{x.device} and {residual.device}!")
    if not residual.is_floating_point():
        raise NotImplementedError(f'"add_layer_norm" not implemented for residual of type {residual.dtype}')
    if eps is None:
        if not rms:
            raise TypeError("add_layer_norm: eps=None is only meaningful with rms=True")
        eps = torch.finfo(acc_dtype(torch.promote_types(x.dtype, residual.dtype))).eps
    return AddLayerNormFunction.apply(x, residual, shape, weight, bias, float(eps), bool(rms))


# ----------------------------------------------------------------------------- bias + Leaky ReLU
def _check_act_input(name: str, x, negative_slope) -> float:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}(): argument 'input' must be Tensor, not {type(x).__name__}")
    if not x.is_floating_point():  # torch's leaky_relu kernels raise this for integer/bool/complex
        raise NotImplementedError(f'"{name}" not implemented for \'{_type_name(x.dtype)}\'')
    if not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"{name}(): argument 'negative_slope' must be a number, not {type(negative_slope).__name__}")
    return float(negative_slope)


def _check_bias(name: str, bias, size: int, x: Tensor, what: str) -> None:
    if not isinstance(bias, Tensor):
        raise TypeError(f"{name}(): argument 'bias' must be Tensor or None, not {type(bias).__name__}")
    if bias.device != x.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{x.device} and {bias.device}!")
    if bias.dim() != 1 or bias.shape[0] != size:
        raise RuntimeError(f"{name}: bias of shape {list(bias.shape)} must have shape [{size}] ({what})")


def bias_leaky_relu(x: Tensor, bias: Optional[Tensor], negative_slope: float = 0.01, dim: int = -1) -> Tensor:
    """``leaky_relu(x + bias)`` in one kernel, the bias (C,) broadcast along ``dim`` of x: dim=-1 for a
    Linear output, dim=1 for an NCHW convolution output (channels_last is read and written in place).

    Output dtype is torch's for ``x + bias`` (promoted), with x's memory layout. Backward saves the
    output, or a 1-bit mask for negative_slope < 0, and gives dx and a deterministic dbias in one pass.
    ``bias=None`` is leaky_relu alone.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"bias_leaky_relu(): argument 'input' must be Tensor, not {type(x).__name__}")
    nd = x.dim()
    if nd == 0:
        raise IndexError("bias_leaky_relu: input must have at least one dimension, got a 0-d tensor")
    if not -nd <= dim < nd:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-nd}, {nd - 1}], but got {dim})")
    dim %= nd
    if bias is not None:
        _check_bias("bias_leaky_relu", bias, x.shape[dim], x, f"the size of input dimension {dim}")
        # x + bias as torch promotes it: an integer side takes the other's floating dtype.
        dt = torch.promote_types(x.dtype, bias.dtype)
        if not dt.is_floating_point:  # what torch's leaky_relu raises for x + bias of this dtype
            raise NotImplementedError(f'"bias_leaky_relu" not implemented for \'{_type_name(dt)}\'')
        x = x if x.is_floating_point() else x.to(dt)
        bias = bias if bias.is_floating_point() else bias.to(dt)
    slope = _check_act_input("bias_leaky_relu", x, negative_slope)
    return BiasLeakyReLUFunction.apply(x, bias, slope, dim)


def linear_leaky_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      negative_slope: float = 0.01) -> Tensor:
    """``leaky_relu(linear(x, weight, bias))`` from one Triton matmul with the bias and the activation
    in its epilogue; backward fuses the activation's gradient and dbias into one pass before the two
    gradient matmuls. x (*, in_features), weight (out_features, in_features), bias (out_features,).

    fp32 uses tf32 tensor cores where torch's matmuls may (``torch.backends.cuda.matmul.allow_tf32``),
    else exact fp32. Under autocast the inputs are cast as ``torch.nn.functional.linear``'s are.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"linear_leaky_relu(): argument 'input' must be Tensor, not {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"linear_leaky_relu(): argument 'weight' must be Tensor, not {type(weight).__name__}")
    if weight.dim() != 2:
        raise RuntimeError(f"linear_leaky_relu: weight must be 2-D (out_features, in_features), got {weight.dim()}-D")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        m = "x".join(map(str, (math.prod(x.shape[:-1]), x.shape[-1]))) if x.dim() else "0-d"
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({m} and "
                           f"{weight.shape[1]}x{weight.shape[0]})")
    if weight.device != x.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{x.device} and {weight.device}!")
    if bias is not None:
        _check_bias("linear_leaky_relu", bias, weight.shape[0], x, "out_features")
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        dt = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return linear_leaky_relu(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), negative_slope)
    # As F.linear: mixed dtypes are refused first; same-dtype integers then fail in leaky_relu.
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(f"expected input and {what} to have the same dtype, but got: {x.dtype} != {t.dtype}")
    slope = _check_act_input("linear_leaky_relu", x, negative_slope)
    return LinearLeakyReLUFunction.apply(x, weight, bias, slope)


# ----------------------------------------------------------------------------- GroupNorm
ACTIVATIONS = (None, "relu", "leaky_relu", "silu")


def check_activation(activation, negative_slope) -> tuple[str, float]:
    """(activation name for the ops, slope): None means "none"."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a number, not {type(negative_slope).__name__}")
    return activation or "none", float(negative_slope)


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, activation: Optional[str] = None, negative_slope: float = 0.01) -> Tensor:
    """Drop-in for ``torch.nn.functional.group_norm``, then ``activation`` (None, "relu", "leaky_relu"
    with ``negative_slope``, "silu") in the same kernel, forward and backward.

    Input (N, C, *): NCHW and channels_last(_3d) are read in place and the output keeps the layout;
    each group's reduction is split across programs, so batch 1 fills the GPU. Statistics in fp32
    (fp64 for fp64 input); dweight and dbias are deterministic.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"group_norm(): argument 'input' must be Tensor, not {type(input).__name__}")
    act, slope = check_activation(activation, negative_slope)
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    C = input.shape[1]
    if num_groups <= 0 or C % num_groups:
        raise RuntimeError("Expected number of channels in input to be divisible by num_groups, but got input "
                           f"of shape {list(input.shape)} and num_groups={num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.dim() != 1 or p.shape[0] != C:
            raise RuntimeError(f"Expected {name} to be a vector of size equal to the number of channels in "
                               f"input, but got {name} of shape {list(p.shape)} and input of shape "
                               f"{list(input.shape)}")
        if p.device != input.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"{input.device} and {p.device}!")
    if not input.is_floating_point() and (weight is not None or bias is not None):
        raise RuntimeError("mixed dtype: all inputs must share same datatype (input is "
                           f"{input.dtype}, a weight or bias was given)")
    if not input.is_floating_point():
        raise NotImplementedError(f'"group_norm" not implemented for \'{_type_name(input.dtype)}\'')
    return GroupNormFunction.apply(input, int(num_groups), weight, bias, float(eps), act, slope)


# ----------------------------------------------------------------------------- BatchNorm
_REDUCED = (torch.float16, torch.bfloat16)


def _check_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      verify_batch_size=True) -> None:
    """Raise what torch.nn.functional.batch_norm raises, in its order (same exception types)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm(): argument 'input' must be Tensor, not {type(input).__name__}")
    if training and verify_batch_size:  # torch's _verify_batch_size
        size = list(input.shape)
        if math.prod(size[:1] + size[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not isinstance(momentum, numbers.Real):
        raise TypeError(f"batch_norm(): argument 'momentum' (position 7) must be float, not {type(momentum).__name__}")
    if input.dim() < 2:
        raise RuntimeError(f"batch_norm: expected input of shape (N, C, *), got {input.dim()}-D input")
    if not training:
        for name, r in (("running_mean", running_mean), ("running_var", running_var)):
            if r is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    C = input.shape[1]
    params = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for name, p in params.items():
        if p is not None and p.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {p.numel()}")
        if p is not None and p.device != input.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"{input.device} and {p.device}!")
    if not input.is_floating_point():
        raise NotImplementedError(f'"batch_norm" not implemented for \'{_type_name(input.dtype)}\'')
    dtypes = {p.dtype for p in params.values() if p is not None}
    if dtypes and dtypes != {input.dtype} and not (input.dtype in _REDUCED and dtypes == {torch.float32}):
        raise RuntimeError(f"mixed dtype: batch_norm's weight, bias, running_mean and running_var must all have "
                           f"the input's dtype {input.dtype}, or all be float32 for a float16 or bfloat16 input; "
                           f"got {sorted(map(str, dtypes))}")


def _update_running(running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch statistic, the variance unbiased."""
    count, mean, m2 = stats
    with torch.no_grad():  # in the statistics' dtype, one rounding into the buffer
        for r, batch in ((running_mean, mean), (running_var, m2 / (count - 1))):
            r.copy_(torch.lerp(r.to(batch.dtype), batch, momentum))


def _flat(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.reshape(-1)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, activation: Optional[str] = None,
               negative_slope: float = 0.01) -> Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm``, then ``activation`` (None, "relu", "leaky_relu"
    with ``negative_slope``, "silu") in the same kernel, forward and backward.

    Training normalizes by the batch statistics (biased variance) and updates ``running_mean`` and
    ``running_var`` in place when given (unbiased variance; an empty batch leaves them as they are);
    eval normalizes by the running statistics. Input (N, C) or (N, C, *): NCHW and channels_last(_3d)
    are read in place and the output keeps the layout; each channel's reduction is split across
    programs. Statistics in fp32 (fp64 for fp64 input); dweight and dbias are deterministic.
    """
    act, slope = check_activation(activation, negative_slope)
    _check_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    y, stats = BatchNormFunction.apply(input, _flat(weight), _flat(bias), _flat(running_mean), _flat(running_var),
                                       bool(training), float(eps), act, slope)
    if training and running_mean is not None and input.numel():
        _update_running(running_mean, running_var, stats.view(3, *running_mean.shape), float(momentum))
    return y


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float, process_group,
                    activation: Optional[str] = None, negative_slope: float = 0.01) -> Tensor:
    """``batch_norm`` in training over the batches of every process of ``process_group`` (a
    torch.distributed group; None: the default group), as torch.nn.SyncBatchNorm computes it: the same
    output and running statistics on every rank as one BatchNorm over the concatenated batch (ranks may
    hold different batch sizes, 0 included), dinput as that BatchNorm's; dweight and dbias are the rank's
    own contribution (data parallelism reduces them). Runs on any device its process group serves
    (gloo: CPU tensors too)."""
    import torch.distributed as dist

    act, slope = check_activation(activation, negative_slope)
    # one value per channel on this rank is fine: the group's batch counts (as torch's SyncBatchNorm)
    _check_batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps, verify_batch_size=False)
    group = process_group if process_group is not None else dist.group.WORLD
    y, stats = SyncBatchNormFunction.apply(input, _flat(weight), _flat(bias), float(eps), act, slope, group,
                                           dist.get_world_size(group))
    if running_mean is not None:
        _update_running(running_mean, running_var, stats.view(3, *running_mean.shape), float(momentum))
    return y


# ----------------------------------------------------------------------------- attention
def _check_attention(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """Raise what torch.nn.functional.scaled_dot_product_attention raises (same exception types)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be Tensor, not "
                            f"{type(t).__name__}")
        if t.dim() < 2:
            raise RuntimeError(f"scaled_dot_product_attention: {name} must have at least 2 dimensions (L, E), "
                               f"got {t.dim()}")
    if not query.dtype == key.dtype == value.dtype:
        raise RuntimeError("Expected query, key, and value to have the same dtype, but got query.dtype: "
                           f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead.")
    if not query.device == key.device == value.device:
        raise RuntimeError("Expected query, key, and value to have the same device type, but got query.device: "
                           f"{query.device} key.device: {key.device} and value.device: {value.device} instead.")
    if query.is_complex():
        raise NotImplementedError(f"scaled_dot_product_attention: complex inputs are not supported ({query.dtype})")
    if not query.is_floating_point():
        raise RuntimeError(f"expected scalar type Float but found {_type_name(query.dtype)}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError("Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                               f"attn_mask.dtype: {attn_mask.dtype} and  query.dtype: {query.dtype} instead.")
        if is_causal:
            raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when "
                               "is_causal=True")
        if attn_mask.device != query.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"{query.device} and {attn_mask.device}!")
    if not dropout_p <= 1.0:  # a negative one is no dropout, as in torch
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if key.shape[-1] != query.shape[-1]:
        raise RuntimeError(f"scaled_dot_product_attention: query and key head dims differ ({query.shape[-1]} "
                           f"and {key.shape[-1]})")
    if value.shape[-2] != key.shape[-2]:
        raise RuntimeError(f"scaled_dot_product_attention: key and value lengths differ ({key.shape[-2]} and "
                           f"{value.shape[-2]})")


def _dropout_seed() -> int:
    """A fresh seed from torch's default CPU generator (reproducible under torch.manual_seed)."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: FlashAttention kernels (online
    softmax in fp32, nothing of size L x S in memory, backward recomputing the probabilities).

    query (N, ..., L, E), key (N, ..., S, E), value (N, ..., S, Ev), leading dims broadcast; with
    ``enable_gqa`` the head dim (-3) of key/value may divide query's. ``attn_mask`` broadcastable to
    (N, ..., L, S): bool (True takes part) or added to the scores (differentiable). ``is_causal``: query i
    sees key j iff j <= i (top-left aligned, as torch). Fully masked query rows give 0 and zero
    gradients, never NaN. fp16/bf16 on tensor cores, fp32 exact unless
    ``torch.backends.cuda.matmul.allow_tf32``; fp64 runs on the eager reference (the ``torch`` backend).
    Dropout keeps each probability by a counter-based RNG seeded from torch's generator; backward
    regenerates the same mask.
    """
    _check_attention(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if torch.is_autocast_enabled(query.device.type):
        dt = torch.get_autocast_dtype(query.device.type)
        cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dt)  # noqa: E731
        with torch.autocast(query.device.type, enabled=False):
            return scaled_dot_product_attention(cast(query), cast(key), cast(value), cast(attn_mask), dropout_p,
                                                is_causal, scale, enable_gqa)
    dropout_p = max(float(dropout_p), 0.0)
    L, E, S, Ev = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    hq, hk, hv = (t.shape[-3] if t.dim() >= 3 else 1 for t in (query, key, value))
    if enable_gqa:  # torch's repeat_interleave of the key and value heads
        if not hk or not hv or hq % hk or hq % hv:
            raise RuntimeError(f"Number of heads in key and value must divide the number of heads in query "
                               f"(query {hq}, key {hk}, value {hv})")
        H = hq
    else:  # heads broadcast as any batch dim
        H = torch.broadcast_shapes((hq,), (hk,), (hv,))[0]
    lead = torch.broadcast_shapes(*(t.shape[:-3] for t in (query, key, value)))
    grouped = hk == hv and H % hk == 0  # the kernels' grouped-query attention: kv head h // (H // hk)
    if query.dtype in (torch.float16, torch.bfloat16) and any(
            t.requires_grad and (tuple(t.shape[:-3]) != tuple(lead) or broadcast_heads)
            for t, broadcast_heads in ((query, hq != H), (key, not grouped), (value, not grouped))):
        # A gradient summed over broadcast dims would round each part to fp16/bf16 and then the sum:
        # run this (rare) case in fp32 and round once.
        up = (t if t is None or not t.is_floating_point() else t.float() for t in (query, key, value, attn_mask))
        return scaled_dot_product_attention(*up, dropout_p, is_causal, scale, enable_gqa).to(query.dtype)
    nd = max(t.dim() for t in (query, key, value))
    B = math.prod(lead)
    q = _to_bhld(query, lead, H, B)
    if grouped:
        k, v = _to_bhld(key, lead, hk, B), _to_bhld(value, lead, hk, B)
    else:  # key and value heads differ: give each all H heads
        k, v = _to_bhld(_repeat_heads(key, H), lead, H, B), _to_bhld(_repeat_heads(value, H), lead, H, B)
    mask = attn_mask
    if mask is not None:
        out_shape = (*lead, H, L, S) if nd >= 3 else (L, S)
        if mask.dim() > len(out_shape):
            raise RuntimeError(f"attn_mask of shape {list(mask.shape)} has more dims than the attention weights "
                               f"{list(out_shape)}")
        torch.broadcast_shapes(mask.shape, out_shape)  # raises torch's error for a mask that doesn't fit
        mask = mask.reshape((1,) * (len(out_shape) - mask.dim()) + tuple(mask.shape))
        if all(d == 1 for d in mask.shape[:-3]):  # broadcast over the batch: one (1, h, L, S) view
            mask = mask.reshape(1, *mask.shape[-3:])
        else:
            mask = _to_bhld(mask, lead, mask.shape[-3], B)
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    seed = _dropout_seed() if dropout_p > 0.0 else 0
    o = ScaledDotProductAttentionFunction.apply(q, k, v, mask, bool(is_causal), scale, dropout_p, seed, 0)
    return o.reshape(*lead, H, L, Ev) if nd >= 3 else o.reshape(L, Ev)


def _to_bhld(t: Tensor, lead, h: int, B: int) -> Tensor:
    """t (*t_lead, h_t, L, D) as (B, h, L, D): broadcast leading dims and heads (a view; its gradient
    summed in fp32) and the leading dims merged into B (a view where strides allow)."""
    t = t.reshape((1,) * (len(lead) + 3 - t.dim()) + tuple(t.shape)) if t.dim() < len(lead) + 3 else t
    return broadcast_to(t, (*lead, h, *t.shape[-2:])).reshape(B, h, *t.shape[-2:])


def _repeat_heads(t: Tensor, H: int) -> Tensor:
    """t (..., h, S, D) with each head repeated for H // h query heads in a row (torch's
    repeat_interleave of grouped-query attention), as a broadcast view."""
    if t.dim() < 3:
        t = t.unsqueeze(0)
    h = t.shape[-3]
    t = broadcast_to(t.unsqueeze(-3), (*t.shape[:-2], H // h, *t.shape[-2:]))
    return t.flatten(-4, -3)

