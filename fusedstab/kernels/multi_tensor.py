"""Multi-tensor Triton kernels: one launch for a reduction over, or a scaling of, a whole list of
tensors of one (device, dtype) group.

The list becomes a table of chunks (address of the tensor, start, length, tensor index): one program
per chunk, so a huge tensor and a thousand tiny ones both spread over all SMs. The table is built on
the host once per list of tensors (addresses and sizes) and cached on the device, so a repeated call
(each training step, or a CUDA-graph replay) issues no host-to-device copy and no sync.
"""
import collections

import numpy as np
import torch
import triton
import triton.language as tl

CHUNK = 16384  # elements per program: 32-64 KiB of grads, enough to hide latency, many programs
BLOCK = 2048   # elements per loop step inside a chunk

# Reductions (constexpr REDUCE): sum |x|^p (general p), sum x^2, sum |x|, max |x|, min |x|, count x != 0.
POW, SQUARE, ABS, MAX, MIN, NONZERO = range(6)
# The same as constexprs, for the kernels: a jit function can read no other global (triton raises).
_POW, _SQUARE, _ABS, _MAX, _MIN, _NONZERO = (tl.constexpr(v) for v in range(6))

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
       torch.float64: tl.float64}


def reduce_kind(norm_type: float) -> int:
    if norm_type == 2.0:
        return SQUARE
    if norm_type == 1.0:
        return ABS
    if norm_type == float("inf"):
        return MAX
    if norm_type == float("-inf"):
        return MIN
    if norm_type == 0.0:
        return NONZERO
    return POW


