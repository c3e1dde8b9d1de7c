"""Eager-PyTorch reference of every fusedstab op, written for clarity.

Tests compare kernels against these (run in float64 for the "exact" answer), and the ``torch``
backend serves calls with them. Forward functions are plain differentiable torch code; backward
functions spell out the gradient formulas the kernels implement (and are tested against autograd).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .numerics import acc_dtype


# ----------------------------------------------------------------------------- LayerNorm / RMSNorm
def norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
             eps: float, rms: bool):
    """Rows of x (M, N) normalized: LayerNorm, or RMSNorm when ``rms``.

    With a residual, h = x + residual (in their promoted dtype) is normalized and returned too.
    Returns (y in x's dtype, h or None, mean or None, rstd), statistics in the accumulation dtype.
    """
    h = x if residual is None else x + residual
    acc = acc_dtype(h.dtype)
    hf = h.to(acc)
    mean = None if rms else hf.mean(-1)
    hc = hf if rms else hf - mean[:, None]
    rstd = torch.rsqrt((hc * hc).mean(-1) + eps)
    y = hc * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), (None if residual is None else h), mean, rstd


def norm_bwd(dy: Tensor, h: Tensor, weight: Tensor | None, mean: Tensor | None, rstd: Tensor,
             dh: Tensor | None, rms: bool, need_dbias: bool):
    """Gradients of norm_fwd from its saved h, mean, rstd. ``dh`` is the gradient flowing into the
    residual output h, added to dx. Returns (dx in h's dtype, dweight or None, dbias or None),
    the parameter gradients in the accumulation dtype."""
    acc = rstd.dtype
    hf, g = h.to(acc), dy.to(acc)
    xhat = (hf if rms else hf - mean[:, None]) * rstd[:, None]
    wg = g if weight is None else g * weight.to(acc)
    dx = wg - xhat * (xhat * wg).mean(-1, keepdim=True)
    if not rms:
        dx = dx - wg.mean(-1, keepdim=True)
    dx = dx * rstd[:, None]
    if dh is not None:
        dx = dx + dh.to(acc)
    dw = None if weight is None else (g * xhat).sum(0)
    db = (g.sum(0) if need_dbias else None)
    return dx.to(h.dtype), dw, db


def _rows(x: Tensor, normalized_shape) -> Tensor:
    n = 1
    for d in normalized_shape:
        n *= d
    return x.reshape(-1, n)


def layer_norm(input: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """torch.nn.functional.layer_norm, by the formula."""
    w = None if weight is None else weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    return norm_fwd(_rows(input, normalized_shape), w, b, None, eps, False)[0].reshape(input.shape)


def rms_norm(input: Tensor, normalized_shape, weight=None, eps: float | None = None) -> Tensor:
    """torch.nn.functional.rms_norm, by the formula (eps=None: machine eps of the accumulation dtype)."""
    if eps is None:
        eps = torch.finfo(acc_dtype(input.dtype)).eps
    w = None if weight is None else weight.reshape(-1)
    return norm_fwd(_rows(input, normalized_shape), w, None, None, eps, True)[0].reshape(input.shape)


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape, weight=None, bias=None,
                   eps: float = 1e-5, rms: bool = False):
    """(norm(x + residual), x + residual): the pre-norm block's fused residual add."""
    if rms and eps is None:
        eps = torch.finfo(acc_dtype(torch.promote_types(x.dtype, residual.dtype))).eps
    w = None if weight is None else weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    y, h, _, _ = norm_fwd(_rows(x, normalized_shape), w, b, _rows(residual, normalized_shape), eps, rms)
    return y.reshape(x.shape), h.reshape(x.shape)


# ----------------------------------------------------------------------------- multi-tensor norm / scale
def multi_tensor_norm(tensors: list[Tensor], norm_type: float) -> Tensor:
    """Per-tensor reduction that global norms combine: sum |x|^p for finite p != 0, max |x| for inf,
    min |x| for -inf, the count of nonzeros for p = 0. An empty tensor gives the reduction's identity
    (0, or inf for min), as a rank's empty shard must; refusing an empty tensor where torch has no
    identity is the caller's business. Accumulation dtype, shape (len(tensors),)."""
    acc = acc_dtype(tensors[0].dtype) if tensors else torch.float32
    out = []
    for t in tensors:
        a = t.abs().to(acc).reshape(-1)
        if norm_type == float("inf"):
            out.append(a.amax() if a.numel() else a.new_zeros(()))
        elif norm_type == float("-inf"):
            out.append(a.amin() if a.numel() else a.new_full((), float("inf")))
        elif norm_type == 0:
            out.append((a != 0).sum().to(acc))
        else:
            out.append(a.pow(norm_type).sum())
    device = tensors[0].device if tensors else None
    return torch.stack(out) if out else torch.zeros(0, dtype=acc, device=device)


def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor, zero_nonfinite: bool) -> None:
    """t *= coef for every tensor, in place. With ``zero_nonfinite``, coef == 0 sets t to exactly
    zero (NaN/Inf included): the no-sync way to skip an update."""
    for t in tensors:
        c = coef.to(t.device)
        if zero_nonfinite:
            t.copy_(torch.where(c == 0, torch.zeros_like(t), t * c))
        else:
            t.mul_(c)


# ----------------------------------------------------------------------------- bias + Leaky ReLU
def bias_leaky_relu(x: Tensor, bias: Tensor | None, negative_slope: float = 0.01, dim: int = -1) -> Tensor:
    """leaky_relu(x + bias), the bias (C,) broadcast along ``dim`` of x."""
    if bias is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        x = x + bias.view(shape)
    return torch.nn.functional.leaky_relu(x, negative_slope)


def linear_leaky_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                      negative_slope: float = 0.01) -> Tensor:
    """leaky_relu(x @ weight.T + bias)."""
    return torch.nn.functional.leaky_relu(torch.nn.functional.linear(x, weight, bias), negative_slope)


