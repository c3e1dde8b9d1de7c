"""Backend registry: which implementation serves an op call.

Backends: ``triton`` (Triton kernels; default on CUDA, on CPU only through the Triton interpreter),
``torch`` (the eager reference, always available), and later ``cuda`` / ``cpu`` (the C++ extension).
An op registers one implementation per backend plus an ``ok(*tensors)`` check; callers never name a
backend. The choice comes from ``use_backend(name)`` (innermost wins), else ``FUSEDSTAB_BACKEND``,
else automatic. An explicit choice that cannot serve a call raises ``BackendError``; the automatic
choice falls back along its preference list. Backward runs on the backend chosen when its forward
ran (eager mode), wherever ``backward()`` is called.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from typing import Callable

BACKENDS = ("triton", "cuda", "cpu", "torch")
# Automatic preference per device type: first available and able to serve the call wins.
_AUTO = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# Process-wide, like torch.backends flags: autograd runs CUDA backward on its own threads, which
# must see the choice too (fusedstab.autograd also re-applies the forward's choice in backward).
_stack: list = []
_impls: dict[str, dict[str, tuple[Callable, Callable]]] = {}
_warned: set = set()


class BackendError(RuntimeError):
    """An explicitly chosen backend cannot serve this call."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _installed(name: str) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        import torch

        return _triton_importable() and (torch.cuda.is_available() or triton_interpret())
    if name in ("cuda", "cpu"):
        return _extension_available(name)
    return False


@functools.lru_cache(None)
def _extension_available(name: str) -> bool:
    try:
        from . import _C  # the C++ extension loader; absent until the C++/CUDA issue lands
    except ImportError:
        return False
    return _C.available(name)


def available_backends() -> list[str]:
    """Backends that can serve calls in this process, in no particular order of preference."""
    out = []
    for name in BACKENDS:
        if _installed(name):
            out.append(name)
    return out


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fusedstab backend {name!r}; expected one of {BACKENDS}")
    return name


def get_backend() -> str | None:
    """The explicitly chosen backend (context manager, then env var), or None for automatic."""
    if _stack:
        return _stack[-1]
    env = os.environ.get("FUSEDSTAB_BACKEND", "").strip()
    return _check_name(env) if env and env != "auto" else None


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the enclosed ops on backend ``name`` (None or "auto": automatic choice)."""
    name = None if name in (None, "auto") else _check_name(name)
    _stack.append(name)
    try:
        yield
    finally:
        _stack.pop()


def register(op: str, backend: str, impl: Callable, ok: Callable | None = None) -> None:
    """Register ``impl`` for ``op`` on ``backend``; ``ok(*args)`` returns None or why it can't serve."""
    _impls.setdefault(op, {})[_check_name(backend)] = (impl, ok or (lambda *a: None))


def _why_not(op: str, backend: str, device_type: str, args) -> str | None:
    entry = _impls.get(op, {}).get(backend)
    if entry is None:
        return f"backend {backend!r} has no implementation of {op}"
    if not _installed(backend):
        return f"backend {backend!r} is not available in this process"
    if backend == "triton" and device_type == "cpu" and not triton_interpret():
        return "the triton backend runs CPU tensors only through the interpreter (TRITON_INTERPRET=1)"
    if backend == "cuda" and device_type != "cuda":
        return "the cuda backend needs CUDA tensors"
    if backend == "cpu" and device_type != "cpu":
        return "the cpu backend needs CPU tensors"
    return entry[1](*args)


def dispatch(op: str, device_type: str, *args):
    """Call the implementation of ``op`` chosen for tensors on ``device_type``."""
    chosen = get_backend()
    if chosen is not None:
        why = _why_not(op, chosen, device_type, args)
        if why is not None:
            raise BackendError(f"fusedstab backend {chosen!r} cannot run {op}: {why}")
        return _impls[op][chosen][0](*args)
    prefs = _AUTO.get(device_type, ("torch",))
    for i, backend in enumerate(prefs):
        why = _why_not(op, backend, device_type, args)
        if why is None:
            return _impls[op][backend][0](*args)
        if i == 0 and backend == "triton":
            key = (op, why)
            if key not in _warned:  # the user expected the fast path on CUDA: say once why not
                _warned.add(key)
                warnings.warn(f"fusedstab: {op} falls back from triton: {why}", stacklevel=3)
    raise BackendError(f"no fusedstab backend can run {op} on {device_type}")
