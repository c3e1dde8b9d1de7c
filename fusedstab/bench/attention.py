"""Cases for scaled dot-product attention: ``fusedstab.functional.scaled_dot_product_attention`` against
torch's SDPA backends, torch.compile and flash-attn, forward, backward and both.

Shapes (bf16 on a GPU): self-attention (S = L), H = 16 heads, B = 16384 // L, so every case holds
B*H*L = 16K*16 (token, head) pairs (FlashAttention's benchmark keeps B*L fixed the same way): L in
512, 1K, 2K, 4K, 8K, 16K (B 32 down to 1), head dim E in 64 and 128, causal and not. The inputs
are (B, L, H, E) contiguous, as a projection writes them; torch and fusedstab take their (B, H, L, E)
views (transpose(1, 2): no copy), flash-attn takes them as they are. q and k are N(0, 1), so with
scale 1/sqrt(E) the scores are about N(0, 1). CPU: one tiny fp32 shape (B=1, H=2, L=128, E=64) with
eager and fusedstab only: its times say nothing about a GPU. ``--tiny``: one causal 40-token case.

FLOPs (rows report TFLOP/s), the issue's convention, which is FlashAttention's:
  fwd      4*B*H*L*S*E  (two matmuls, q k^T and p v, 2 FLOPs a multiply-add), halved when causal
  bwd      2.5 x fwd    (five matmuls: s = q k^T recomputed, dv = p^T do, dp = do v^T, dq = ds k,
                         dk = ds^T q)
  fwd+bwd  3.5 x fwd
Softmax and the elementwise work are left out. Causal counts L*S/2 pairs (exactly L(L+1)/2).

Bytes model (fewest bytes; e = element size, the saved logsumexp fp32, 4 bytes a row):
  fwd: read q, k, v; write o, lse                          = (2BHLE + 2BHSE)e + 4BHL
  bwd: read do, q, k, v, o, lse; write dq, dk, dv          = (4BHLE + 4BHSE)e + 4BHL
Attention is compute-bound at these sizes: the TFLOP/s column is the one to read.

Providers:
  eager            F.scaled_dot_product_attention restricted to the flash and memory-efficient
                   backends (torch picks flash on an H100 in bf16; efficient for fp32; on CPU torch's
                   CPU flash kernel): the reference every other provider is checked against
  compile          torch.compile(eager): F.scaled_dot_product_attention, which inductor keeps as the
                   aten flash-attention op it traced (the same kernel as eager), not a compiled math
                   attention (that would materialize the L x S scores)
  sdpa-flash, sdpa-cudnn, sdpa-efficient, sdpa-math
                   torch's SDPA with one backend forced by ``torch.nn.attention.sdpa_kernel``; a
                   backend that cannot run this dtype / head dim / causality on the device is probed
                   once on a tiny input and left out with torch's reason. sdpa-math materializes the
                   L x S scores: left out where B*H*L*S*4 bytes > 8 GiB (L = 16K).
  flash-attn       ``flash_attn.flash_attn_func`` (layout (B, L, H, E)) when importable, CUDA, fp16/bf16
  fusedstab-<backend>
                   one per usable fusedstab backend; ``fusedstab-torch`` (the fp32 math reference,
                   several L x S fp32 tensors in backward) only where B*H*L*S*4 bytes <= 2 GiB on a GPU.
Outputs are checked with the runner's tolerance: max |a - b| / max |b| per tensor against eager's,
5e-2 for bf16 (room for kernels that round the probabilities and the outputs to bf16 at different
points, well below what a wrong mask or scale gives), 1e-3 for fp32.
"""
from __future__ import annotations

import functools
import importlib
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .case import Case, Config, Provider, dtype_name, elt_size, randn_inputs
from .providers import fusedstab_providers

HEADS = 16
TOKENS = 16384  # B * L in every GPU case: B*H*L = 16K*16
SEQ_FULL = (512, 1024, 2048, 4096, 8192, 16384)
SEQ_QUICK_GPU = (2048, 8192)
HEAD_DIMS = (64, 128)
# (B, H, L, E) off the GPU sweep; CPU quick fits the Triton interpreter (providers.INTERPRET_MAX_ELEMS).
CPU_QUICK = ((1, 2, 128, 64),)
CPU_FULL = ((1, 2, 128, 64), (2, 4, 512, 64))
TINY = ((1, 2, 40, 16),)  # 40: crosses the interpreter's 16-wide blocks with a ragged tail

# Where a provider that materializes the L x S scores is left out (B*H*L*S*4 bytes above this).
MATH_MAX_SCORE_BYTES = 8 << 30
REFERENCE_MAX_SCORE_BYTES = 2 << 30  # fusedstab-torch on a GPU: fp32, several such tensors in backward

EAGER_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}


