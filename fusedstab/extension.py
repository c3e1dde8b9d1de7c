"""The C++ extension (``csrc/``): the kernels of the ``cpu`` backend (and later ``cuda``), registered as
``torch.ops.fusedstab_C.*``.

Loaded lazily, on the first call that could use it, never at ``import fusedstab``:
- a library that ``setup.py`` built next to this file (torch importable at build time), if it was
  built from the sources present now (a hash of them is stored beside it);
- else compiled once with ``torch.utils.cpp_extension.load`` (ninja), into torch's extension cache
  under a name that carries the hash of the sources, the flags and the torch version, so that a
  stale build is never loaded;
- ``FUSEDSTAB_BUILD_EXT=0`` turns it off. A failed build never breaks fusedstab: one warning names
  the cause, and the other backends serve.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

NAMESPACE = "fusedstab_C"
_PKG = Path(__file__).resolve().parent


def source_dir() -> Path | None:
    """csrc/ of a source checkout (editable install), or the copy setup.py puts in the package."""
    for d in (_PKG.parent / "csrc", _PKG / "_csrc"):
        if (d / "registration.cpp").is_file():
            return d
    return None


def cpu_sources(root: Path) -> list[Path]:
    return [root / "registration.cpp", *sorted((root / "cpu").glob("*.cpp"))]


def cpu_flags() -> list[str]:
    """-O3 without -g (debug info more than doubles the compile time); OpenMP, which at::parallel_for
    needs at compile time; AVX2 for at::vec::Vectorized where torch itself runs AVX2 or better (the
    build runs on the machine that uses it)."""
    import torch

    flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def build_hash(root: Path, sources: list[Path], flags: list[str]) -> str:
    """Hash of every source and header under root, the flags and the torch version."""
    import torch

    h = hashlib.sha256(f"{torch.__version__}|{sys.version_info[:2]}|{' '.join(flags)}".encode())
    for p in sorted({*sources, *root.rglob("*.h"), *root.rglob("*.cuh")}):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _prebuilt(digest: str) -> Path | None:
    stamp = _PKG / "_C.hash"
    libs = sorted(_PKG.glob("_C*.so")) + sorted(_PKG.glob("_C*.pyd"))
    if libs and stamp.is_file() and stamp.read_text().strip() == digest:
        return libs[0]
    return None


def _jit(sources: list[Path], flags: list[str], root: Path, digest: str) -> None:
    import torch.utils.cpp_extension as cpp

    print(f"fusedstab: compiling the C++ CPU kernels (first use; about 2-5 minutes on 2 cores, then cached "
          f"in {cpp._get_build_directory(f'{NAMESPACE}_{digest}', False)})", file=sys.stderr, flush=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cpp.load(name=f"{NAMESPACE}_{digest}", sources=[str(s) for s in sources], extra_cflags=flags,
             extra_ldflags=["-fopenmp"], extra_include_paths=[str(root)], is_python_module=False)


@functools.lru_cache(None)
def load() -> str | None:
    """Load the extension once. Returns None when ``torch.ops.fusedstab_C`` is ready, else why not."""
    if os.environ.get("FUSEDSTAB_BUILD_EXT", "1") == "0":
        return "turned off by FUSEDSTAB_BUILD_EXT=0"
    import torch

    root = source_dir()
    if root is None:
        return "its C++ sources (csrc/) are not installed"
    sources, flags = cpu_sources(root), cpu_flags()
    digest = build_hash(root, sources, flags)
    try:
        lib = _prebuilt(digest)
        if lib is not None:
            torch.ops.load_library(str(lib))
        else:
            _jit(sources, flags, root, digest)
    except Exception as e:  # a compiler error, no compiler, no ninja: the other backends serve
        why = f"the C++ extension failed to build or load: {type(e).__name__}: {str(e).strip()[-2000:]}"
        warnings.warn(f"fusedstab: {why}; the cpu backend is off in this process", stacklevel=2)
        return why
    return None


def available(kind: str) -> bool:
    """Whether the extension serves backend ``kind`` ("cpu"; "cuda" arrives with the CUDA kernels)."""
    return kind == "cpu" and load() is None


def ops():
    """``torch.ops.fusedstab_C`` (loads the extension first)."""
    import torch

    why = load()
    if why is not None:
        raise RuntimeError(f"fusedstab's C++ extension is not available: {why}")
    return getattr(torch.ops, NAMESPACE)
