"""Cases for GroupNorm, alone and with a fused SiLU, NCHW and channels_last.

Shapes (N, C, H, W, groups): diffusion-like 1x128x256x256 and 1x512x64x64 (batch 1: few groups,
where eager leaves the GPU idle), ResNet-like 32x256x56x56, and a large-batch 16x128x128x128; every one
in both memory formats, with activation None and "silu" (eager: F.group_norm then F.silu).
``--tiny``: one tiny shape, NCHW without and channels_last with SiLU (the interpreter is slow).

Bytes model (fewest bytes; e = element size of x and y, w = of the weight, stats fp32, G groups):
  fwd: read x, w, b; write y, mean, rstd                  = 2ne + 2Cw + 8NG
  bwd: read dy, x, w, b, mean, rstd; write dx, dw, db      = 3ne + 4Cw + 8NG
(the bias is read in backward only with an activation, whose input is recomputed: counted always,
a few KB). fwd+bwd is the sum.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .case import ACT_SUFFIX, LAYOUT_NAME, Case, Config, dtype_name, elt_size, randn_inputs
from .providers import fusedstab_providers, torch_providers

EPS = 1e-5
FULL = ((1, 128, 256, 256, 32), (1, 512, 64, 64, 32), (32, 256, 56, 56, 32), (16, 128, 128, 128, 32))
QUICK_GPU = FULL[:1] + FULL[2:3]
CPU_QUICK = ((1, 16, 16, 16, 4), (4, 64, 32, 32, 8))  # the first fits the Triton interpreter
TINY = (((2, 8, 5, 6, 4), "nchw", None), ((2, 8, 5, 6, 4), "channels_last", "silu"))
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def variants(cfg: Config) -> list[tuple[tuple[int, ...], str, str | None]]:
    """((N, C, H, W, groups), layout, activation) per case."""
    if cfg.tiny:
        return list(TINY)
    shapes = CPU_QUICK if cfg.device == "cpu" else QUICK_GPU if cfg.quick else FULL
    return [(s, layout, act) for s in shapes for layout in FORMATS for act in (None, "silu")]


def bytes_model(N: int, C: int, S: int, G: int, e: int, w: int) -> dict[str, int]:
    n = N * C * S
    fwd = 2 * n * e + 2 * C * w + 8 * N * G
    bwd = 3 * n * e + 4 * C * w + 8 * N * G
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _inputs(shape, fmt, dtype, device):
    inputs, grads = randn_inputs([shape, (shape[1],), (shape[1],)], dtype, device, [shape])
    x = inputs[0].detach().contiguous(memory_format=fmt).requires_grad_()
    return [x, *inputs[1:]], [grads[0].contiguous(memory_format=fmt)]


def group_norm(cfg: Config) -> list[Case]:
    elt = elt_size(cfg.dtype)
    out = []
    for (N, C, H, W, G), layout, act in variants(cfg):
        def eager(x, w, b, G=G, act=act):
            y = F.group_norm(x, G, w, b, EPS)
            return F.silu(y) if act else y

        fused = lambda ff, G=G, act=act: (lambda x, w, b: ff.group_norm(x, G, w, b, EPS, act))
        provs, skipped = torch_providers(eager, cfg)
        fp, fs = fusedstab_providers(fused, cfg, N * C * H * W)
        provs.update(fp)
        skipped.update(fs)
        params = {"shape": f"{N}x{C}x{H}x{W}", "groups": G, "layout": layout, "act": act or "none",
                  "dtype": dtype_name(cfg.dtype)}
        make = functools.partial(_inputs, (N, C, H, W), FORMATS[layout], cfg.dtype, cfg.device)
        out.append(Case("group_norm", params, make, provs, bytes_model(N, C, H * W, G, elt, elt),
                        skipped=skipped, desc=f"{N}x{C}x{H}x{W}, {G} groups, {LAYOUT_NAME[layout]}{ACT_SUFFIX[act]}"))
    return out