# ----------------------------------------------------------------------------- GroupNorm (+ activation)
def activate(z: Tensor, act: str, negative_slope: float = 0.01) -> Tensor:
    """The activations the norms can fuse: "none", "relu", "leaky_relu", "silu"."""
    F = torch.nn.functional
    return {"none": lambda t: t, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, negative_slope),
            "silu": F.silu}[act](z)


def activate_grad(dy: Tensor, z: Tensor, act: str, negative_slope: float) -> Tensor:
    """dy * act'(z), act' as torch's backward defines it (at z == 0: relu 0, leaky_relu the slope;
    at z = NaN: relu passes dy, leaky_relu scales it)."""
    if act == "relu":
        return torch.where(z <= 0, torch.zeros_like(dy), dy)
    if act == "leaky_relu":
        return torch.where(z > 0, dy, dy * negative_slope)
    if act == "silu":
        s = torch.sigmoid(z)
        return dy * s * (1 + z * (1 - s))
    return dy


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, activation: str | None = None, negative_slope: float = 0.01) -> Tensor:
    """torch.nn.functional.group_norm followed by the activation (None: none)."""
    y = torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
    return activate(y, activation or "none", negative_slope)


def group_norm_fwd(x: Tensor, weight, bias, G: int, eps: float, act: str, slope: float):
    """x (N, C, S) -> (act(z) in x's dtype, mean (N, G), rstd (N, G)) in the accumulation dtype,
    z = xhat * weight + bias, all computed in the accumulation dtype."""
    N, C, S = x.shape
    acc = acc_dtype(x.dtype)
    xg = x.to(acc).reshape(N, G, -1)
    mean = xg.mean(-1)
    rstd = torch.rsqrt(xg.var(-1, unbiased=False) + eps)
    z = _affine(((xg - mean[..., None]) * rstd[..., None]).reshape(N, C, S), weight, bias)
    return activate(z, act, slope).to(x.dtype), mean, rstd


def _affine(xhat: Tensor, weight, bias) -> Tensor:
    z = xhat if weight is None else xhat * weight.to(xhat.dtype)[:, None]
    return z if bias is None else z + bias.to(xhat.dtype)[:, None]


def group_norm_bwd(dy: Tensor, x: Tensor, weight, bias, mean: Tensor, rstd: Tensor, G: int, act: str,
                   slope: float):
    """Gradients of group_norm_fwd: (dx in x's dtype, dweight, dbias in the accumulation dtype)."""
    N, C, S = x.shape
    acc = mean.dtype
    xg = x.to(acc).reshape(N, G, -1)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(N, C, S)
    dz = activate_grad(dy.to(acc), _affine(xhat, weight, bias), act, slope)
    gw = dz if weight is None else dz * weight.to(acc)[:, None]
    gwg, xhg = gw.reshape(N, G, -1), xhat.reshape(N, G, -1)
    dx = rstd[..., None] * (gwg - gwg.mean(-1, keepdim=True) - xhg * (gwg * xhg).mean(-1, keepdim=True))
    return dx.reshape(N, C, S).to(x.dtype), (dz * xhat).sum((0, 2)), dz.sum((0, 2))