@triton.jit
def _chunk_ptr(ADDR, START, c, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The chunk's first element. Loaded at run time, so triton knows nothing of its alignment: with
    ALIGNED (every tensor 16-byte aligned, checked on the host; chunk starts are multiples of CHUNK
    elements) it is told, and whole-block loads become 16-byte vectors."""
    ptr = tl.load(ADDR + c).to(tl.pointer_type(DTYPE)) + tl.load(START + c)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _combine(acc, v, REDUCE: tl.constexpr):
    if REDUCE == _MAX:
        return tl.maximum(acc, v)
    elif REDUCE == _MIN:
        return tl.minimum(acc, v)
    else:
        return acc + v


@triton.jit
def _finish(acc, nan, REDUCE: tl.constexpr):
    """Reduce a block to a scalar; max/min return NaN when any element was NaN, as torch does."""
    if REDUCE == _MAX:
        return tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.max(acc, axis=0))
    elif REDUCE == _MIN:
        return tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.min(acc, axis=0))
    else:
        return tl.sum(acc, axis=0)


@triton.jit
def _norm_step(acc, nan, a, m, p, REDUCE: tl.constexpr, MASKED: tl.constexpr):
    """Fold |x| of one block (``a``; lanes outside ``m`` are padding when MASKED) into (acc, nan)."""
    if REDUCE == _SQUARE:
        v = a * a
    elif REDUCE == _ABS:
        v = a
    elif REDUCE == _NONZERO:
        v = (a != 0).to(acc.dtype)
    elif REDUCE == _POW:
        v = tl.exp2(p * tl.log2(a))  # |x|^p; 0^p = 0 (p > 0) or inf (p < 0)
        if MASKED:
            v = tl.where(m, v, 0.0)
    elif REDUCE == _MIN:
        v = a
        if MASKED:
            v = tl.where(m, a, float("inf"))
    else:
        v = a
    if REDUCE == _MAX or REDUCE == _MIN:
        nan = tl.maximum(nan, (a != a).to(tl.int32))
    return _combine(acc, v, REDUCE), nan


@triton.jit
def _norm_chunks_kernel(ADDR, START, LEN, PARTIAL, p_hi, p_lo, DTYPE: tl.constexpr, ACC_T: tl.constexpr,
                        REDUCE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    ptr = _chunk_ptr(ADDR, START, c, DTYPE, ALIGNED)
    n = tl.load(LEN + c)
    p = tl.cast(p_hi, ACC_T) + tl.cast(p_lo, ACC_T)  # float arguments arrive as fp32: p in two parts for fp64
    if REDUCE == _MIN:
        acc = tl.full([BLOCK], float("inf"), ACC_T)
    else:
        acc = tl.zeros([BLOCK], ACC_T)
    nan = tl.zeros([BLOCK], tl.int32)
    offs = tl.arange(0, BLOCK)
    n_full = (n // BLOCK) * BLOCK
    for s in range(0, n_full, BLOCK):  # whole blocks: no mask, so loads can be vectors
        a = tl.abs(tl.load(ptr + (s + offs)).to(ACC_T))
        acc, nan = _norm_step(acc, nan, a, offs < BLOCK, p, REDUCE, False)
    o = n_full + offs  # the tail (possibly empty)
    m = o < n
    a = tl.abs(tl.load(ptr + o, mask=m, other=0.0).to(ACC_T))
    acc, nan = _norm_step(acc, nan, a, m, p, REDUCE, True)
    tl.store(PARTIAL + c, _finish(acc, nan, REDUCE))


@triton.jit
def _per_tensor_kernel(PARTIAL, OFFSETS, OUT, REDUCE: tl.constexpr, BLOCK: tl.constexpr):
    """Program t reduces the partials of tensor t's chunks, in a fixed order (deterministic)."""
    t = tl.program_id(0)
    lo = tl.load(OFFSETS + t)
    hi = tl.load(OFFSETS + t + 1)
    if REDUCE == _MIN:
        acc = tl.full([BLOCK], float("inf"), PARTIAL.dtype.element_ty)
    else:
        acc = tl.zeros([BLOCK], PARTIAL.dtype.element_ty)
    nan = tl.zeros([BLOCK], tl.int32)
    for s in range(lo, hi, BLOCK):
        o = s + tl.arange(0, BLOCK)
        if REDUCE == _MIN:
            v = tl.load(PARTIAL + o, mask=o < hi, other=float("inf"))
        else:
            v = tl.load(PARTIAL + o, mask=o < hi, other=0.0)
        if REDUCE == _MAX or REDUCE == _MIN:
            nan = tl.maximum(nan, (v != v).to(tl.int32))
        acc = _combine(acc, v, REDUCE)
    tl.store(OUT + t, _finish(acc, nan, REDUCE))


@triton.jit
def _scale_block(ptr, o, m, coef, DTYPE: tl.constexpr, ACC_T: tl.constexpr, ZERO_NONFINITE: tl.constexpr,
                 MASKED: tl.constexpr):
    if MASKED:
        g = tl.load(ptr + o, mask=m).to(ACC_T) * coef
    else:
        g = tl.load(ptr + o).to(ACC_T) * coef
    if ZERO_NONFINITE:
        g = tl.where(coef == 0, 0.0, g)  # 0 * NaN would stay NaN
    if MASKED:
        tl.store(ptr + o, g.to(DTYPE), mask=m)
    else:
        tl.store(ptr + o, g.to(DTYPE))


@triton.jit
def _scale_chunks_kernel(ADDR, START, LEN, COEF, DTYPE: tl.constexpr, ACC_T: tl.constexpr,
                         ZERO_NONFINITE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    ptr = _chunk_ptr(ADDR, START, c, DTYPE, ALIGNED)
    n = tl.load(LEN + c)
    coef = tl.load(COEF).to(ACC_T)
    offs = tl.arange(0, BLOCK)
    n_full = (n // BLOCK) * BLOCK
    for s in range(0, n_full, BLOCK):  # whole blocks, unmasked: vector loads and stores
        _scale_block(ptr, s + offs, offs < BLOCK, coef, DTYPE, ACC_T, ZERO_NONFINITE, False)
    _scale_block(ptr, n_full + offs, n_full + offs < n, coef, DTYPE, ACC_T, ZERO_NONFINITE, True)


class _Table:
    """Device-side chunk table of one list of tensors."""

    def __init__(self, tensors, device):
        sizes = np.array([t.numel() for t in tensors], dtype=np.int64)
        nchunks = np.maximum(-(-sizes // CHUNK), 1)  # an empty tensor still gets its (empty) chunk
        tensor_of_chunk = np.repeat(np.arange(len(tensors)), nchunks)
        first = np.concatenate([[0], np.cumsum(nchunks)])
        start = (np.arange(first[-1]) - first[tensor_of_chunk]) * CHUNK
        length = np.minimum(sizes[tensor_of_chunk] - start, CHUNK)
        addr = np.array([t.data_ptr() for t in tensors], dtype=np.int64)[tensor_of_chunk]
        host = torch.from_numpy(np.stack([addr, start, length, ]).astype(np.int64))
        offsets = torch.from_numpy(first.astype(np.int64))
        if device.type == "cuda":  # pinned + non_blocking: no host sync
            host, offsets = host.pin_memory(), offsets.pin_memory()
        self.addr, self.start, self.length = host.to(device, non_blocking=True).unbind(0)
        self.offsets = offsets.to(device, non_blocking=True)
        self.num_chunks = int(first[-1])
        self.num_tensors = len(tensors)
        self.aligned = bool(np.all(addr % 16 == 0))  # every chunk start then too: CHUNK * size % 16 == 0


_cache: "collections.OrderedDict[tuple, _Table]" = collections.OrderedDict()
_CACHE_SIZE = 32


def table(tensors) -> _Table:
    """The chunk table of ``tensors`` (same device and dtype, dense), cached by addresses and sizes.
    The caller keeps the tensors alive for as long as the kernels run on them."""
    t0 = tensors[0]
    key = (t0.device, t0.dtype) + tuple((t.data_ptr(), t.numel()) for t in tensors)
    tab = _cache.get(key)
    if tab is None:
        tab = _cache[key] = _Table(tensors, t0.device)
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return tab


def norm(tensors, norm_type: float, out: torch.Tensor) -> torch.Tensor:
    """Per-tensor reductions of a dense same-dtype list (see fusedstab.reference.multi_tensor_norm)
    into ``out`` (len(tensors),), in its dtype (the accumulation dtype)."""
    tab = table(tensors)
    acc_dtype = out.dtype
    device = tensors[0].device
    kind = reduce_kind(norm_type)
    partial = torch.empty(tab.num_chunks, dtype=acc_dtype, device=device)
    p_hi = float(np.float32(norm_type)) if kind == POW else 0.0
    p_lo = float(norm_type) - p_hi if kind == POW else 0.0
    _norm_chunks_kernel[(tab.num_chunks,)](
        tab.addr, tab.start, tab.length, partial, p_hi, p_lo, DTYPE=_TL[tensors[0].dtype],
        ACC_T=_TL[acc_dtype], REDUCE=kind, ALIGNED=tab.aligned, BLOCK=BLOCK, num_warps=8)
    _per_tensor_kernel[(tab.num_tensors,)](partial, tab.offsets, out, REDUCE=kind, BLOCK=256, num_warps=4)
    return out


def scale_(tensors, coef: torch.Tensor, zero_nonfinite: bool) -> None:
    tab = table(tensors)
    _scale_chunks_kernel[(tab.num_chunks,)](
        tab.addr, tab.start, tab.length, coef, DTYPE=_TL[tensors[0].dtype],
        ACC_T=tl.float64 if tensors[0].dtype == torch.float64 else tl.float32, ZERO_NONFINITE=zero_nonfinite,
        ALIGNED=tab.aligned, BLOCK=BLOCK, num_warps=8)
