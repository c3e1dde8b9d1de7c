"""Cases for bias + Leaky ReLU: ``F.leaky_relu(x + bias broadcast along dim, slope)`` on
  MLP activations  (tokens, hidden), bias along dim -1, hidden in {4096, 16384};
  conv activations (batch, C, H, W), bias along dim 1 (channels), contiguous (NCHW) and channels_last.
The leading size (tokens, batch) fills the device's target size of x (256 MiB on a GPU: 5x an H100's
L2; ``--size-mib``), as for the norms.

Bytes model (fewest bytes; e = element size of x and of the output, b = of the bias, n = x's elements,
C = the bias size; slope >= 0, so backward reads the saved output y, not a bit mask):
  fwd: read x, bias; write y          = 2ne + Cb
  bwd: read dy, y; write dx, dbias    = 3ne + Cb
  fwd+bwd is the sum.

Providers: ``eager`` (the reference), ``compile`` (torch.compile of eager), ``fusedstab-<backend>``.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .case import LAYOUT_NAME, Case, Config, dtype_name, elt_size
from .providers import fusedstab_providers, torch_providers

SLOPE = 0.01  # torch's default; >= 0, so the fused backward saves y (the bytes model above)
TARGET_MIB = {"cuda": 256, "cpu": 4}  # size of x

# (feature shape, dim). The leading size comes from the target size.
MLP_HIDDEN = (4096, 16384)
CONV_CHW = ((256, 56, 56), (128, 128, 128))
# CPU quick: the first of each kind fits the Triton interpreter (providers.INTERPRET_MAX_ELEMS).
CPU_QUICK_BIAS = (((64, 512), -1), ((256, 4096), -1), ((4, 16, 16, 16), 1))
TINY_BIAS = (((8, 96), -1), ((2, 5, 6, 6), 1))


def bias_bytes_model(numel: int, C: int, e: int, b: int) -> dict[str, int]:
    fwd = 2 * numel * e + C * b
    bwd = 3 * numel * e + C * b
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def bias_shapes(cfg: Config) -> list[tuple[tuple[int, ...], int, str]]:
    """(shape of x, dim of the bias, layout) per case; 4-D shapes come in both layouts."""
    if cfg.tiny:
        base = TINY_BIAS
    elif cfg.device == "cpu" and cfg.quick:
        base = CPU_QUICK_BIAS
    else:
        target = (cfg.target_mib or TARGET_MIB[cfg.device]) << 20
        e = elt_size(cfg.dtype)
        hidden = MLP_HIDDEN[:1] if cfg.quick else MLP_HIDDEN
        chw = CONV_CHW[:1] if cfg.quick else CONV_CHW
        base = [((max(1, target // (h * e)), h), -1) for h in hidden]
        for c, hh, ww in chw:
            n = max(1, target // (c * hh * ww * e))
            base.append(((n - n % 8 if n >= 8 else n, c, hh, ww), 1))  # a batch size as models use
    out = []
    for shape, dim in base:
        for layout in (("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",)):
            out.append((tuple(shape), dim, layout))
    return out


def _bias_inputs(shape, dim, layout, dtype, device):
    g = torch.Generator(device).manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    rand = lambda s: torch.randn(s, dtype=dtype, device=device, generator=g)
    x = rand(shape).contiguous(memory_format=fmt).requires_grad_()
    b = rand((shape[dim],)).requires_grad_()
    dy = rand(shape).contiguous(memory_format=fmt)  # upstream grads come in the activation's layout
    return [x, b], [dy]


def _bias_eager(x, b, dim):
    d = dim % x.dim()
    return F.leaky_relu(x + b.view((b.numel(),) + (1,) * (x.dim() - 1 - d)), SLOPE)


def _desc(shape, layout) -> str:
    if len(shape) == 2:
        return f"{shape[0]} x {shape[1]} (tokens x hidden)"
    return "x".join(map(str, shape)) + " " + LAYOUT_NAME[layout]


def bias_leaky_relu(cfg: Config) -> list[Case]:
    cases = []
    e = elt_size(cfg.dtype)
    for shape, dim, layout in bias_shapes(cfg):
        numel = math.prod(shape)
        eager = functools.partial(_bias_eager, dim=dim)
        provs, skipped = torch_providers(eager, cfg)
        fp, fs = fusedstab_providers(
            lambda ff, dim=dim: (lambda x, b: ff.bias_leaky_relu(x, b, SLOPE, dim)), cfg, numel)
        provs.update(fp)
        skipped.update(fs)
        params = {"shape": "x".join(map(str, shape)), "dim": dim, "layout": layout, "numel": numel,
                  "dtype": dtype_name(cfg.dtype)}
        make = functools.partial(_bias_inputs, shape, dim, layout, cfg.dtype, cfg.device)
        cases.append(Case("bias_leaky_relu", params, make, provs, bias_bytes_model(numel, shape[dim], e, e),
                          skipped=skipped, desc=_desc(shape, layout)))
    return cases
