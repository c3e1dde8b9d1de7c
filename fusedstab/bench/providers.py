"""Provider sets shared by the op modules: eager torch, torch.compile, fusedstab backends, peers;
what each provider is (``ABOUT``), and which fusedstab backends can run here and why not (``backends``).

Each builder returns (providers, skipped): a provider that cannot run here is left out with a reason,
so one missing peer or failing backend never stops the run.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch

from .case import Config, Provider

# The Triton interpreter runs program by program on CPU: only shapes this small are worth timing.
INTERPRET_MAX_ELEMS = 1 << 16
# ... and only calls of this few programs (multi-tensor ops launch about one per tensor).
INTERPRET_MAX_PROGRAMS = 256


def torch_providers(eager: Callable, cfg: Config) -> tuple[dict, dict]:
    provs = {"eager": Provider(eager)}
    skipped = {}
    if not cfg.compile:
        skipped["compile"] = "torch.compile left out (--no-compile or --tiny)"
    else:
        # fullgraph: a graph break raises (and the provider is skipped with a note) instead of
        # silently timing eager. dynamic=False: one specialised graph per shape, as users get.
        provs["compile"] = Provider(torch.compile(eager, fullgraph=True, dynamic=False))
    return provs, skipped


@functools.lru_cache(None)
def fusedstab_api():
    """(fusedstab module, functional module, backend names) or the ImportError's text."""
    try:
        fs = importlib.import_module("fusedstab")
        ff = importlib.import_module("fusedstab.functional")
        return fs, ff, tuple(fs.available_backends())
    except Exception as e:  # the library under test is broken: still time the others
        return f"fusedstab not importable: {type(e).__name__}: {e}"


def fusedstab_providers(make_fn: Callable[[object], Callable], cfg: Config, numel: int,
                        programs: int | None = None) -> tuple[dict, dict]:
    """One provider per usable fusedstab backend; ``make_fn(functional_module)`` -> callable.
    ``programs``: about how many Triton programs one call runs, where that (not ``numel``) is what
    makes the interpreter slow (a list of many small tensors)."""
    api = fusedstab_api()
    if isinstance(api, str):
        return {}, {"fusedstab-*": api}
    fs, ff, backends = api
    provs, skipped = {}, {}
    for name in backends:
        label = f"fusedstab-{name}"
        if unavailable(name, cfg.device) is not None:
            continue  # the report's backend table says why
        if cfg.device == "cpu" and name == "triton" and numel > INTERPRET_MAX_ELEMS:
            skipped[label] = f"Triton interpreter on CPU: only shapes up to {INTERPRET_MAX_ELEMS} elements"
            continue
        if cfg.device == "cpu" and name == "triton" and (programs or 0) > INTERPRET_MAX_PROGRAMS:
            skipped[label] = f"Triton interpreter on CPU: only calls of up to {INTERPRET_MAX_PROGRAMS} programs"
            continue
        provs[label] = Provider(make_fn(ff), functools.partial(fs.use_backend, name))
    return provs, skipped


def liger(module: str, attr: str, cfg: Config) -> tuple[object | None, str | None]:
    """A liger-kernel autograd Function, or None and why not (it is CUDA-only)."""
    if cfg.device != "cuda":
        return None, "liger-kernel runs on CUDA only"
    try:
        return getattr(importlib.import_module(f"liger_kernel.ops.{module}"), attr), None
    except Exception as e:
        return None, f"liger-kernel not importable: {type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- what each provider is
