"""Build script. Builds the C++ CPU extension (csrc/) as fusedstab/_C*.so when torch is importable at
build time (``pip install --no-build-isolation``, ``python setup.py build_ext --inplace``) and
``FUSEDSTAB_BUILD_EXT`` is not 0. Otherwise (e.g. pip's isolated build, where torch is absent) the
package is pure Python and fusedstab.extension compiles the same sources on first use. Either way
csrc/ travels inside the package as fusedstab/_csrc, so an installed copy can compile it too."""
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
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = _extension_module()
    root = ROOT / "csrc"
    sources, flags = ext.cpu_sources(root), ext.cpu_flags()
    digest = ext.build_hash(root, sources, flags)

    class Build(BuildExtension):
        def run(self):
            super().run()
            out = Path(self.get_ext_fullpath("fusedstab._C")).parent
            (out / "_C.hash").write_text(digest + "\n")  # the loader uses the library only if this matches

    module = CppExtension("fusedstab._C", [str(s.relative_to(ROOT)) for s in sources],
                          include_dirs=[str(root)], extra_compile_args=flags, extra_link_args=["-fopenmp"])
    return {"ext_modules": [module], "cmdclass": {"build_ext": Build, "build_py": BuildPy}}


setup(**({"cmdclass": {"build_py": BuildPy}} | ext_kwargs()))