# ----------------------------------------------------------------------------- BatchNorm (+ activation)
def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
               bias: Tensor | None = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               activation: str | None = None, negative_slope: float = 0.01) -> Tensor:
    """torch.nn.functional.batch_norm (running statistics updated in place) followed by the activation."""
    y = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return activate(y, activation or "none", negative_slope)


def _per_channel(x: Tensor, acc: torch.dtype) -> Tensor:
    """x (N, C, S) as (C, N*S) in the accumulation dtype."""
    return x.to(acc).transpose(0, 1).reshape(x.shape[1], -1)


def batch_norm_stats(x: Tensor) -> Tensor:
    """x (N, C, S) -> (3, C): count, mean and M2 (sum of squared deviations) per channel; an empty
    batch gives count 0, mean 0, M2 0."""
    xc = _per_channel(x, acc_dtype(x.dtype))
    n = xc.shape[1]
    mean = xc.sum(1) / max(n, 1)
    m2 = ((xc - mean[:, None]) ** 2).sum(1)
    return torch.stack([torch.full_like(mean, n), mean, m2])


def _bn_affine(x: Tensor, weight, bias, mean: Tensor, rstd: Tensor):
    """(xhat, z = weight * xhat + bias) of x (N, C, S) in the dtype of mean."""
    acc = mean.dtype
    xhat = (x.to(acc) - mean[:, None]) * rstd[:, None]
    z = xhat if weight is None else xhat * weight.to(acc)[:, None]
    return xhat, (z if bias is None else z + bias.to(acc)[:, None])


def batch_norm_elemt(x: Tensor, weight, bias, mean: Tensor, rstd: Tensor, act: str, slope: float) -> Tensor:
    """act(weight * (x - mean) * rstd + bias) per channel of x (N, C, S), in x's dtype."""
    return activate(_bn_affine(x, weight, bias, mean, rstd)[1], act, slope).to(x.dtype)


def batch_norm_bwd_reduce(dy: Tensor, x: Tensor, weight, bias, mean: Tensor, rstd: Tensor, act: str,
                          slope: float) -> Tensor:
    """(2, C): sum(dz) and sum(dz * xhat) per channel (dbias and dweight), dz = dy * act'(z)."""
    xhat, z = _bn_affine(x, weight, bias, mean, rstd)
    dz = activate_grad(dy.to(mean.dtype), z, act, slope)
    return torch.stack([dz.sum((0, 2)), (dz * xhat).sum((0, 2))])


def batch_norm_bwd_elemt(dy: Tensor, x: Tensor, weight, bias, mean: Tensor, rstd: Tensor, coef: Tensor | None,
                         act: str, slope: float) -> Tensor:
    """dx = weight * rstd * (dz - coef[0] - xhat * coef[1]), coef = (mean(dz), mean(dz * xhat)) over
    the batch in training; dx = weight * rstd * dz with coef None (eval: the statistics are constants)."""
    xhat, z = _bn_affine(x, weight, bias, mean, rstd)
    dz = activate_grad(dy.to(mean.dtype), z, act, slope)
    if coef is not None:
        dz = dz - coef[0][:, None] - xhat * coef[1][:, None]
    scale = rstd if weight is None else rstd * weight.to(mean.dtype)
    return (dz * scale[:, None]).to(x.dtype)


# ----------------------------------------------------------------------------- attention
def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 keep: Tensor | None = None) -> Tensor:
    """softmax(scale * q k^T + mask) v, in q's dtype, for q (..., Hq, L, E), k (..., Hkv, S, E),
    v (..., Hkv, S, Ev) with Hq a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)). The mask
    is bool (True takes part) or additive; ``is_causal``: query i sees key j iff j <= i. Fully masked
    rows give 0. ``keep`` (broadcastable to the scores, bool) applies dropout: p * keep / (1 - dropout_p)."""
    s = attention_scores(q, k, attn_mask, is_causal, scale)
    p = _probs(s)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p) if dropout_p < 1.0 else torch.zeros_like(p)
    return p @ _heads_like(v, q)


def _probs(s: Tensor) -> Tensor:
    """softmax over keys, 0 on fully masked rows (and no keys at all)."""
    if not s.shape[-1]:
        return s
    p = torch.softmax(s, -1)
    return torch.where(s.amax(-1, keepdim=True) == float("-inf"), torch.zeros_like(p), p)


