"""The C++ extension (``csrc/``): the kernels of the ``cpu`` and ``cuda`` backends, registered as
``torch.ops.fusedstab_C.*``. Two libraries: the CPU one holds the schemas (``TORCH_LIBRARY``) and the
CPU kernels; the CUDA one (``csrc/cuda``: torch-free ``.cu`` kernels and launchers, torch glue in
``.cpp``) adds CUDA kernels to the same ops and is loaded after it, only where a CUDA device is.

Loaded lazily, on the first call that could use it, never at ``import fusedstab``:
- a library that ``setup.py`` built next to this file (torch importable at build time), if it was
  built from the sources present now (a hash of them is stored beside it);
- else compiled once with ``torch.utils.cpp_extension.load`` (ninja), into torch's extension cache
  under a name that carries the hash of the sources, the flags and the torch version, so that a
  stale build is never loaded;
- ``FUSEDSTAB_BUILD_EXT=0`` turns it off. A failed build never breaks fusedstab: one warning names
  the cause, and the other backends serve.

The CUDA library is built the same way (``setup.py`` where nvcc and a CUDA build of torch are present,
else a JIT build on first CUDA use, ``MAX_JOBS`` = the cores, one target arch: the device's). No CUDA
device: nothing is built and the ``cuda`` backend is simply absent; a device but no nvcc or a failed
build: one warning, and the ``triton`` / ``torch`` backends serve.
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
    """Hash of the sources, the headers they may include (csrc/cuda's only for the CUDA library, so
    that a CUDA edit does not rebuild the CPU library), the flags and the torch version."""
    import torch

    cuda = any(s.suffix == ".cu" for s in sources)
    headers = [p for p in (*root.rglob("*.h"), *root.rglob("*.cuh"))
               if cuda or "cuda" not in p.relative_to(root).parts]
    h = hashlib.sha256(f"{torch.__version__}|{sys.version_info[:2]}|{' '.join(flags)}".encode())
    for p in sorted({*sources, *headers}):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _prebuilt(digest: str, name: str = "_C") -> Path | None:
    stamp = _PKG / f"{name}.hash"
    libs = [p for p in sorted(_PKG.glob(f"{name}.*")) if p.suffix in (".so", ".pyd")]
    if libs and stamp.is_file() and stamp.read_text().strip() == digest:
        return libs[0]
    return None


def _jit(name: str, what: str, **kwargs) -> None:
    """Load the cached JIT build ``name`` (its name carries the hash of what built it), or compile it
    with torch.utils.cpp_extension.load, saying so once."""
    import torch
    import torch.utils.cpp_extension as cpp

    build_dir = Path(cpp._get_build_directory(name, False))
    # no "lock": no other process (a pytest-xdist worker) is building it right now, so the library
    # is whole; else cpp.load waits for that build and loads its result
    if (build_dir / f"{name}.so").is_file() and not (build_dir / "lock").exists():
        torch.ops.load_library(str(build_dir / f"{name}.so"))
        return
    print(f"fusedstab: compiling {what}, then cached in {build_dir}", file=sys.stderr, flush=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cpp.load(name=name, is_python_module=False, **kwargs)


@functools.lru_cache(None)
def load() -> str | None:  # the CPU library (the schemas and the cpu backend)
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
            _jit(f"{NAMESPACE}_{digest}", "the C++ CPU kernels (first use; about 1-3 minutes on 2 cores)",
                 sources=[str(s) for s in sources], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                 extra_include_paths=[str(root)])
    except Exception as e:  # a compiler error, no compiler, no ninja: the other backends serve
        why = f"the C++ extension failed to build or load: {type(e).__name__}: {str(e).strip()[-2000:]}"
        warnings.warn(f"fusedstab: {why}; the cpu backend is off in this process", stacklevel=2)
        return why
    return None


def available(kind: str) -> bool:
    """Whether the extension serves backend ``kind`` ("cpu" or "cuda")."""
    return (load() if kind == "cpu" else load_cuda()) is None


def ops():
    """``torch.ops.fusedstab_C`` (loads the extension first)."""
    import torch

    why = load()
    if why is not None:
        raise RuntimeError(f"fusedstab's C++ extension is not available: {why}")
    return getattr(torch.ops, NAMESPACE)


# ----------------------------------------------------------------------------- the CUDA library
def cuda_sources(root: Path) -> list[Path]:
    """The torch-free launchers (.cu, nvcc) and the torch glue (.cpp, host compiler) of csrc/cuda."""
    d = root / "cuda"
    return sorted(d.glob("*.cu")) + sorted(d.glob("*.cpp"))


def cuda_arch(capability: tuple[int, int]) -> str:
    """nvcc's name of a compute capability: "90a" on Hopper (its arch-specific target), else "86"."""
    major, minor = capability
    return f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def cuda_flags(archs: list[str], ptx: str | None = None) -> list[str]:
    """nvcc flags: SASS for each arch (plus PTX of ``ptx`` for later GPUs). No --use_fast_math: the
    kernels round as the Triton and CPU ones do. -lineinfo for compute-sanitizer's reports."""
    flags = ["-O3", "-DNDEBUG", "-std=c++17", "-lineinfo"]
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if ptx:
        flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


