"""The GPU's launch configurations, run by the interpreter (issue 13).

Under ``common.simulate_gpu()`` the launchers choose the grids, splits and tiles an H100 gets (132
SMs), whatever the tensors' device; the interpreter runs those launches on CPU tensors. So the
multi-program paths that only a GPU takes (rows split across programs, channel tiles spread over
programs, key ranges split, group loops split) are checked here against the torch backend, at small
shapes. Every test uses the ``program_order`` fixture (tests/conftest.py): it runs with the
interpreter's programs in order and reversed, so a kernel that relies on program order fails on CPU.
"""
from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

import fusedstab
import fusedstab.functional as FF
from fusedstab.kernels import common, introspect

pytestmark = [pytest.mark.usefixtures("program_order"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the interpreter")]


# A GPU of 8 SMs: the H100's launch logic at a size the interpreter runs quickly (thresholds that
# compare with the SM count, such as "fewer rows than SMs", are reached with a few rows).
SMALL_GPU = common.GPU("small (simulated)", 8, (9, 0))


def _both(fn, *inputs, gpu=common.H100):
    """fn's outputs and input gradients on the triton backend (``gpu``'s launches) and the torch backend."""
    out = []
    for backend in ("triton", "torch"):
        xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        with fusedstab.use_backend(backend), common.simulate_gpu(gpu):
            y = fn(*xs)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
        out.append((y.detach(), [t.grad for t in xs if t.requires_grad]))
    return out


def _close(got, want, rtol=1e-4, atol=1e-4):
    (y, gs), (ry, rgs) = got, want
    torch.testing.assert_close(y, ry, rtol=rtol, atol=atol)
    for g, rg in zip(gs, rgs):
        torch.testing.assert_close(g, rg, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the plugin itself
@triton.jit
def _order_kernel(COUNTER, OUT):
    slot = tl.atomic_add(COUNTER, 1)
    tl.store(OUT + slot, tl.program_id(0))


def test_program_order_plugin(program_order):
    counter, out = torch.zeros(1, dtype=torch.int32), torch.zeros(5, dtype=torch.int32)
    _order_kernel[(5,)](counter, out)
    expect = list(range(5)) if program_order == "in_order" else list(range(4, -1, -1))
    assert out.tolist() == expect


# ----------------------------------------------------------------------------- GroupNorm
GN_SHAPES = [  # (shape, G, channels_last): channel tiles spread over programs, (N, C) rows
    ((1, 512, 16, 16), 2, False),   # 32 channel tiles x 1 spatial tile per group
    ((2, 96, 9, 7), 3, False),      # odd sizes
    ((3, 64, 5, 5), 4, True),       # channels_last: per-sample BatchNorm kernels
    ((37, 48), 6, False),           # (N, C): the rows kernels
    ((5, 24, 1, 1), 3, False),
]


@pytest.mark.parametrize("shape,G,cl", GN_SHAPES, ids=[f"{'x'.join(map(str, s))}-G{g}{'-cl' if c else ''}"
                                                       for s, g, c in GN_SHAPES])
@pytest.mark.parametrize("act", ["none", "silu"])
def test_group_norm(shape, G, cl, act):
    x = torch.randn(shape) * 2 + 3
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    for t in (x, w, b):
        t.requires_grad_()
    fn = lambda x, w, b: FF.group_norm(x, G, w, b, activation=None if act == "none" else act)  # noqa: E731
    got, want = _both(fn, x, w, b)
    _close(got, want)


def test_group_norm_batch1_fills_the_gpu():
    """Batch 1 at diffusion shapes: the four NCHW kernels spread channel tiles over programs (the
    split was capped by the spatial tiles: 32 and 128 programs on 132 SMs)."""
    for shape in ((1, 2048, 16, 16, 32, False), (1, 512, 64, 64, 32, False)):
        cases = introspect.group_norm_cases([shape], [torch.bfloat16], acts=("silu",))
        for launch in introspect.run_cases(cases):
            if launch.name != "_combine_kernel":
                programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
                assert programs >= common.H100.sm_count, (shape, launch.name, launch.grid)


# ----------------------------------------------------------------------------- LayerNorm / RMSNorm
LN_SHAPES = [  # (M, N, thresholds lowered to reach each path at interpreter sizes), on SMALL_GPU's launches
    (3, 5000, dict(SPLIT_MIN_N=4096, LONG_BLOCK=512)),  # few rows: forward and backward split (10 chunks)
    (2, 7001, dict(MAX_FUSED_FWD=4096, MAX_FUSED_BWD=2048, LONG_BLOCK=512)),  # long rows, partial last chunk
    (11, 1200, dict(MAX_FUSED_BWD=1024, LONG_BLOCK=256)),  # many rows: split backward on a 2-D grid
    (10, 1500, dict(MAX_FUSED_FWD=1024, LONG_BLOCK=256)),  # many long rows: a program per row forward
    (67, 64, {}),  # a QK-norm: 64 rows of 64 per program, a partial block
]


@pytest.mark.parametrize("M,N,knobs", LN_SHAPES, ids=[f"{m}x{n}" for m, n, _ in LN_SHAPES])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm"])
def test_layer_norm(monkeypatch, M, N, knobs, op):
    from fusedstab.kernels import layer_norm as K

    for name, value in knobs.items():
        monkeypatch.setattr(K, name, value)
    x, r = torch.randn(M, N) + 2, torch.randn(M, N)
    w, b = torch.randn(N), torch.randn(N)
    for t in (x, r, w, b):
        t.requires_grad_()
    if op == "layer_norm":
        got, want = _both(lambda x, w, b: FF.layer_norm(x, (N,), w, b), x, w, b, gpu=SMALL_GPU)
    elif op == "rms_norm":
        got, want = _both(lambda x, w: FF.rms_norm(x, (N,), w), x, w, gpu=SMALL_GPU)
    else:
        got, want = _both(lambda x, r, w, b: torch.cat(FF.add_layer_norm(x, r, (N,), w, b), 1), x, r, w, b,
                          gpu=SMALL_GPU)
    _close(got, want, rtol=1e-4, atol=2e-4)


def test_layer_norm_paths():
    """Which kernels an H100 gets: few rows are split over programs; the backward of long rows keeps
    its dw/db chunk in registers over a 2-D grid (partials of row groups x N, not 2 x SMs x N)."""
    paths = {}
    for M, N in [(32, 200000), (32768, 4096), (16, 32768), (4096, 65536), (32768, 16384)]:
        launches = introspect.run_cases(introspect.layer_norm_cases([(M, N)], [torch.bfloat16], ops=("layer_norm",)))
        paths[(M, N)] = [(launch.name, launch.grid) for launch in launches]
    assert [n for n, _ in paths[(32, 200000)]] == ["_fwd_split_stats_kernel", "_fwd_split_norm_kernel",
                                                    "_bwd_split_sums_kernel", "_bwd_split_chunk_kernel"]
    assert all(g[0] * g[1] >= 132 for _, g in paths[(32, 200000)])  # 32 rows fill 132 SMs
    assert [n for n, _ in paths[(32768, 4096)]] == ["_fwd_rows_kernel", "_bwd_rows_kernel"]
    assert paths[(16, 32768)][0][0] == "_fwd_split_stats_kernel"
    assert [n for n, _ in paths[(4096, 65536)]][:1] == ["_fwd_long_kernel"]
    chunk = dict(paths[(32768, 16384)])["_bwd_split_chunk_kernel"]
    assert chunk[0] == 4 and chunk[0] * chunk[1] <= 2 * 132 + 4  # chunks x row groups: ~2 programs per SM


# ----------------------------------------------------------------------------- multi-tensor (clipping)
def _grads(aligned: bool, dtype=torch.float32):
    """Tensors of whole blocks and tails (and more than a chunk), cut from one flat buffer at 16-byte
    aligned offsets, or at an odd element offset (addresses that are not)."""
    from fusedstab.kernels import multi_tensor as K

    sizes = [K.CHUNK + 3 * K.BLOCK + 5, 2 * K.BLOCK, 7, 0, K.BLOCK + 1]
    flat = torch.randn(sum(sizes) + 64 * len(sizes), dtype=dtype)
    out, at = [], 0 if aligned else 1
    for n in sizes:
        out.append(flat[at:at + n])
        at += -(-(n + 1) // 64) * 64 + (0 if aligned else 1)
    assert all((t.data_ptr() % 16 == 0) == aligned for t in out if t.numel())
    return out


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("norm_type", [2.0, float("inf"), float("-inf"), 1.5, 0.0])
def test_multi_tensor_norm(aligned, norm_type):
    from fusedstab import reference
    from fusedstab.kernels import multi_tensor as K

    ts = _grads(aligned)
    ts[0][5] = 0.0
    with common.simulate_gpu():
        got = K.norm(ts, norm_type, torch.empty(len(ts)))
    torch.testing.assert_close(got, reference.multi_tensor_norm(ts, norm_type).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_multi_tensor_scale(aligned):
    from fusedstab.kernels import multi_tensor as K

    ts = _grads(aligned)
    want = [t * 0.37 for t in ts]
    with common.simulate_gpu():
        K.scale_(ts, torch.tensor([0.37]), False)
    for t, w in zip(ts, want):
        torch.testing.assert_close(t, w)


def test_multi_tensor_alignment_flag():
    """ALIGNED (tl.multiple_of on the chunk pointer: 16-byte vector loads) only when every tensor is
    16-byte aligned; one unaligned tensor turns it off for the list."""
    from fusedstab.kernels import multi_tensor as K

    for aligned in (True, False):
        ts = _grads(aligned)
        with common.simulate_gpu(), introspect.record_launches() as launches:
            K.norm(ts, 2.0, torch.empty(len(ts)))
            K.scale_(ts, torch.tensor([1.0]), False)
        flags = {launch.name: launch.kwargs.get("ALIGNED") for launch in launches if "chunks" in launch.name}
        assert flags == {"_norm_chunks_kernel": aligned, "_scale_chunks_kernel": aligned}
    mixed = _grads(True)[:2] + _grads(False)[:1]
    with introspect.record_launches() as launches:
        K.norm(mixed, 2.0, torch.empty(len(mixed)))
    assert launches[0].kwargs["ALIGNED"] is False



# ----------------------------------------------------------------------------- bias + Leaky ReLU
@pytest.mark.parametrize("shape,dim", [((37, 100), -1), ((3, 12, 5, 7), 1), ((2, 8, 9, 3), -1)],
                         ids=["cols-100", "nchw-rows", "cols-3"])
@pytest.mark.parametrize("slope", [0.01, -0.5])
def test_bias_leaky_relu(shape, dim, slope):
    """A negative slope saves the sign bits: backward loads them as a byte tile and expands them in
    registers (row lengths that are not multiples of 8 end in a partial byte)."""
    x = torch.randn(shape).requires_grad_()
    b = torch.randn(shape[dim]).requires_grad_()
    got, want = _both(lambda x, b: FF.bias_leaky_relu(x, b, slope, dim=dim), x, b)
    _close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Linear + Leaky ReLU autotune
def test_linear_autotune_key_buckets_m_and_names_the_epilogue():
    from fusedstab.kernels import linear_leaky_relu as K

    keys = K._linear_leaky_relu_kernel.keys
    assert "M" not in keys and "M_BUCKET" in keys and {"HAS_B", "SAVE_MASK", "N", "K"} <= set(keys)
    assert [K.m_bucket(m) for m in (1, 16, 17, 100, 128, 129, 8192, 10 ** 6)] == \
        [16, 16, 32, 128, 128, 256, 8192, 16384]


def test_linear_mask_epilogue_leaves_out_spilling_configs():
    """With SAVE_MASK the 128x256 / 256x128 (8 warps) and 128x128 (4 warps) tiles spill for sm_90a
    (kernel report): pruned, whatever the call; without it every config stays."""
    from fusedstab.kernels import linear_leaky_relu as K

    configs = K.gpu_configs()
    tiles = lambda cs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in cs}  # noqa: E731
    assert K.prune_configs(configs, {}, SAVE_MASK=False) == configs
    kept = tiles(K.prune_configs(configs, {}, SAVE_MASK=True))
    assert not kept & {(128, 256, 64, 8), (256, 128, 64, 8), (128, 128, 64, 4)}
    assert (128, 128, 64, 8) in kept and len(kept) >= 5


# ----------------------------------------------------------------------------- attention
def _attention_truth(q, k, v, do, causal):
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=causal,
                                                         enable_gqa=q.shape[1] != k.shape[1])
    o.backward(do.double())
    return o.detach(), qd.grad, kd.grad, vd.grad


def _attention_inputs(B, Hq, Hkv, L, S, E):
    g = torch.Generator().manual_seed(3)
    q, do = torch.randn(B, Hq, L, E, generator=g), torch.randn(B, Hq, L, E, generator=g)
    k, v = torch.randn(B, Hkv, S, E, generator=g), torch.randn(B, Hkv, S, E, generator=g)
    return q, k, v, do


@pytest.mark.parametrize("causal", [False, True])
def test_attention_split_kv_forward(causal):
    """Decoding shapes: 3 query rows, 300 keys, 4 programs on an 8-SM GPU: keys split over 4 programs
    per query block, partials merged (causal: most splits see no key, lse -inf there)."""
    from fusedstab.kernels import attention as A

    q, k, v, do = _attention_inputs(1, 4, 2, 3, 300, 32)
    with common.simulate_gpu(SMALL_GPU), introspect.record_launches() as launches:
        A.attention_fwd(q, k, v, causal=causal, scale=32 ** -0.5)
    assert [launch.name for launch in launches] == ["_attn_fwd_kernel", "_split_kv_combine_kernel"]
    assert launches[0].arg("KV_SPLIT") == 4
    with common.simulate_gpu(SMALL_GPU):
        o, lse = A.attention_fwd(q, k, v, causal=causal, scale=32 ** -0.5)
    to = _attention_truth(q, k, v, do, causal)[0]
    torch.testing.assert_close(o.double(), to, rtol=1e-5, atol=1e-5)
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 32 ** -0.5
    if causal:
        s = s.masked_fill(~torch.ones(3, 300, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


def test_attention_split_kv_dropout_same_mask():
    """Dropout names each element by its position, so the split forward keeps exactly the elements the
    unsplit one keeps."""
    from fusedstab.kernels import attention as A

    q, k, v, _ = _attention_inputs(1, 2, 2, 3, 200, 16)
    kw = dict(scale=0.25, dropout_p=0.3, seed=11, offset=2)
    with common.simulate_gpu(SMALL_GPU):
        o_split, lse_split = A.attention_fwd(q, k, v, **kw)
    o, lse = A.attention_fwd(q, k, v, **kw)  # the interpreter's launches: no split
    torch.testing.assert_close(o_split, o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_split, lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_mqa_backward_group_split(causal):
    """MQA at batch 1: the dk/dv grid has 2 programs on an 8-SM GPU, so the loop over the 8 query
    heads is split over 8 programs whose fp32 partials are summed in a fixed order."""
    from fusedstab.kernels import attention as A

    q, k, v, do = _attention_inputs(1, 8, 1, 40, 40, 16)
    with common.simulate_gpu(SMALL_GPU):
        o, lse = A.attention_fwd(q, k, v, causal=causal, scale=0.25)
        with introspect.record_launches() as launches:
            A.attention_bwd(do, q, k, v, o, lse, causal=causal, scale=0.25)
        dq, dk, dv, _ = A.attention_bwd(do, q, k, v, o, lse, causal=causal, scale=0.25)
    dkdv = [launch for launch in launches if launch.name == "_attn_bwd_dkdv_kernel"][0]
    assert dkdv.arg("GSPLIT") == 8
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) * 0.25
    if causal:
        s = s.masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf"))
    (torch.softmax(s, -1) @ vd).backward(do.double())
    for got, want in ((dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
