"""Provider sets shared by the op modules: eager torch, torch.compile, fusedstab backends, peers.

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
        skipped["compile"] = "torch.compile left out (--no-compile or --smoke)"
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
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    for name in backends:
        label = f"fusedstab-{name}"
        if (cfg.device, name) in (("cuda", "cpu"), ("cpu", "cuda")):
            continue
        if cfg.device == "cpu" and name == "triton" and not interpret:
            continue  # available for CUDA tensors only
        if cfg.device == "cpu" and name == "triton" and numel > INTERPRET_MAX_ELEMS:
            skipped[label] = f"Triton interpreter on CPU: only shapes up to {INTERPRET_MAX_ELEMS} elements"
            continue
        if cfg.device == "cpu" and name == "triton" and (programs or 0) > INTERPRET_MAX_PROGRAMS:
            skipped[label] = f"Triton interpreter on CPU: only calls of up to {INTERPRET_MAX_PROGRAMS} programs"
            continue
        provs[label] = Provider(make_fn(ff), functools.partial(fs.use_backend, name))
    if cfg.device == "cpu" and not interpret:
        skipped["fusedstab-triton"] = "on CPU only through the interpreter: TRITON_INTERPRET=1 before triton import"
    return provs, skipped


def liger(module: str, attr: str, cfg: Config) -> tuple[object | None, str | None]:
    """A liger-kernel autograd Function, or None and why not (it is CUDA-only)."""
    if cfg.device != "cuda":
        return None, "liger-kernel runs on CUDA only"
    try:
        return getattr(importlib.import_module(f"liger_kernel.ops.{module}"), attr), None
    except Exception as e:
        return None, f"liger-kernel not importable: {type(e).__name__}: {e}"
