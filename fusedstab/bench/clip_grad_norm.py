"""Cases for global-norm gradient clipping over parameter lists shaped like real models.

Lists (one dtype each, the run's ``--dtype``):
  gpt2-small  148 tensors, 124M elements: wte 50257x768, wpe 1024x768, 12 layers of [ln_1 w, b;
              c_attn 768x2304, 2304; c_proj 768x768, 768; ln_2 w, b; c_fc 768x3072, 3072;
              mlp c_proj 3072x768, 768], ln_f w, b (Hugging Face order)
  mixed-1000  1000 tensors of log-uniform sizes 16..2^20 (seeded), ~95M elements: launch overhead
              and load balance over many tensors of very different sizes
  gpt-1.3b    the same transformer layout at d=2048, 24 layers, vocab 50257, context 2048:
              292 tensors, 1.31B elements (GPU only: the bandwidth case)
On CPU by default (quick) the same layouts scaled down (gpt2-tiny d=32, 2 layers; mixed-100, 100
tensors of sizes 1..256; gpt-small d=256, 4 layers), the first small enough for the Triton
interpreter. 100 tensors, not 1000, on CPU: torch.compile's graph grows with the list, and compiling
the clip of 1000 tensors took minutes of a cold run (mixed-100: about 40 s of CPU time).

Modes (``CLIP_MODES``):
  norm  ``get_total_norm`` of every gradient             bytes = read each grad once       = N*e
  clip  ``clip_grad_norm_``: the norm, then the scaling  bytes = N*e + read + write N*e     = 3*N*e
(N: elements in the list, e: element size). The clip mode scales the gradients in place each call:
after the first call they sit at the threshold and the scale is ~1, the same work.

Providers: ``eager`` torch.nn.utils with foreach=True (the baseline, and the reference the others'
results are checked against), ``eager-loop`` foreach=False, ``compile`` torch.compile of the
foreach version (fullgraph), ``fusedstab-<backend>``, ``fusedstab-<backend>+fixed+stats`` and
``+zclip+stats`` (AdaptiveGradClipper with GradStats telemetry polled each call; clip mode), ``apex`` (apex.contrib.clip_grad's
multi-tensor clip_grad_norm_, and amp_C.multi_tensor_l2norm for the norm) when importable. On CUDA
every row also counts the device work items (kernels, memcpys, memsets) and host syncs of one call.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch.nn import utils as TU

from .case import CLIP_MODES, Case, Config, Provider, count, dtype_name, elt_size
from .providers import fusedstab_providers

MAX_NORM = 1.0
NORM_TYPE = 2.0


class ClipFns(NamedTuple):
    """What a provider does in each mode: ``norm(grads) -> total``, ``clip(params) -> total``."""

    norm: Callable | None
    clip: Callable | None


# ----------------------------------------------------------------------------- parameter lists
def transformer(vocab: int, ctx: int, d: int, layers: int) -> list[tuple[int, ...]]:
    """GPT-2's parameter shapes: embeddings, ``layers`` blocks of 12 tensors, the final LayerNorm."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d)] + block * layers + [(d,), (d,)]