# setup.py's build (a wheel for any recent GPU): Hopper SASS, and PTX of sm_80 that the driver
# compiles for Ampere, Ada and later.
SETUP_CUDA_ARCHS, SETUP_CUDA_PTX = ["90a"], "80"
_CUDA_HOST_FLAGS = ["-O3", "-DNDEBUG"]


def _cuda_unbuildable() -> str | None:
    """Why this process cannot have the CUDA library at all (None: it may)."""
    import torch

    if torch.version.cuda is None:
        return "this build of torch has no CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@functools.lru_cache(None)
def load_cuda() -> str | None:
    """Load the CUDA library once (after the CPU one, which holds the schemas). Returns None when the
    CUDA kernels of ``torch.ops.fusedstab_C`` are ready, else why not. Builds nothing without a device."""
    if os.environ.get("FUSEDSTAB_BUILD_EXT", "1") == "0":
        return "turned off by FUSEDSTAB_BUILD_EXT=0"
    why = _cuda_unbuildable()
    if why is not None:
        return why
    import torch

    root = source_dir()
    if root is None or not cuda_sources(root):
        return "its CUDA sources (csrc/cuda) are not installed"
    why = load()
    if why is not None:
        return f"the C++ library that holds the op schemas is unavailable: {why}"
    sources = cuda_sources(root)
    try:
        lib = _prebuilt(build_hash(root, sources, cuda_flags(SETUP_CUDA_ARCHS, SETUP_CUDA_PTX)), "_C_cuda")
        if lib is not None:
            torch.ops.load_library(str(lib))
        else:
            from torch.utils.cpp_extension import CUDA_HOME

            if CUDA_HOME is None:
                raise RuntimeError("nvcc not found (set CUDA_HOME, or put nvcc on PATH)")
            flags = cuda_flags([cuda_arch(torch.cuda.get_device_capability())])
            _jit(f"{NAMESPACE}_cuda_{build_hash(root, sources, flags)}",
                 "the CUDA kernels (first CUDA use; about a minute on 16 cores)", sources=[str(s) for s in sources],
                 extra_cflags=_CUDA_HOST_FLAGS, extra_cuda_cflags=flags, extra_include_paths=[str(root)])
    except Exception as e:  # no nvcc, a compiler error: the triton and torch backends serve
        why = f"the CUDA kernels failed to build or load: {type(e).__name__}: {str(e).strip()[-2000:]}"
        warnings.warn(f"fusedstab: {why}; the cuda backend is off in this process", stacklevel=2)
        return why
    return None
