"""Cases for LayerNorm, RMSNorm and residual-add + LayerNorm over M rows (tokens) of length N (hidden).

Bytes model (fewest bytes; e = element size of x, w = of the weight, stats are fp32):
  LayerNorm fwd: read x, w, b; write y, mean, rstd          = 2MNe + 2Nw + 8M
            bwd: read dy, x, w, mean, rstd; write dx, dw, db = 3MNe + 3Nw + 8M
  RMSNorm   fwd: read x, w; write y, rstd                   = 2MNe +  Nw + 4M
            bwd: read dy, x, w, rstd; write dx, dw           = 3MNe + 2Nw + 4M
  add+LN    fwd: read x, r, w, b; write y, h=x+r, mean, rstd = 4MNe + 2Nw + 8M
            bwd: read dy, dh, h, w, mean, rstd; write dx (dx == dr: one tensor), dw, db
                                                            = 4MNe + 3Nw + 8M
  fwd+bwd is the sum. The forward is the training forward (inputs require grad), so the saved
  statistics are outputs.
"""
from __future__ import annotations

import functools
import inspect

import torch.nn.functional as F

from .case import Case, Config, Provider, dtype_name, elt_size, randn_inputs
from .providers import fusedstab_providers, liger, torch_providers

EPS = 1e-5
RMS_EPS = 1e-6
N_FULL = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
N_QUICK_GPU = (1024, 4096, 16384)
# CPU quick: the first shape is small enough for the Triton interpreter (providers.INTERPRET_MAX_ELEMS).
CPU_QUICK = ((64, 512), (256, 4096))
# x alone: 256 MiB on a GPU (5x an H100's 50 MB L2, 2^27 bf16 elements); a few MiB on CPU.
TARGET_MIB = {"cuda": 256, "cpu": 4}


def shapes(cfg: Config) -> list[tuple[int, int]]:
    if cfg.tiny:
        return [(8, 512)]
    if cfg.device == "cpu" and cfg.quick and not cfg.rows_n:
        return list(CPU_QUICK)
    ns = cfg.rows_n or (N_QUICK_GPU if cfg.quick else N_FULL)
    target = (cfg.target_mib or TARGET_MIB[cfg.device]) << 20
    return [(max(1, target // (n * elt_size(cfg.dtype))), n) for n in ns]


def bytes_model(M: int, N: int, e: int, w: int, rms: bool = False, add: bool = False) -> dict[str, int]:
    act = M * N * e
    stats = (1 if rms else 2) * M * 4
    params = (1 if rms else 2) * N * w
    fwd = (4 if add else 2) * act + params + stats
    bwd = (4 if add else 3) * act + N * w + params + stats
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _case(op, cfg, M, N, n_in, n_out, eager, fused, peers, rms=False, add=False):
    provs, skipped = torch_providers(eager, cfg)
    fp, fs = fusedstab_providers(fused, cfg, M * N)
    provs.update(fp)
    skipped.update(fs)
    provs.update(peers[0])
    skipped.update(peers[1])
    n_par = 1 if rms else 2
    make = functools.partial(_inputs, M, N, n_in, n_par, n_out, cfg)
    elt = elt_size(cfg.dtype)
    return Case(op, {"M": M, "N": N, "dtype": dtype_name(cfg.dtype)}, make, provs,
                bytes_model(M, N, elt, elt, rms=rms, add=add), skipped=skipped, desc=f"{M} x {N}", x=N)


def _inputs(M, N, n_in, n_par, n_out, cfg):
    # Weight and bias in the input's dtype, as in a model cast to bf16 (nn.LayerNorm(...).bfloat16()).
    return randn_inputs([(M, N)] * n_in + [(N,)] * n_par, cfg.dtype, cfg.device, [(M, N)] * n_out)


def layer_norm(cfg: Config) -> list[Case]:
    out = []
    for M, N in shapes(cfg):
        eager = lambda x, w, b, N=N: F.layer_norm(x, (N,), w, b, EPS)
        fused = lambda ff, N=N: (lambda x, w, b: ff.layer_norm(x, (N,), w, b, EPS))
        fn, why = liger("layer_norm", "LigerLayerNormFunction", cfg)
        peers = ({"liger": Provider(lambda x, w, b: fn.apply(x, w, b, EPS))}, {}) if fn else ({}, {"liger": why})
        out.append(_case("layer_norm", cfg, M, N, 1, 1, eager, fused, peers))
    return out


def rms_norm(cfg: Config) -> list[Case]:
    out = []
    for M, N in shapes(cfg):
        eager = lambda x, w, N=N: F.rms_norm(x, (N,), w, RMS_EPS)
        fused = lambda ff, N=N: (lambda x, w: ff.rms_norm(x, (N,), w, RMS_EPS))
        peers = _liger_rms(cfg)
        out.append(_case("rms_norm", cfg, M, N, 1, 1, eager, fused, peers, rms=True))
    return out


def add_layer_norm(cfg: Config) -> list[Case]:
    """Pre-norm residual block: h = x + r continues as the residual stream, so both outputs get grads."""
    out = []
    for M, N in shapes(cfg):
        def eager(x, r, w, b, N=N):
            h = x + r
            return F.layer_norm(h, (N,), w, b, EPS), h

        fused = lambda ff, N=N: (lambda x, r, w, b: ff.add_layer_norm(x, r, (N,), w, b, EPS))
        no_peer = ({}, {"liger": "liger-kernel has no fused add + LayerNorm"})
        out.append(_case("add_layer_norm", cfg, M, N, 2, 2, eager, fused, no_peer, add=True))
    return out


def _liger_rms(cfg):
    fn, why = liger("rms_norm", "LigerRMSNormFunction", cfg)
    if fn is None:
        return {}, {"liger": why}
    # Newer versions take (X, W, eps, offset, casting_mode, in_place, ...); in_place=True overwrites dy
    # with dx, so the replayed dy drifts (harmless for timing; older versions always do it).
    names = list(inspect.signature(fn.forward).parameters)[1:]
    extra = (0.0, "llama", False) if names[3:6] == ["offset", "casting_mode", "in_place"] else ()
    return {"liger": Provider(lambda x, w: fn.apply(x, w, RMS_EPS, *extra))}, {}
