"""Cases for bias + Leaky ReLU (elementwise) and Linear + Leaky ReLU (a matmul with the activation fused).

bias_leaky_relu: ``F.leaky_relu(x + bias broadcast along dim, slope)`` on
  MLP activations  (tokens, hidden), bias along dim -1, hidden in {4096, 16384};
  conv activations (batch, C, H, W), bias along dim 1 (channels), contiguous (NCHW) and channels_last.
  The leading size (tokens, batch) fills the device's target size of x (256 MiB on a GPU: 5x an H100's
  L2; ``--size-mib``), as for the norms.
linear_leaky_relu: ``F.leaky_relu(F.linear(x, w, b), slope)``, x (M, K), w (N, K): the transformer MLP's
  up projection (8192: 4096 -> 16384), its down projection (8192: 16384 -> 4096) and a small layer
  (2048: 1024 -> 4096). Fixed shapes: a matmul this size is compute-bound whatever L2 holds.

Bytes model (fewest bytes; e = element size of x and of the output, b = of the bias, n = x's elements,
C = the bias size; slope >= 0, so backward reads the saved output y, not a bit mask):
  bias_leaky_relu   fwd: read x, bias; write y                 = 2ne + Cb
                    bwd: read dy, y; write dx, dbias           = 3ne + Cb
  linear_leaky_relu fwd: read x, w, b; write y                 = (MK + NK + MN)e + Nb
                    bwd: read dy, x, w, y; write dx, dw, db    = 2(MN + MK + NK)e + Nb
  fwd+bwd is the sum. FLOPs (linear only; rows report TFLOP/s): fwd 2MNK, bwd 4MNK (dx and dw),
  fwd+bwd 6MNK; the elementwise work is left out.

Providers: ``eager`` (the reference), ``compile`` (torch.compile of eager), ``fusedstab-<backend>``, and
for linear ``matmul``: bare ``torch.matmul(x, w.t())`` with its own backward (dx and dw: 3 matmuls in
the training step), the ceiling the fused kernel is held to. Its result differs from eager's by
construction (no bias, no activation), so it is not checked (``Provider.check=False``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .case import Case, Config, Provider
from .providers import fusedstab_providers, torch_providers
from .timing import make_thunk

SLOPE = 0.01  # torch's default; >= 0, so the fused backward saves y (the bytes model above)
TARGET_MIB = {"cuda": 256, "cpu": 4}  # size of x for the elementwise op

# bias_leaky_relu: (kind, feature shape, dim, layout). The leading size comes from the target size.
MLP_HIDDEN = (4096, 16384)
CONV_CHW = ((256, 56, 56), (128, 128, 128))
# CPU quick: the first of each kind fits the Triton interpreter (providers.INTERPRET_MAX_ELEMS).
CPU_QUICK_BIAS = (((64, 512), -1), ((256, 4096), -1), ((4, 16, 16, 16), 1))
SMOKE_BIAS = (((8, 96), -1), ((2, 5, 6, 6), 1))

# linear_leaky_relu: (M, K, N) = (tokens, in_features, out_features)
LINEAR_FULL = ((8192, 4096, 16384), (8192, 16384, 4096), (2048, 1024, 4096))
LINEAR_QUICK_GPU = ((8192, 4096, 16384), (2048, 1024, 4096))
# The Triton interpreter runs tl.dot program by program in numpy: keep its shape at 64^3.
LINEAR_CPU_QUICK = ((64, 64, 64), (256, 256, 1024))
LINEAR_CPU_FULL = ((1024, 512, 2048), (1024, 2048, 512), (256, 128, 512))
LINEAR_SMOKE = ((16, 32, 48),)


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- bias + Leaky ReLU
def bias_bytes_model(numel: int, C: int, e: int, b: int) -> dict[str, int]:
    fwd = 2 * numel * e + C * b
    bwd = 3 * numel * e + C * b
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def bias_shapes(cfg: Config) -> list[tuple[tuple[int, ...], int, str]]:
    """(shape of x, dim of the bias, layout) per case; 4-D shapes come in both layouts."""
    if cfg.smoke:
        base = SMOKE_BIAS
    elif cfg.device == "cpu" and cfg.quick:
        base = CPU_QUICK_BIAS
    else:
        target = (cfg.target_mib or TARGET_MIB[cfg.device]) << 20
        e = _elt(cfg.dtype)
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


def bias_leaky_relu(cfg: Config) -> list[Case]:
    cases = []
    e = _elt(cfg.dtype)
    for shape, dim, layout in bias_shapes(cfg):
        numel = 1
        for s in shape:
            numel *= s
        eager = functools.partial(_bias_eager, dim=dim)
        provs, skipped = torch_providers(eager, cfg)
        fp, fs = fusedstab_providers(
            lambda ff, dim=dim: (lambda x, b: ff.bias_leaky_relu(x, b, SLOPE, dim)), cfg, numel)
        provs.update(fp)
        skipped.update(fs)
        params = {"shape": "x".join(map(str, shape)), "dim": dim, "layout": layout, "numel": numel,
                  "dtype": _dtype_name(cfg.dtype)}
        make = functools.partial(_bias_inputs, shape, dim, layout, cfg.dtype, cfg.device)
        cases.append(Case("bias_leaky_relu", params, make, provs,
                          bias_bytes_model(numel, shape[dim], e, e), skipped=skipped))
    return cases


# ----------------------------------------------------------------------------- Linear + Leaky ReLU
def linear_bytes_model(M: int, K: int, N: int, e: int, b: int) -> dict[str, int]:
    fwd = (M * K + N * K + M * N) * e + N * b
    bwd = 2 * (M * N + M * K + N * K) * e + N * b
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def linear_flops(M: int, K: int, N: int) -> dict[str, int]:
    mnk = M * N * K
    return {"fwd": 2 * mnk, "bwd": 4 * mnk, "fwd+bwd": 6 * mnk}


def linear_shapes(cfg: Config) -> tuple[tuple[int, int, int], ...]:
    if cfg.smoke:
        return LINEAR_SMOKE
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
    e = _elt(cfg.dtype)
    for M, K, N in linear_shapes(cfg):
        provs, skipped = torch_providers(_linear_eager, cfg)
        fp, fs = fusedstab_providers(lambda ff: (lambda x, w, b: ff.linear_leaky_relu(x, w, b, SLOPE)),
                                     cfg, max(M * K, N * K, M * N))
        provs.update(fp)
        skipped.update(fs)
        provs["matmul"] = Provider(_bare_matmul, check=False)
        params = {"M": M, "K": K, "N": N, "dtype": _dtype_name(cfg.dtype)}
        make = functools.partial(_linear_inputs, M, K, N, cfg.dtype, cfg.device)
        cases.append(Case("linear_leaky_relu", params, make, provs, linear_bytes_model(M, K, N, e, e),
                          flops=linear_flops(M, K, N), skipped=skipped, thunk=linear_thunk))
    return cases
