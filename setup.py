"""Build script. Builds the C++ CPU extension (csrc/) as fusedstab/_C*.so when torch is importable at
build time (``pip install --no-build-isolation``, ``python setup.py build_ext --inplace``) and
``FUSEDSTAB_BUILD_EXT`` is not 0, and the CUDA kernels (csrc/cuda) as fusedstab/_C_cuda*.so where that
torch is a CUDA build and nvcc is found (SASS for sm_90a, PTX of sm_80 for other GPUs). Otherwise
(e.g. pip's isolated build, where torch is absent) the package is pure Python and fusedstab.extension
compiles the same sources on first use. Either way csrc/ travels inside the package as fusedstab/_csrc,
so an installed copy can compile it too."""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPy(build_py):
    """Copy csrc/ into the package as _csrc/ (for installs that are not editable)."""

    def run(self):
        super().run()
        if not self.editable_mode:
            dst = Path(self.build_lib) / "fusedstab" / "_csrc"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(ROOT / "csrc", dst, ignore=shutil.ignore_patterns("*.md"))


def _extension_module():
    spec = importlib.util.spec_from_file_location("_fs_extension", ROOT / "fusedstab" / "extension.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ext_kwargs() -> dict:
    if os.environ.get("FUSEDSTAB_BUILD_EXT", "1") == "0" or importlib.util.find_spec("torch") is None:
        return {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    ext = _extension_module()
    root = ROOT / "csrc"
    rel = lambda paths: [str(p.relative_to(ROOT)) for p in paths]  # noqa: E731
    sources, flags = ext.cpu_sources(root), ext.cpu_flags()
    digests = {"_C": ext.build_hash(root, sources, flags)}
    modules = [CppExtension("fusedstab._C", rel(sources), include_dirs=[str(root)], extra_compile_args=flags,
                            extra_link_args=["-fopenmp"])]
    cuda_sources = ext.cuda_sources(root)
    if torch.version.cuda and CUDA_HOME and cuda_sources:
        cuda_flags = ext.cuda_flags(ext.SETUP_CUDA_ARCHS, ext.SETUP_CUDA_PTX)
        digests["_C_cuda"] = ext.build_hash(root, cuda_sources, cuda_flags)
        modules.append(CUDAExtension("fusedstab._C_cuda", rel(cuda_sources), include_dirs=[str(root)],
                                     extra_compile_args={"cxx": ext._CUDA_HOST_FLAGS, "nvcc": cuda_flags}))

    class Build(BuildExtension):
        def run(self):
            super().run()
            out = Path(self.get_ext_fullpath("fusedstab._C")).parent
            for name, digest in digests.items():  # the loader uses a library only if its hash matches
                (out / f"{name}.hash").write_text(digest + "\n")

    return {"ext_modules": modules, "cmdclass": {"build_ext": Build, "build_py": BuildPy}}


setup(**({"cmdclass": {"build_py": BuildPy}} | ext_kwargs()))
