"""Issue 13's GPU-only paths on a real GPU (marked ``gpu``: skipped without CUDA; the GPU run script
runs them first). CPU checks the same paths under a simulated GPU (test_kernels_gpu_configs.py); this
file adds what only the hardware shows: bf16, real SM counts, real races, real grid limits.

Each case runs the public function on the triton backend against torch in fp32 (bf16: 2e-2 relative
to the largest value, a loose bound that catches wrong kernels, not the last bit).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedstab
import fusedstab.functional as FF

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}


def _check(fn, ref, inputs, dtype):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    with fusedstab.use_backend("triton"):
        y = fn(*xs)
    dy = torch.randn_like(y)
    gs = torch.autograd.grad(y, xs, dy)
    rs = [t.detach().float().requires_grad_() for t in inputs]
    ry = ref(*rs)
    rgs = torch.autograd.grad(ry, rs, dy.float())
    for got, want in [(y, ry), *zip(gs, rgs)]:
        err = ((got.float() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()
        assert err <= TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N", [(32, 200000), (4, 16384), (2048, 12288), (8192, 64), (1000, 4097)])
def test_layer_norm_paths(M, N, dtype):
    """Few long rows (split forward and backward), few rows of whole-row size, many rows beyond the
    whole-row backward (2-D grid), a QK-norm tile, an unaligned row."""
    x = torch.randn(M, N, device="cuda", dtype=dtype) + 1
    w, b = torch.randn(N, device="cuda", dtype=dtype), torch.randn(N, device="cuda", dtype=dtype)
    _check(lambda x, w, b: FF.layer_norm(x, (N,), w, b), lambda x, w, b: F.layer_norm(x, (N,), w, b), (x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,G,cl", [((1, 512, 64, 64), 32, False), ((1, 2048, 16, 16), 32, False),
                                        ((2, 256, 32, 32), 32, True), ((70000, 64), 8, False),
                                        ((70000, 64, 1, 1), 8, True)])
def test_group_norm_paths(shape, G, cl, dtype):
    """Batch 1 with channel tiles spread over programs, channels_last, (N, C) rows, N > 65535."""
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], device="cuda", dtype=dtype), torch.randn(shape[1], device="cuda", dtype=dtype)
    _check(lambda x, w, b: FF.group_norm(x, G, w, b, activation="silu"),
           lambda x, w, b: F.silu(F.group_norm(x, G, w, b)), (x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,L,S,causal", [(4, 32, 8, 1, 8192, False), (1, 16, 1, 2048, 2048, False),
                                                (1, 16, 1, 2048, 2048, True), (2, 8, 8, 3, 3000, True)])
def test_attention_paths(B, H, Hkv, L, S, causal, dtype):
    """Split-KV decoding (L = 1, 3), the MQA backward split over query heads."""
    q = torch.randn(B, H, L, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, Hkv, S, 128, device="cuda", dtype=dtype) for _ in range(2))
    gqa = H != Hkv
    _check(lambda q, k, v: FF.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa), (q, k, v), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_dropout_statistics(dtype):
    """The keep rate of the 32-bit Philox mask on the GPU (values of dropout are the CPU tests')."""
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=dtype)
    k = torch.randn(2, 8, 256, 64, device="cuda", dtype=dtype)
    v = torch.ones(2, 8, 256, 64, device="cuda", dtype=dtype)
    with fusedstab.use_backend("triton"):
        o = FF.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    # with v = 1, o = sum of the kept probabilities / 0.7: mean 1 over many rows
    assert abs(o.float().mean().item() - 1.0) < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", [0.01, -0.5])
def test_bias_leaky_relu_mask(slope, dtype):
    x = torch.randn(4096, 4100, device="cuda", dtype=dtype)
    b = torch.randn(4100, device="cuda", dtype=dtype)
    _check(lambda x, b: FF.bias_leaky_relu(x, b, slope), lambda x, b: F.leaky_relu(x + b, slope), (x, b), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("M", [100, 120, 4096])
def test_linear_leaky_relu_mask_epilogue(M, dtype):
    """Token counts in one M bucket share a tuning; the mask epilogue tunes apart."""
    x = torch.randn(M, 1024, device="cuda", dtype=dtype)
    w = torch.randn(2048, 1024, device="cuda", dtype=dtype) / 32
    b = torch.randn(2048, device="cuda", dtype=dtype)
    _check(lambda x, w, b: FF.linear_leaky_relu(x, w, b, -0.5), lambda x, w, b: F.leaky_relu(F.linear(x, w, b), -0.5),
           (x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_clip_grad_norm_vector_and_scalar_paths(offset, dtype):
    """16-byte aligned gradients (vector loads) and gradients cut at an odd offset (scalar path)."""
    import fusedstab.utils as FU

    flat = torch.randn(3 * (1 << 20) + 64, device="cuda", dtype=dtype)
    sizes = [1 << 20, 4097, (1 << 20) + 5]
    grads, at = [], offset
    for n in sizes:
        grads.append(flat[at:at + n])
        at += n + 64 - (n % 16)
    ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    qs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, q, g in zip(ps, qs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    with fusedstab.use_backend("triton"):
        total = FU.clip_grad_norm_(ps, 1.0)
    want = torch.nn.utils.clip_grad_norm_(qs, 1.0)
    torch.testing.assert_close(total.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=TOL[dtype], atol=TOL[dtype])