def _heads_like(t: Tensor, q: Tensor) -> Tensor:
    """k or v with each kv head repeated for the query heads that read it (grouped-query attention)."""
    if q.dim() >= 3 and t.shape[-3] != q.shape[-3]:
        return t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3)
    return t


def attention_scores(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None) -> Tensor:
    """scale * q k^T, masked (-inf where a bool mask or causality excludes; plus an additive mask)."""
    L, S = q.shape[-2], k.shape[-2]
    s = (q @ _heads_like(k, q).transpose(-2, -1)) * (1.0 / q.shape[-1] ** 0.5 if scale is None else scale)
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return s


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
                  is_causal: bool, scale: float, keep: Tensor | None = None):
    """Gradients of scaled_dot_product_attention (same arguments): (dq, dk, dv, dscores), dk and dv
    summed over the query heads of each kv head; dscores = P * (dP - rowsum(dP * P)) is also the
    gradient of an additive mask (before summing over its broadcast dims)."""
    s = attention_scores(q, k, attn_mask, is_causal, scale)
    p = _probs(s)
    drop = 1.0 if keep is None else keep * (1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0)
    dp = (do @ _heads_like(v, q).transpose(-2, -1)) * drop
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dv = (p * drop).transpose(-2, -1) @ do
    dq = (ds @ _heads_like(k, q)) * scale
    dk = (ds.transpose(-2, -1) @ q) * scale
    if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:  # sum each group of query heads into its kv head
        g = q.shape[-3] // k.shape[-3]
        dk = dk.unflatten(-3, (k.shape[-3], g)).sum(-3)
        dv = dv.unflatten(-3, (k.shape[-3], g)).sum(-3)
    return dq, dk, dv, ds


# ----------------------------------------------------------------------------- gradient statistics and adaptive clipping
def grad_stats(tensors: list[Tensor]) -> Tensor:
    """Per-tensor statistics from one read of each tensor, rows (3, len(tensors)) in the accumulation
    dtype: sum |x|^2, the count of non-finite elements, max |x| (NaN if any element is NaN, 0 for an
    empty tensor). Complex tensors: of |x|. Rows 0-1 add up over shards, row 2 takes their max."""
    acc = acc_dtype(tensors[0].real.dtype if tensors[0].is_complex() else tensors[0].dtype)
    out = torch.zeros(3, len(tensors), dtype=acc, device=tensors[0].device)
    for i, t in enumerate(tensors):
        a = (t.abs() if t.is_complex() else t).to(acc).reshape(-1)
        out[0, i] = a.square().sum()
        out[1, i] = (~torch.isfinite(a)).sum()
        out[2, i] = a.abs().amax() if a.numel() else 0.0
    return out


# The clipper's device state (float64): its layout, shared by every backend of grad_clip_finish.
STEPS, SEEN, MEAN, VAR = range(4)  # calls so far, good norms seen, EMA (Welford during warm-up) mean, var (M2)
WINDOW = 4  # state[WINDOW:] holds the last good norms (quantile mode), NaN where empty