# One line each, in the order reports list them. Yardsticks are not fusedstab's competitors: they
# bound what a kernel could reach (matmul) or show the cost of a naive version (eager-loop).
ABOUT = {
    "eager": "the same op in eager PyTorch (torch.nn.functional; torch.nn.utils with foreach=True for "
             "clip_grad_norm; SDPA's flash / memory-efficient backends for attention): the baseline of "
             "every \"x eager\"",
    "compile": "torch.compile(eager, fullgraph=True, dynamic=False): what PyTorch fuses without fusedstab",
    "eager-loop": "yardstick, clip_grad_norm only: torch.nn.utils with foreach=False (one kernel per "
                  "tensor), the naive version",
    "matmul": "yardstick, linear_leaky_relu only: bare x @ w.T with its backward (no bias, no "
              "activation), the ceiling for the fused matmul; its output is not compared with eager's",
    "liger": "liger-kernel's Triton LayerNorm / RMSNorm (a peer; CUDA only, when installed)",
    "apex": "NVIDIA apex's multi-tensor clip_grad_norm_ / l2norm (a peer; CUDA only, when installed)",
    "flash-attn": "flash_attn.flash_attn_func, FlashAttention 2 (a peer; CUDA, fp16/bf16, when installed)",
    "sdpa-flash": "F.scaled_dot_product_attention forced onto its FlashAttention backend",
    "sdpa-cudnn": "F.scaled_dot_product_attention forced onto its cuDNN backend",
    "sdpa-efficient": "F.scaled_dot_product_attention forced onto its memory-efficient backend",
    "sdpa-math": "F.scaled_dot_product_attention forced onto its math backend (materializes L x L)",
}
BACKEND_ABOUT = {
    "triton": "fusedstab's Triton kernels",
    "cuda": "fusedstab's C++/CUDA kernels",
    "cpu": "fusedstab's C++ CPU kernels",
    "torch": "fusedstab's eager reference (fusedstab/reference.py), what fusedstab runs where no "
             "kernel backend can",
}


def about(name: str) -> str:
    if name.startswith("fusedstab-"):
        backend = name.removeprefix("fusedstab-")
        return BACKEND_ABOUT.get(backend, f"fusedstab on its {backend!r} backend")
    return ABOUT.get(name, "a peer library")


def unavailable(name: str, device: str) -> str | None:
    """Why fusedstab's backend ``name`` cannot serve ``device`` tensors in this process (None: it can).
    fusedstab's own answer (``fusedstab.backend.unavailable``) where it has one; else these rules."""
    fb = importlib.import_module("fusedstab.backend")
    if hasattr(fb, "unavailable"):
        try:
            return fb.unavailable(name, device)
        except Exception as e:  # e.g. a name this fusedstab does not know
            return f"{type(e).__name__}: {e}"
    available = name in fb.available_backends()
    if name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs a CUDA GPU, or TRITON_INTERPRET=1 set before triton is imported (for tests)"
    if (name, device) in (("cuda", "cpu"), ("cpu", "cuda")):
        return f"the {name} backend does not serve {device} tensors"
    if name in ("cuda", "cpu") and not available:
        return "needs fusedstab's C++ extension, which is not built or not loadable in this process"
    return None if available else "not available in this process"


def backends(device: str, planned: set[str], ran: set[str], only=None, unimplemented=frozenset()) -> list[dict]:
    """Every fusedstab backend: what it is, whether it ran in this run (``planned``: the providers of
    the run's cases, ``ran``: those with result rows), why not, and whether the automatic choice
    takes it on ``device`` (``default``). Names, reasons and the automatic order come from fusedstab
    itself where it says them, so new backends appear here without changes."""
    api = fusedstab_api()
    if isinstance(api, str):
        return [{"name": "*", "provider": "fusedstab-*", "available": False, "ran": False, "why": api,
                 "what": "fusedstab", "default": False}]
    fs = api[0]
    fb = importlib.import_module("fusedstab.backend")
    available = tuple(fs.available_backends())  # now: TRITON_INTERPRET may have changed since
    names = tuple(getattr(fb, "BACKENDS", ())) or available
    why_not = {name: unavailable(name, device) for name in dict.fromkeys((*names, *available))}
    auto = getattr(fb, "AUTO", {}).get(device, ())  # the automatic choice's order, where fusedstab says it
    default = next((n for n in auto if why_not.get(n, "?") is None), None)
    out = []
    for name, why in why_not.items():
        label = f"fusedstab-{name}"
        if label in ran:
            why = None
            if name == "triton" and device == "cpu":
                why = ("ran through the Triton interpreter (TRITON_INTERPRET=1), on the smallest shapes only: "
                       "a correctness check, its times mean nothing")
        elif why is None:
            if name == "triton" and device == "cpu":
                why = "the Triton interpreter is on, but no case was small enough for it"
            else:
                why = ("not selected (--providers)" if only and label not in only else
                       "has none of the timed ops yet" if label in unimplemented else
                       "every call failed: see the notes" if label in planned else "no case of this run has it")
        out.append({"name": name, "provider": label, "available": name in available, "ran": label in ran,
                    "default": name == default, "why": why, "what": about(label)})
    return out
