"""Cases for BatchNorm in training (batch statistics, running stats updated), alone and with a fused
ReLU or SiLU: 4-D input in NCHW and channels_last, and 2-D (N, C) input (BatchNorm1d).

Shapes (bf16 x on a GPU): ResNet-50's BN after a 256-channel stage-1 conv at batch 128
(128x256x56x56, 205 MB: 4x an H100's 50 MB L2) and after its 64-channel stem at batch 128
(128x64x112x112, 205 MB: few channels, long reductions), a small-batch high-resolution case
(2x128x256x256, 34 MB: fits in L2) and a large-batch BatchNorm1d (131072x1024, 268 MB). Each 4-D
shape comes in both memory formats (dy in x's layout); every shape with activation None, "relu" and
"silu" (eager: F.batch_norm, then F.relu / F.silu). Fixed shapes, as group_norm.py: ``--size-mib``
does not change them. CPU quick: 4x16x16x16, 4x64x32x32 and 512x64 (the first and last fit the Triton
interpreter); ``--tiny``: three tiny cases, one per layout, each activation once.

Providers: ``eager`` (F.batch_norm with training=True; in bf16 torch takes its native CUDA kernels, not
cuDNN: ATen sends only fp32, and fp16 with fp32 weights, 3-D+ input to cuDNN), ``compile`` (torch.compile
of eager), ``fusedstab-<backend>``. No peer: no installable library ships a BatchNorm kernel to set
beside these (apex's SyncBatchNorm needs its CUDA extension built).

Weight, bias and the running statistics have x's dtype (a model cast to bf16). The running statistics
are per case, shared by its providers and updated in place by every call, as in training; the outputs
compared with eager's (y; dx, dweight, dbias) do not depend on them.

Bytes model (fewest bytes; e = element size of x and y, w = of the weight and running statistics,
saved statistics fp32, n = x's elements, C channels):
  fwd: read x, w, b, running mean/var; write y, running mean/var, mean, rstd  = 2ne + 6Cw + 8C
  bwd: read dy, x, w, b, mean, rstd; write dx, dw, db                        = 3ne + 4Cw + 8C
(the bias is read in backward only with an activation, whose input is recomputed: counted always,
a few KB, as in group_norm.py). fwd+bwd is the sum. The per-channel terms are noise: the model is
2ne forward and 3ne backward.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .case import ACT_SUFFIX, LAYOUT_NAME, Case, Config, dtype_name, elt_size, randn_inputs
from .providers import fusedstab_providers, torch_providers

EPS = 1e-5
MOMENTUM = 0.1
ACTS = (None, "relu", "silu")
EAGER_ACT = {None: lambda y: y, "relu": F.relu, "silu": F.silu}

# (N, C, H, W) 4-D, in both memory formats; (N, C) 2-D.
FULL_4D = ((128, 256, 56, 56), (128, 64, 112, 112), (2, 128, 256, 256))
FULL_2D = ((131072, 1024),)
QUICK_GPU_4D = (FULL_4D[0], FULL_4D[2])
QUICK_GPU_2D = FULL_2D
# CPU quick: the first 4-D and the 2-D shape fit the Triton interpreter (providers.INTERPRET_MAX_ELEMS).
CPU_QUICK_4D = ((4, 16, 16, 16), (4, 64, 32, 32))
CPU_QUICK_2D = ((512, 64),)
# Tiny: one case per layout, each activation once (NCHW runs slowly in the Triton interpreter).
TINY = (((2, 8, 5, 6), "nchw", None), ((2, 8, 5, 6), "channels_last", "silu"), ((16, 8), "nc", "relu"))
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last, "nc": torch.contiguous_format}


def shapes(cfg: Config) -> list[tuple[int, ...]]:
    if cfg.tiny:
        return list(dict.fromkeys(shape for shape, _, _ in TINY))
    if cfg.device == "cpu" and cfg.quick:
        return [*CPU_QUICK_4D, *CPU_QUICK_2D]
    if cfg.quick:
        return [*QUICK_GPU_4D, *QUICK_GPU_2D]
    return [*FULL_4D, *FULL_2D]


def variants(cfg: Config) -> list[tuple[tuple[int, ...], str, str | None]]:
    """(shape, layout, activation) per case: 4-D shapes in both layouts, every activation."""
    if cfg.tiny:
        return list(TINY)
    return [(shape, layout, act) for shape in shapes(cfg)
            for layout in (("nchw", "channels_last") if len(shape) == 4 else ("nc",)) for act in ACTS]


def bytes_model(numel: int, C: int, e: int, w: int) -> dict[str, int]:
    fwd = 2 * numel * e + 6 * C * w + 8 * C
    bwd = 3 * numel * e + 4 * C * w + 8 * C
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _inputs(shape, fmt, dtype, device):
    C = shape[1]
    inputs, grads = randn_inputs([shape, (C,), (C,)], dtype, device, [shape])
    x = inputs[0].detach().contiguous(memory_format=fmt).requires_grad_()
    return [x, *inputs[1:]], [grads[0].contiguous(memory_format=fmt)]


def batch_norm(cfg: Config) -> list[Case]:
    elt = elt_size(cfg.dtype)
    out = []
    for shape, layout, act in variants(cfg):
        C, numel = shape[1], math.prod(shape)
        # Per case, shared by its providers: every training step updates them in place.
        rm = torch.zeros(C, dtype=cfg.dtype, device=cfg.device)
        rv = torch.ones(C, dtype=cfg.dtype, device=cfg.device)

        def eager(x, w, b, rm=rm, rv=rv, act=act):
            return EAGER_ACT[act](F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS))

        fused = lambda ff, rm=rm, rv=rv, act=act: (
            lambda x, w, b: ff.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, act))
        provs, skipped = torch_providers(eager, cfg)
        fp, fs = fusedstab_providers(fused, cfg, numel)
        provs.update(fp)
        skipped.update(fs)
        params = {"shape": "x".join(map(str, shape)), "layout": layout, "act": act or "none",
                  "dtype": dtype_name(cfg.dtype)}
        desc = " ".join(filter(None, ["x".join(map(str, shape)), LAYOUT_NAME[layout]])) + ACT_SUFFIX[act]
        make = functools.partial(_inputs, shape, FORMATS[layout], cfg.dtype, cfg.device)
        out.append(Case("batch_norm", params, make, provs, bytes_model(numel, C, elt, elt), skipped=skipped,
                        desc=desc))
    return out