def grad_clip_finish(stats: Tensor, state: Tensor, max_norm: Tensor | None, max_norm_value: float, mode: str,
                     warmup: int, z_thresh: float, alpha: float, eps: float, q: float, skip_nonfinite: bool,
                     skip_above: float, ring_tensors: Tensor, ring_scalars: Tensor):
    """The finishing program of a clipping step: per-tensor reductions -> total norm, threshold, clip
    coefficient, skip flag; updates the mode's ``state`` and writes telemetry into the rings, in place.

    stats: (C, T) from grad_stats (C = 3) or multi_tensor_norm(2) (C = 1, row 0 only). The total norm
    g = sqrt(sum stats[0]). ``cap`` = ``max_norm`` (a 0-d tensor) if given, else ``max_norm_value``
    (inf: none). A step is skipped when g is NaN/Inf (``skip_nonfinite``) or g > ``skip_above``; a
    skipped step changes no statistic, and its coefficient is 1 (the optimizer must skip it:
    ``found_inf``). Threshold by mode:
      fixed     cap
      zclip     (ZClip, arXiv 2504.02507) after ``warmup`` good steps whose mean and (population)
                variance start an EMA: z = (g - mean) / (std + eps); if z > z_thresh the threshold is
                min(mean + z_thresh^2 std / z, cap), else cap; the EMA then takes the threshold (a
                spike) or g, with factor ``alpha``: mean <- a mean + (1-a) x, var <- a var + (1-a) (x - mean)^2
      quantile  the ``q``-quantile (linear interpolation, as torch.quantile) of the last W good norms,
                this step's included (W = state.numel() - WINDOW), min'd with cap
    During the first ``warmup`` good steps the adaptive modes use cap. coef = min(thr / (g + 1e-6), 1)
    as torch's clip_grad_norm_.

    Ring slot (state[STEPS] % K, K = ring_scalars.shape[0]; none when K == 0): ring_tensors[slot] =
    per-tensor [norm, max |x|, non-finite count] (needs C = 3), ring_scalars[slot] = [step (1-based),
    g, threshold, coef, skipped]. Returns (g, coef, found_inf, threshold): g, coef, threshold in
    stats' dtype, found_inf float32 (1.0 = skip), all 0-d.
    """
    f64 = torch.float64
    dev = state.device
    g = stats[0].to(f64).sum().sqrt()
    inf = torch.tensor(float("inf"), dtype=f64, device=dev)
    cap = max_norm.to(dev, f64).reshape(()) if max_norm is not None else torch.full((), max_norm_value, dtype=f64,
                                                                                     device=dev)
    skip = (g > skip_above) | (~torch.isfinite(g) if skip_nonfinite else torch.zeros((), dtype=torch.bool, device=dev))
    good = torch.isfinite(g) & ~skip
    steps, seen, mean, var = state[:WINDOW].clone()  # copies: state is written below
    warm = seen < warmup
    thr = cap
    if mode == "zclip":
        std = var.clamp_min(0).sqrt()
        z = (g - mean) / (std + eps)
        spike = ~warm & (z > z_thresh)
        adaptive = mean + z_thresh * z_thresh * std / z
        thr = torch.where(spike, torch.minimum(adaptive, cap), cap)
        # warm-up: Welford; at its last step the population variance; after: the EMA of x
        n1 = seen + 1
        w_mean = mean + (g - mean) / n1
        w_m2 = var + (g - mean) * (g - w_mean)
        w_var = torch.where(n1 >= warmup, w_m2 / n1, w_m2)
        x = torch.where(spike, adaptive, g)
        e_mean = alpha * mean + (1 - alpha) * x
        e_var = alpha * var + (1 - alpha) * (x - e_mean) ** 2
        state[MEAN] = torch.where(good, torch.where(warm, w_mean, e_mean), mean)
        state[VAR] = torch.where(good, torch.where(warm, w_var, e_var), var)
    elif mode == "quantile":
        window = state[WINDOW:]
        W = window.numel()
        pos = torch.remainder(seen, W).long()
        window = torch.where(good & (torch.arange(W, device=dev) == pos), g, window)
        state[WINDOW:] = window
        m = torch.where(good, seen + 1, seen).clamp(max=W)  # good norms in the window
        srt = torch.where(torch.isnan(window), inf, window).sort().values
        p = q * (m - 1)
        lo = p.floor().clamp(0, W - 1)
        hi = (lo + 1).clamp(max=(m - 1).clamp(min=0))
        v_lo, v_hi = srt[lo.long()], srt[hi.long()]
        quant = torch.where(m > 0, v_lo + (p - lo) * (v_hi - v_lo), inf)
        thr = torch.where(warm, cap, torch.minimum(quant, cap))
    elif mode != "fixed":
        raise ValueError(f"unknown clipping mode {mode!r}")
    coef = (thr / (g + 1e-6)).clamp(max=1.0)
    coef = torch.where(skip, torch.ones_like(coef), coef)
    state[SEEN] = torch.where(good, seen + 1, seen)
    state[STEPS] = steps + 1
    K = ring_scalars.shape[0]
    if K:
        slot = torch.remainder(steps, K).long()
        if ring_tensors.numel():
            row = torch.stack([stats[0].to(f64).sqrt(), stats[2].to(f64), stats[1].to(f64)])
            ring_tensors.index_copy_(0, slot.reshape(1), row.to(ring_tensors.dtype).unsqueeze(0))
        scal = torch.stack([steps + 1, g, thr, coef, skip.to(f64)])
        ring_scalars.index_copy_(0, slot.reshape(1), scal.to(ring_scalars.dtype).unsqueeze(0))
    dt = stats.dtype
    return g.to(dt), coef.to(dt), skip.to(torch.float32), thr.to(dt)