def attention_flops(B: int, H: int, L: int, S: int, E: int, causal: bool) -> dict[str, int]:
    fwd = 4 * B * H * L * S * E // (2 if causal else 1)
    bwd = 5 * fwd // 2  # the convention (FlashAttention's): backward = 2.5 x forward
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def bytes_model(B: int, H: int, L: int, S: int, E: int, e: int) -> dict[str, int]:
    q, kv, lse = B * H * L * E * e, B * H * S * E * e, 4 * B * H * L
    fwd = 2 * q + 2 * kv + lse  # read q, k, v; write o, lse
    bwd = 4 * q + 4 * kv + lse  # read do, q, o, lse, k, v; write dq, dk, dv
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def shapes(cfg: Config) -> list[tuple[int, int, int, int, bool]]:
    """(B, H, L, E, causal) per case."""
    if cfg.tiny:
        return [(*TINY[0], True)]  # causal only: the masked path (the interpreter is slow)
    if cfg.device == "cpu":
        base = CPU_QUICK if cfg.quick else CPU_FULL
    else:
        seqs = SEQ_QUICK_GPU if cfg.quick else SEQ_FULL
        base = [(TOKENS // L, HEADS, L, E) for E in HEAD_DIMS for L in seqs]
    return [(*s, causal) for s in base for causal in (False, True)]


def _bhle(sdpa, causal: bool):
    """``sdpa`` (torch's signature, (B, H, L, E)) on inputs laid out (B, L, H, E); output (B, L, H, E)."""
    def fn(q, k, v):
        return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    return fn


@functools.lru_cache(None)
def _sdpa_unavailable(backend: SDPBackend, dtype: torch.dtype, E: int, causal: bool) -> str | None:
    """Why torch's ``backend`` cannot run forward + backward of this dtype / head dim / causality on
    the GPU (probed once on a tiny input), or None."""
    q, k, v = randn_inputs([(1, 128, 2, E)] * 3, dtype, "cuda", [])[0]
    with warnings.catch_warnings(record=True) as seen, sdpa_kernel(backend):
        warnings.simplefilter("always")  # torch says why a backend was not used in warnings
        try:
            _bhle(F.scaled_dot_product_attention, causal)(q, k, v).sum().backward()
            return None
        except Exception as e:
            why = [str(w.message).strip() for w in seen] + [f"{type(e).__name__}: {e}".strip()]
            return "unavailable here: " + " | ".join(s.splitlines()[0] for s in why if s)[:300]


def _flash_attn(cfg: Config):
    """flash_attn.flash_attn_func, or None and why not."""
    if cfg.device != "cuda":
        return None, "flash-attn runs on CUDA only"
    if cfg.dtype not in (torch.float16, torch.bfloat16):
        return None, "flash-attn takes fp16 and bf16 only"
    try:
        return importlib.import_module("flash_attn").flash_attn_func, None
    except Exception as e:
        return None, f"flash-attn not importable: {type(e).__name__}: " + (str(e).splitlines() or [""])[0]


def _providers(cfg: Config, B: int, H: int, L: int, E: int, causal: bool) -> tuple[dict, dict]:
    eager = _bhle(F.scaled_dot_product_attention, causal)
    eager_ctx = functools.partial(sdpa_kernel, EAGER_BACKENDS)
    provs = {"eager": Provider(eager, eager_ctx)}
    skipped = {}
    scores = B * H * L * L * 4  # the L x S scores at 4 bytes
    if cfg.device == "cpu":
        why = "CPU: eager and fusedstab only (the sweep is for the GPU)"
        skipped.update({"compile": why, "sdpa-*": why})
    else:
        if cfg.compile:
            # fullgraph: a graph break raises (a note) instead of timing eager; compiled under
            # eager's backends, so the traced aten op is the same flash kernel.
            provs["compile"] = Provider(torch.compile(eager, fullgraph=True, dynamic=False), eager_ctx)
        else:
            skipped["compile"] = "torch.compile left out (--no-compile or --tiny)"
        for name, backend in SDPA_BACKENDS.items():
            why = _sdpa_unavailable(backend, cfg.dtype, E, causal)
            if why is None and backend == SDPBackend.MATH and scores > MATH_MAX_SCORE_BYTES:
                why = (f"left out at L={L}: the L x S scores, B*H*L*S*4 bytes = {scores / 2**30:.0f} GiB "
                       f"> {MATH_MAX_SCORE_BYTES >> 30} GiB")
            if why is None:
                provs[name] = Provider(eager, functools.partial(sdpa_kernel, backend))
            else:
                skipped[name] = why
    fa, why = _flash_attn(cfg)
    if fa is None:
        skipped["flash-attn"] = why
    else:  # (B, L, H, E) is its own layout
        provs["flash-attn"] = Provider(lambda q, k, v: fa(q, k, v, causal=causal))
    fp, fs = fusedstab_providers(lambda ff: _bhle(ff.scaled_dot_product_attention, causal), cfg, B * H * L * E)
    if cfg.device == "cuda" and "fusedstab-torch" in fp and scores > REFERENCE_MAX_SCORE_BYTES:
        del fp["fusedstab-torch"]
        fs["fusedstab-torch"] = (f"left out at L={L} on the GPU: the fp32 math reference, B*H*L*S*4 bytes = "
                                 f"{scores / 2**30:.0f} GiB > {REFERENCE_MAX_SCORE_BYTES >> 30} GiB")
    provs.update(fp)
    skipped.update(fs)
    return provs, skipped


def attention(cfg: Config) -> list[Case]:
    e = elt_size(cfg.dtype)
    cases = []
    for B, H, L, E, causal in shapes(cfg):
        provs, skipped = _providers(cfg, B, H, L, E, causal)
        params = {"B": B, "H": H, "L": L, "E": E, "causal": causal, "dtype": dtype_name(cfg.dtype)}
        shape = (B, L, H, E)
        make = functools.partial(randn_inputs, [shape] * 3, cfg.dtype, cfg.device, [shape])
        cases.append(Case("attention", params, make, provs, bytes_model(B, H, L, L, E, e),
                          flops=attention_flops(B, H, L, L, E, causal), skipped=skipped,
                          desc=f"{B} x {H} x {L} x {E}" + (", causal" if causal else ""), x=L,
                          series=f"E={E}" + (", causal" if causal else "")))
    return cases
