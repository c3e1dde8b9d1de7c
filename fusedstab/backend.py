"""Backend registry: which implementation serves an op call.

``TABLE`` lists the backends: what each is, the device types it serves and how its availability is
found. An op registers one implementation per backend plus an ``ok(*args)`` check; callers never
name a backend. The choice comes from ``use_backend(name)`` (innermost wins), else
``FUSEDSTAB_BACKEND``, else automatic (``AUTO``: the first backend of the device type's preference
list that can serve the call). An explicit choice that cannot serve a call raises ``BackendError``.
Backward runs on the backend chosen when its forward ran (eager mode), wherever ``backward()`` is
called.

Implementations are out-variants: ``impl(outs, *args)`` writes into the tuple of outputs that the
public op allocated (with the function its fake uses) and returns nothing.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Backend:
    name: str
    what: str
    device_types: tuple[str, ...]
    unavailable: Callable[[str], str | None]  # device type -> None if it can serve there, else why not


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_unavailable(device_type: str) -> str | None:
    import torch

    if not _triton_importable():
        return "triton is not installed"
    if device_type == "cpu" and not triton_interpret():
        return ("the triton backend runs CPU tensors only through the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported")
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _extension_unavailable(kind: str) -> Callable[[str], str | None]:
    def why(device_type: str) -> str | None:
        from . import extension

        return extension.load_cuda() if kind == "cuda" else extension.load()
    return why


TABLE = {b.name: b for b in (
    Backend("triton", "Triton kernels", ("cuda", "cpu"), _triton_unavailable),
    Backend("cuda", "C++/CUDA extension kernels", ("cuda",), _extension_unavailable("cuda")),
    Backend("cpu", "C++ CPU extension kernels", ("cpu",), _extension_unavailable("cpu")),
    Backend("torch", "the eager reference (fusedstab/reference.py)", ("cuda", "cpu"), lambda device_type: None),
)}
BACKENDS = tuple(TABLE)
# Automatic preference per device type: the first that can serve the call wins.
AUTO = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# Process-wide, like torch.backends flags: autograd runs CUDA backward on its own threads, which
# must see the choice too (fusedstab.autograd also re-applies the forward's choice in backward).
_stack: list = []
_impls: dict[str, dict[str, tuple[Callable, Callable]]] = {}
_warned: set = set()


class BackendError(RuntimeError):
    """An explicitly chosen backend cannot serve this call."""


def unavailable(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot serve tensors of ``device_type`` in this process (None: it can)."""
    b = TABLE[_check_name(name)]
    if device_type not in b.device_types:
        return f"the {name} backend does not serve {device_type} tensors"
    return b.unavailable(device_type)


def available_backends() -> list[str]:
    """Backends that can serve calls in this process (on some device type), in TABLE's order."""
    return [name for name, b in TABLE.items() if any(b.unavailable(d) is None for d in b.device_types)]


def _check_name(name: str) -> str:
    if name not in TABLE:
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
    """Register ``impl(outs, *args)`` for ``op`` on ``backend``; ``ok(*args)`` returns None or why it
    can't serve the call."""
    _impls.setdefault(op, {})[_check_name(backend)] = (impl, ok or (lambda *a: None))


def _why_not(op: str, backend: str, device_type: str, args) -> str | None:
    entry = _impls.get(op, {}).get(backend)
    if entry is None:
        return f"backend {backend!r} has no implementation of {op}"
    why = unavailable(backend, device_type)
    return why if why is not None else entry[1](*args)


def dispatch(op: str, device_type: str, outs: tuple, *args) -> None:
    """Run the implementation of ``op`` chosen for tensors on ``device_type``, writing into ``outs``."""
    chosen = get_backend()
    if chosen is not None:
        why = _why_not(op, chosen, device_type, args)
        if why is not None:
            raise BackendError(f"fusedstab backend {chosen!r} cannot run {op}: {why}")
        return _impls[op][chosen][0](outs, *args)
    prefs = AUTO.get(device_type, ("torch",))
    for i, name in enumerate(prefs):
        why = _why_not(op, name, device_type, args)
        if why is None:
            return _impls[op][name][0](outs, *args)
        if i == 0 and device_type == "cuda":  # the user expected the fast path on a GPU: say once why not
            key = (op, why)
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"fusedstab: {op} falls back from {name}: {why}", stacklevel=3)
    raise BackendError(f"no fusedstab backend can run {op} on {device_type}")


def cpp(op: str) -> Callable:
    """The implementation that calls the C++ kernel ``torch.ops.fusedstab_C.<op>(*args, *outs)``."""
    def impl(outs, *args):
        from . import extension

        getattr(extension.ops(), op)(*args, *outs)
    impl.__name__ = f"cpp_{op}"
    return impl
