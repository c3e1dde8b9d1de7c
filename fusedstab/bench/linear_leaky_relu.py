"""Cases for Linear + Leaky ReLU (a matmul with the bias and the activation fused in its epilogue):
``F.leaky_relu(F.linear(x, w, b), slope)``, x (M, K), w (N, K): the transformer MLP's up projection
(8192: 4096 -> 16384), its down projection (8192: 16384 -> 4096) and a small layer
(2048: 1024 -> 4096). Fixed shapes: a matmul this size is compute-bound whatever L2 holds.

Bytes model (fewest bytes; e = element size of x, w and the output, b = of the bias):
  fwd: read x, w, b; write y                 = (MK + NK + MN)e + Nb
  bwd: read dy, x, w, y; write dx, dw, db    = 2(MN + MK + NK)e + Nb
  fwd+bwd is the sum. FLOPs (rows report TFLOP/s): fwd 2MNK, bwd 4MNK (dx and dw), fwd+bwd 6MNK;
  the elementwise work is left out.

Providers: ``eager`` (the reference), ``compile`` (torch.compile of eager), ``fusedstab-<backend>``,
and ``matmul``: bare ``torch.matmul(x, w.t())`` with its own backward (dx and dw: 3 matmuls in the
training step), the ceiling the fused kernel is held to. Its result differs from eager's by
construction (no bias, no activation), so it is not checked (``Provider.check=False``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .bias_leaky_relu import SLOPE
from .case import Case, Config, Provider, dtype_name, elt_size
from .providers import fusedstab_providers, torch_providers
from .timing import make_thunk

# (M, K, N) = (tokens, in_features, out_features)
LINEAR_FULL = ((8192, 4096, 16384), (8192, 16384, 4096), (2048, 1024, 4096))
LINEAR_QUICK_GPU = ((8192, 4096, 16384), (2048, 1024, 4096))
# The Triton interpreter runs tl.dot program by program in numpy: keep its shape at 64^3.
LINEAR_CPU_QUICK = ((64, 64, 64), (256, 256, 1024))
LINEAR_CPU_FULL = ((1024, 512, 2048), (1024, 2048, 512), (256, 128, 512))
LINEAR_TINY = ((16, 32, 48),)


def linear_bytes_model(M: int, K: int, N: int, e: int, b: int) -> dict[str, int]:
    fwd = (M * K + N * K + M * N) * e + N * b
    bwd = 2 * (M * N + M * K + N * K) * e + N * b
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def linear_flops(M: int, K: int, N: int) -> dict[str, int]:
    mnk = M * N * K
    return {"fwd": 2 * mnk, "bwd": 4 * mnk, "fwd+bwd": 6 * mnk}


def linear_shapes(cfg: Config) -> tuple[tuple[int, int, int], ...]:
    if cfg.tiny:
        return LINEAR_TINY
    if cfg.device == "cpu":
        return LINEAR_CPU_QUICK if cfg.quick else LINEAR_CPU_FULL
    return LINEAR_QUICK_GPU if cfg.quick else LINEAR_FULL


def _linear_eager(x, w, b):
    return F.leaky_relu(F.linear(x, w, b), SLOPE)


def _bare_matmul(x, w, b):
    return torch.matmul(x, w.t())


_bare_matmul.grad_inputs = (0, 1)  # the bias is unused: gradients of x and w only


def linear_thunk(fn, inputs: list, grads: list, mode: str):
    """``timing.make_thunk``, except that a provider whose fn names ``grad_inputs`` (the bare matmul,
    which ignores the bias) is differentiated with respect to those inputs only."""
    used = getattr(fn, "grad_inputs", None)
    if used is None:
        return make_thunk(fn, inputs, grads, mode)
    return make_thunk(lambda *_: fn(*inputs), [inputs[i] for i in used], grads, mode)


def _linear_inputs(M, K, N, dtype, device):
    g = torch.Generator(device).manual_seed(0)
    rand = lambda *s: torch.randn(s, dtype=dtype, device=device, generator=g)
    # nn.Linear's init scale (uniform +-1/sqrt(K)), so y has unit-size entries in any dtype.
    x = rand(M, K).requires_grad_()
    w = (rand(N, K) * K ** -0.5).requires_grad_()
    b = (rand(N) * K ** -0.5).requires_grad_()
    return [x, w, b], [rand(M, N)]


def linear_leaky_relu(cfg: Config) -> list[Case]:
    cases = []
    e = elt_size(cfg.dtype)
    for M, K, N in linear_shapes(cfg):
        provs, skipped = torch_providers(_linear_eager, cfg)
        fp, fs = fusedstab_providers(lambda ff: (lambda x, w, b: ff.linear_leaky_relu(x, w, b, SLOPE)),
                                     cfg, max(M * K, N * K, M * N))
        provs.update(fp)
        skipped.update(fs)
        provs["matmul"] = Provider(_bare_matmul, check=False)
        params = {"M": M, "K": K, "N": N, "dtype": dtype_name(cfg.dtype)}
        make = functools.partial(_linear_inputs, M, K, N, cfg.dtype, cfg.device)
        cases.append(Case("linear_leaky_relu", params, make, provs, linear_bytes_model(M, K, N, e, e),
                          flops=linear_flops(M, K, N), skipped=skipped, thunk=linear_thunk,
                          desc=f"{M}: {K} -> {N}"))
    return cases