def mixed(n: int, lo: int, hi: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``n`` tensors of log-uniform sizes in [lo, hi]; 2-D where the size factors as rows x 2^k."""
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(math.log(lo), math.log(hi), n)).astype(np.int64)
    out = []
    for s in map(int, sizes):
        k = min((s & -s).bit_length() - 1, 10)  # the largest power of two (<= 1024) dividing s
        out.append((s >> k, 1 << k) if k >= 4 and s >> k > 1 else (s,))
    return out


def model_lists(cfg: Config) -> list[tuple[str, list[tuple[int, ...]]]]:
    if cfg.tiny:
        return [("tiny", [(3,), (17, 5), (1,), (64,), (1021,), (2, 3)])]
    if cfg.device == "cpu" and cfg.quick:
        return [("gpt2-tiny", transformer(512, 64, 32, 2)), ("mixed-100", mixed(100, 1, 256)),
                ("gpt-small", transformer(8192, 256, 256, 4))]
    lists = [("gpt2-small", transformer(50257, 1024, 768, 12)), ("mixed-1000", mixed(1000, 16, 1 << 20))]
    if cfg.device == "cuda":
        lists.append(("gpt-1.3b", transformer(50257, 2048, 2048, 24)))
    return lists


# ----------------------------------------------------------------------------- providers
def _torch_fns(foreach: bool) -> ClipFns:
    return ClipFns(norm=lambda gs: TU.get_total_norm(gs, NORM_TYPE, foreach=foreach),
                   clip=lambda ps: TU.clip_grad_norm_(ps, MAX_NORM, NORM_TYPE, foreach=foreach))


def _compiled_fns() -> ClipFns:
    # fullgraph: a graph break raises (the provider fails with a note) instead of timing eager.
    eager = _torch_fns(foreach=True)
    compile_ = functools.partial(torch.compile, fullgraph=True, dynamic=False)
    return ClipFns(norm=compile_(eager.norm), clip=compile_(eager.clip))


def _fusedstab_fns(_functional) -> ClipFns:
    from fusedstab import utils as FU

    return ClipFns(norm=lambda gs: FU.get_total_norm(gs, NORM_TYPE),
                   clip=lambda ps: FU.clip_grad_norm_(ps, MAX_NORM, NORM_TYPE))


# ---- the adaptive clipper (fusedstab.utils.AdaptiveGradClipper): "clip" mode only, a clipper per
# parameter list; "+stats": with GradStats telemetry, polled every call (its overhead over plain clipping)
CLIPPER_VARIANTS = {"fixed+stats": ("fixed", True), "zclip+stats": ("zclip", True)}


def _clipper_fns(variant: str) -> ClipFns:
    from fusedstab.utils import AdaptiveGradClipper, GradStats

    mode, stats = CLIPPER_VARIANTS[variant]
    made = {}

    def clip(ps):
        c = made.get(id(ps))
        if c is None:  # max_norm is the cap, also during ZClip's warm-up (the checked first call)
            made.clear()
            c = made[id(ps)] = AdaptiveGradClipper(ps, mode, max_norm=MAX_NORM,
                                                   telemetry=GradStats(ring=16) if stats else None)
        total = c.step()
        if stats:
            c.telemetry.poll()
        return total
    return ClipFns(norm=None, clip=clip)


def _clipper_providers(cfg: Config, numel: int, programs: int) -> tuple[dict, dict]:
    import dataclasses

    provs, skipped = {}, {}
    for variant in CLIPPER_VARIANTS:
        fp, fs = fusedstab_providers(lambda _ff, v=variant: _clipper_fns(v), cfg, numel, programs=programs)
        provs.update({f"{k}+{variant}": dataclasses.replace(p, modes=("clip",)) for k, p in fp.items()})
        skipped.update({f"{k}+{variant}": why for k, why in fs.items()})
    return provs, skipped


def _apex(cfg: Config) -> tuple[dict, dict]:
    if cfg.device != "cuda":
        return {}, {"apex": "apex's multi-tensor kernels run on CUDA only"}
    try:
        from apex.contrib.clip_grad import clip_grad_norm_ as apex_clip
    except Exception as e:
        return {}, {"apex": f"apex.contrib.clip_grad not importable: {type(e).__name__}: {e}"}
    norm = None
    try:
        import amp_C
        from apex.multi_tensor_apply import multi_tensor_applier

        flag = torch.zeros(1, dtype=torch.int, device="cuda")
        # one dtype per list here, as multi_tensor_l2norm needs
        norm = lambda gs: multi_tensor_applier(amp_C.multi_tensor_l2norm, flag, [gs], False)[0]
    except Exception:
        pass
    fns = ClipFns(norm=norm, clip=lambda ps: apex_clip(ps, MAX_NORM, NORM_TYPE))
    return {"apex": Provider(fns, modes=CLIP_MODES if norm else ("clip",))}, {}


def providers(cfg: Config, numel: int, n_tensors: int) -> tuple[dict, dict]:
    provs = {"eager": Provider(_torch_fns(foreach=True)), "eager-loop": Provider(_torch_fns(foreach=False))}
    skipped = {}
    if cfg.compile:
        provs["compile"] = Provider(_compiled_fns())
    else:
        skipped["compile"] = "torch.compile left out (--no-compile or --tiny)"
    try:
        import fusedstab.utils  # noqa: F401
    except Exception as e:
        skipped["fusedstab-*"] = f"fusedstab.utils not importable: {type(e).__name__}: {e}"
    else:
        # programs of one clip: a chunk each for the norm and the scaling, one per tensor to finish
        programs = 3 * n_tensors + 2 * (numel >> 14)
        fp, fs = fusedstab_providers(_fusedstab_fns, cfg, numel, programs=programs)
        provs.update(fp)
        skipped.update(fs)
        cp, cs = _clipper_providers(cfg, numel, programs)
        provs.update(cp)
        skipped.update(cs)
    ap, ask = _apex(cfg)
    provs.update(ap)
    skipped.update(ask)
    return provs, skipped


# ----------------------------------------------------------------------------- cases
def _inputs(shapes, dtype, device):
    """Parameters (uninitialized: only their grads are read) with seeded random normal grads.
    Returned as the harness's (inputs, grad_outputs): the parameters, and nothing."""
    g = torch.Generator(device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.empty(s, dtype=dtype, device=device)
        p.grad = torch.randn(s, dtype=dtype, device=device, generator=g)
        params.append(p)
    return params, []


def clip_thunk(fns: ClipFns, params: list, _grads: list, mode: str) -> Callable[[], object]:
    """norm: the total norm of the grads (the list is built once, outside the timing); clip: the
    whole clip_grad_norm_ on the parameters. The first call of clip also returns (copies of) the
    clipped grads, so that the runner checks them against eager's, not only the total."""
    grads = [p.grad for p in params]
    if mode == "norm":
        return lambda: fns.norm(grads)
    if mode != "clip":
        raise ValueError(f"unknown clip mode {mode!r}")
    first = [True]

    def clip():
        total = fns.clip(params)
        if first[0]:  # snapshots: later calls keep scaling these grads in place
            first[0] = False
            return (total, *(g.clone() for g in grads))
        return total

    return clip


def bytes_model(numel: int, elt: int) -> dict[str, int]:
    return {"norm": numel * elt, "clip": 3 * numel * elt}


def clip_grad_norm(cfg: Config) -> list[Case]:
    elt = elt_size(cfg.dtype)
    cases = []
    for name, shapes in model_lists(cfg):
        numel = sum(math.prod(s) for s in shapes)
        provs, skipped = providers(cfg, numel, len(shapes))
        make = functools.partial(_inputs, shapes, cfg.dtype, cfg.device)
        params = {"model": name, "tensors": len(shapes), "numel": numel, "dtype": dtype_name(cfg.dtype)}
        cases.append(Case("clip_grad_norm", params, make, provs, bytes_model(numel, elt), skipped=skipped,
                          modes=CLIP_MODES, thunk=clip_thunk, count_launches=True,
                          desc=f"{name}: {len(shapes)} tensors, {count(numel)} params"))
    return cases
