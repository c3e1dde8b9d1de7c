"""The CUDA kernels' CPU-side check (CI has no GPU): compile every csrc/cuda/*.cu for sm_90a with
``-Xptxas -v``, tabulate each kernel's registers, shared memory, stack and spills, and syntax-check
the torch glue (csrc/cuda/*_glue.cpp) against the installed (CPU) torch's headers.

    python csrc/cuda/check.py           # check: fails on a compile error, a spill, or a stale table
    python csrc/cuda/check.py --write   # (re)write the table after changing a kernel

The table (csrc/cuda/ptxas_sm90a.md, cited by benchmarks/NOTES.md) starts with a hash of the sources
it was made from; tests/test_cuda_build.py checks that hash and the spills without needing nvcc.
nvcc: $CUDA_HOME/bin, PATH, or the pip layout (``pip install "cuda-toolkit[nvcc,cccl,cudart,crt,nvvm]
==13.0.2"`` puts it in site-packages/nvidia/cu13/bin). The flags are those of the JIT build
(fusedstab.extension.cuda_flags) plus the ones torch's extension build adds (no implicit half /
bfloat16 conversions).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent          # csrc/cuda
CSRC = HERE.parent
ROOT = CSRC.parent
TABLE = HERE / "ptxas_sm90a.md"
ARCH = "90a"
# Kernels allowed to spill (a regex on the demangled name). Empty: no kernel may spill.
MAY_SPILL: list[str] = []
# What torch's cpp_extension adds to every nvcc call (COMMON_NVCC_FLAGS): the kernels must build there.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]


def _extension():
    spec = importlib.util.spec_from_file_location("_fs_extension", ROOT / "fusedstab" / "extension.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def find_nvcc() -> Path | None:
    cands = [Path(os.environ[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if shutil.which("nvcc"):
        cands.append(Path(shutil.which("nvcc")))
    spec = importlib.util.find_spec("nvidia")  # the pip layout: site-packages/nvidia/cu13/bin/nvcc
    for d in (spec.submodule_search_locations or []) if spec else []:
        cands += sorted(Path(d).glob("cu*/bin/nvcc"), reverse=True)
    return next((c for c in cands if c.is_file()), None)


def cuda_include(nvcc: Path) -> Path:
    """The CUDA runtime headers of this nvcc (its dry run names them; nvcc may be a wrapper script)."""
    out = subprocess.run([str(nvcc), "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    for d in re.findall(r'-I"?([^"\s]+)', "".join(re.findall(r"INCLUDES=(.*)", out))):
        if (Path(d) / "cuda_runtime_api.h").is_file():
            return Path(d)
    return nvcc.parent.parent / "include"


def sources_hash(nvcc_version: str) -> str:
    """The .cu/.cuh/.h files of csrc/cuda, the shared numerics header, the flags and nvcc's version."""
    h = hashlib.sha256(" ".join(nvcc_flags(include=False) + [nvcc_version]).encode())
    files = sorted([*HERE.glob("*.cu"), *HERE.rglob("*.cuh"), *HERE.glob("*.h"), CSRC / "common" / "numerics.h"])
    for p in files:
        h.update(str(p.relative_to(CSRC)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def nvcc_flags(include: bool = True) -> list[str]:
    """The JIT build's flags for sm_90a, torch's, and (include) -I csrc: an absolute path, which the
    table's hash leaves out (CI checks out the repository elsewhere)."""
    return _extension().cuda_flags([ARCH]) + TORCH_NVCC_FLAGS + ([f"-I{CSRC}"] if include else [])


def _demangle(names: list[str]) -> dict[str, str]:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(name: str) -> str:
    """A readable kernel name: no namespaces, no 'void', short dtype names."""
    name = re.sub(r"^void\s+", "", name)
    name = re.sub(r"fusedstab::cuda::", "", name)
    for a, b in (("__nv_bfloat16", "bf16"), ("__half", "f16"), ("float", "f32"), ("double", "f64"),
                 ("(anonymous namespace)::", "")):
        name = name.replace(a, b)
    return re.sub(r"\(.*\)$", "", name)  # drop the parameter list


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_\w+'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(text: str) -> list[dict]:
    """One row per kernel (entry function) of ptxas -v's report."""
    rows, cur = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            cur = {"mangled": m.group(1), "stack": 0, "spill_st": 0, "spill_ld": 0, "regs": 0, "smem": 0}
            rows.append(cur)
        elif cur is not None and (m := _PROPS.search(line)):
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        elif cur is not None and (m := _USED.search(line)):
            cur["regs"], cur["smem"] = int(m.group(1)), int(m.group(2) or 0)
    return rows


def compile_cu(nvcc: Path, src: Path, outdir: Path) -> tuple[Path, int, str]:
    cmd = [str(nvcc), *nvcc_flags(), "-Xptxas", "-v", "-c", str(src), "-o", str(outdir / (src.stem + ".o"))]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return src, p.returncode, p.stdout + p.stderr


def syntax_check(src: Path, cuda_include: Path) -> tuple[Path, int, str]:
    """The glue against the CPU torch's headers: c10/cuda headers compile with
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE and the CUDA runtime headers of the nvcc install."""
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-unused-function", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           *(f"-I{p}" for p in include_paths()), f"-I{cuda_include}", f"-I{CSRC}", str(src)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return src, p.returncode, p.stdout + p.stderr


def render(rows: list[dict], digest: str, nvcc_version: str) -> str:
    lines = [f"<!-- generated by csrc/cuda/check.py --write; sources {digest} -->",
             f"# CUDA kernels: ptxas -v for sm_{ARCH} ({nvcc_version})", "",
             "Registers per thread, static shared memory, stack frame and spills (bytes) of every kernel, "
             "as `python csrc/cuda/check.py` compiles them (the JIT build's flags). No kernel may spill "
             "(check.py's MAY_SPILL lists exceptions: none).", "",
             "| file | kernel | regs | smem | stack | spill st | spill ld |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['file']} | `{r['name']}` | {r['regs']} | {r['smem']} | {r['stack']} | "
                     f"{r['spill_st']} | {r['spill_ld']} |")
    return "\n".join(lines) + "\n"


def spills(rows: list[dict]) -> list[str]:
    return [r["name"] for r in rows if (r["spill_st"] or r["spill_ld"])
            and not any(re.search(p, r["name"]) for p in MAY_SPILL)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"write {TABLE.relative_to(ROOT)}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-glue", action="store_true", help="skip the glue syntax check")
    args = ap.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("check.py: nvcc not found (CUDA_HOME, PATH, or pip install "
              "\"cuda-toolkit[nvcc,cccl,cudart,crt,nvvm]==13.0.2\")", file=sys.stderr)
        return 2
    version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    version = re.search(r"release [\d.]+, V[\d.]+", version).group(0)
    cu = sorted(HERE.glob("*.cu"))
    glue = [] if args.no_glue else sorted(HERE.glob("*.cpp"))
    failed = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        jobs = [pool.submit(compile_cu, nvcc, s, Path(tmp)) for s in cu]
        jobs += [pool.submit(syntax_check, s, cuda_include(nvcc)) for s in glue]
        results = [j.result() for j in jobs]
    rows = []
    for src, rc, out in results:
        what = "nvcc" if src.suffix == ".cu" else "glue syntax check"
        if rc != 0:
            failed.append(f"{src.relative_to(ROOT)} ({what})")
            print(f"== {src.relative_to(ROOT)}: {what} failed\n{out}", file=sys.stderr)
        elif src.suffix == ".cu":
            got = parse_ptxas(out)
            for r in got:
                r["file"] = src.name
            rows += got
    names = _demangle([r["mangled"] for r in rows])
    for r in rows:
        r["name"] = _short(names[r["mangled"]])
    rows.sort(key=lambda r: (r["file"], r["name"]))
    print(f"check.py: {len(cu)} .cu files, {len(rows)} kernels, {len(glue)} glue files checked ({version})")
    if failed:
        print("check.py: FAILED: " + ", ".join(failed), file=sys.stderr)
        return 1
    bad = spills(rows)
    if bad:
        print("check.py: FAILED: kernels that spill registers: " + ", ".join(bad), file=sys.stderr)
        return 1
    text = render(rows, sources_hash(version), version)
    if args.write:
        TABLE.write_text(text)
        print(f"check.py: wrote {TABLE.relative_to(ROOT)}")
    elif not TABLE.is_file() or TABLE.read_text() != text:
        print(f"check.py: FAILED: {TABLE.relative_to(ROOT)} is stale; run `python csrc/cuda/check.py --write` "
              "and commit it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
