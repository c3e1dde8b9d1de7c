"""The CUDA extension without a GPU: the committed ptxas table (csrc/cuda/ptxas_sm90a.md, made by
csrc/cuda/check.py, which CI runs with nvcc) is current and shows no spill; check.py's parsing; the
loader and the backend registry when the CUDA library cannot load (clear reasons, the other backends
serve, one warning); the launchers' host logic (multi-tensor launch plans, LayerNorm row
configurations, bias + Leaky ReLU grids, GroupNorm / BatchNorm plans) compiled with the host compiler and checked."""
import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch

import fusedstab
from fusedstab import backend, extension

ROOT = Path(__file__).resolve().parent.parent


def _check_module():
    spec = importlib.util.spec_from_file_location("_fs_cuda_check", ROOT / "csrc" / "cuda" / "check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check = _check_module()


def _table():
    text = check.TABLE.read_text()
    digest = re.search(r"sources (\w+)", text).group(1)
    version = re.search(r"\((release [^)]+)\)", text).group(1)
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "`" in line]
    return text, digest, version, [[c.strip().strip("`") for c in r] for r in rows]


def test_ptxas_table_is_current():
    """Regenerate with `python csrc/cuda/check.py --write` (needs nvcc) after changing a kernel."""
    _, digest, version, _ = _table()
    assert digest == check.sources_hash(version), (
        "csrc/cuda/ptxas_sm90a.md was made from other sources: run `python csrc/cuda/check.py --write`")


def test_ptxas_table_covers_every_kernel_file_and_shows_no_spill():
    _, _, _, rows = _table()
    files = {r[0] for r in rows}
    kernel_files = {p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu") if "<<<" in p.read_text()}
    assert kernel_files <= files, f"no ptxas rows for {kernel_files - files}"
    rows = [{"name": r[1], "spill_st": int(r[5]), "spill_ld": int(r[6])} for r in rows]
    assert not check.spills(rows)


PTXAS = """ptxas info    : Compiling entry function '_ZN9fusedstab4cuda3blr10fwd_kernelIffEEvPKT_' for 'sm_90a'
ptxas info    : Function properties for _ZN9fusedstab4cuda3blr10fwd_kernelIffEEvPKT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z3bigPf' for 'sm_90a'
ptxas info    : Function properties for _Z3bigPf
    48 bytes stack frame, 44 bytes spill stores, 40 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 384 bytes cmem[0]
"""


def test_parse_ptxas_finds_spills():
    rows = check.parse_ptxas(PTXAS)
    assert [(r["regs"], r["smem"], r["stack"], r["spill_st"], r["spill_ld"]) for r in rows] == [
        (40, 0, 0, 0, 0), (255, 4096, 48, 44, 40)]
    for r in rows:
        r["name"] = r["mangled"]
    assert check.spills(rows) == ["_Z3bigPf"]


def test_cuda_flags_one_arch():
    assert extension.cuda_arch((9, 0)) == "90a" and extension.cuda_arch((8, 6)) == "86"
    flags = extension.cuda_flags(["90a"])
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags and "--use_fast_math" not in flags
    assert sum("-gencode" in f for f in extension.cuda_flags(["90a"], "80")) == 2


def test_cpu_library_hash_ignores_cuda_sources(tmp_path):
    """A CUDA edit must not rebuild the CPU library (minutes), and must rebuild the CUDA one."""
    (tmp_path / "cuda" / "kernels").mkdir(parents=True)
    (tmp_path / "registration.cpp").write_text("// schemas\n")
    (tmp_path / "cuda" / "x.cu").write_text("// kernel\n")
    cpu = [tmp_path / "registration.cpp"]
    cuda = extension.cuda_sources(tmp_path)
    before = extension.build_hash(tmp_path, cpu, []), extension.build_hash(tmp_path, cuda, [])
    (tmp_path / "cuda" / "kernels" / "k.cuh").write_text("// changed\n")
    after = extension.build_hash(tmp_path, cpu, []), extension.build_hash(tmp_path, cuda, [])
    assert before[0] == after[0] and before[1] != after[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA library may load here")
def test_cuda_backend_absent_without_a_gpu():
    why = backend.unavailable("cuda", "cuda")
    assert why in ("no CUDA device", "this build of torch has no CUDA", "turned off by FUSEDSTAB_BUILD_EXT=0")
    # available_backends() would list it only if some device type it serves had no reason (asked
    # this way, the CPU library is not built just for this test)
    assert all(backend.TABLE["cuda"].unavailable(d) for d in backend.TABLE["cuda"].device_types)
    assert backend.unavailable("cuda", "cpu") == "the cuda backend does not serve cpu tensors"
    x = torch.randn(3, 8)
    with fusedstab.use_backend("cuda"), pytest.raises(backend.BackendError, match="backend .cuda. cannot run"):
        fusedstab.functional.bias_leaky_relu(x, torch.randn(8))


def test_load_cuda_without_nvcc_warns_once(monkeypatch):
    """A GPU but no nvcc (or a failed build): one warning with the cause, then a reason, no raise."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(extension, "_cuda_unbuildable", lambda: None)
    monkeypatch.setattr(extension, "load", lambda: None)  # the CPU library (schemas) is there
    monkeypatch.setattr(extension, "_prebuilt", lambda *a: None)
    monkeypatch.setattr(cpp, "CUDA_HOME", None)
    monkeypatch.setenv("FUSEDSTAB_BUILD_EXT", "1")
    extension.load_cuda.cache_clear()
    try:
        with pytest.warns(UserWarning, match="nvcc not found.*cuda backend is off"):
            why = extension.load_cuda()
        assert "nvcc not found" in why
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert extension.load_cuda() == why  # cached: no second warning, no second try
    finally:
        extension.load_cuda.cache_clear()


def test_load_cuda_needs_the_schema_library(monkeypatch):
    monkeypatch.setattr(extension, "_cuda_unbuildable", lambda: None)
    monkeypatch.setattr(extension, "load", lambda: "turned off by FUSEDSTAB_BUILD_EXT=0")
    extension.load_cuda.cache_clear()
    try:
        assert "holds the op schemas is unavailable" in extension.load_cuda()
    finally:
        extension.load_cuda.cache_clear()


# =============================================================================== host-side logic
CHUNK = 32768  # csrc/cuda/multi_tensor_plan.h's kChunk


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """tests/cuda_host/host_main.cpp (the launchers' host logic: csrc/cuda/multi_tensor_plan.h,
    launch_config.h) built with the host compiler (about a second); returns a query function."""
    import shutil
    import subprocess

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path_factory.mktemp("host") / "host"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "cuda_host" / "host_main.cpp"),
                    "-o", str(exe)], check=True)

    def query(text: str) -> list[str]:
        return subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True).stdout.splitlines()
    return query


def test_reduce_kinds(host):
    assert host("kinds") == ["kinds 1 2 5 3 4 0"]  # square, abs, nonzero, max, min, pow: the Triton codes


@pytest.mark.parametrize("cap,sizes", [
    (64, [1]), (64, [0, 0, 5]), (64, [CHUNK, CHUNK + 1, 3 * CHUNK - 1]),
    (64, [768] * 148), (1024, [1000 + 37 * i for i in range(1000)]), (1024, [2**33, 7, 0, 2**31 + 3]),
])
def test_multi_tensor_plan_covers_every_chunk_once(host, cap, sizes):
    """Launches take consecutive tensors, at most cap each; their chunks tile the partial buffer
    [0, total) with no gap or overlap; each tensor has ceil(numel / CHUNK) chunks (an empty one none)."""
    out = host(f"plan {cap} {len(sizes)} " + " ".join(map(str, sizes)))
    launches = [tuple(map(int, line.split())) for line in out if line[0].isdigit()]
    total = int(next(line for line in out if line.startswith("total")).split()[1])
    chunks = [-(-s // CHUNK) for s in sizes]
    assert total == sum(chunks)
    nxt_tensor, nxt_chunk = 0, 0
    for first, count, base, n in launches:
        assert first == nxt_tensor and 1 <= count <= cap and base == nxt_chunk
        assert n == sum(chunks[first:first + count]) < 2**31
        nxt_tensor, nxt_chunk = first + count, base + n
    assert nxt_tensor == len(sizes) and nxt_chunk == total
    assert len(launches) == -(-len(sizes) // cap)  # no needless split


# (max groups, max threads per row, min threads a block) of csrc/cuda/layer_norm.cu: forward fp32/16-bit
# and fp64, backward (512-thread blocks: the persistent grid) fp32/16-bit and fp64.
LN_CONFIGS = {"fwd": (4, 512, 128), "fwd64": (2, 512, 128), "bwd": (2, 512, 512), "bwd64": (1, 512, 512)}
LN_N = sorted({*range(1, 300), *(2**k + d for k in range(8, 18) for d in (-9, -8, -1, 0, 1, 7, 8, 9)),
               768, 1000, 1001, 3136, 5003, 12288, 50257})


@pytest.mark.parametrize("kind", LN_CONFIGS)
def test_layer_norm_row_config(host, kind):
    """Every row length gets threads that cover it exactly once: tpr a power of two, tpr x groups x 8
    >= N with no whole group of threads idle, groups a power of two within the register budget, a
    block a whole number of rows (<= 512 threads, the kernels' launch bounds); longer rows, and only
    those, take the long kernels."""
    maxg, maxtpr, mint = LN_CONFIGS[kind]
    out = host(f"ln {maxg} {maxtpr} {mint} {len(LN_N)} " + " ".join(map(str, LN_N)))
    for line in out:
        N, long_rows, tpr, groups, threads = map(int, line.split())
        n8 = -(-N // 8)
        assert bool(long_rows) == (n8 > maxtpr * maxg), N
        if long_rows:
            assert threads == 512
            continue
        assert tpr & (tpr - 1) == 0 and groups & (groups - 1) == 0 and groups <= maxg, N
        assert tpr * groups >= n8 and (groups == 1 or tpr * groups // 2 < n8), N  # covers, no idle half
        assert tpr == 1 or tpr * maxg // 2 < n8, N  # no more threads than the register budget needs
        assert threads % tpr == 0 and threads == max(tpr, mint) and threads <= 512, N


@pytest.mark.parametrize("R,L", [(1, 1), (3, 5), (37, 768), (64, 1001), (8, 49), (2**20, 8), (2**31 // 4096 + 3, 4096),
                                 (1, 2**34), (16384, 3136)])
@pytest.mark.parametrize("per_sm", [4, 8])
def test_bias_leaky_relu_grid(host, R, L, per_sm):
    """bx threads (a power of two <= 32) x by rows make a 256-thread block; the column tiles cover the
    row's 8-column groups; the row slices stay within grid.y's 65535 and 2^31 - 1 tiles within grid.x."""
    bx, by, tiles, slices = map(int, host(f"blr {per_sm} 132 {R} {L}")[0].split())
    L8 = -(-L // 8)
    assert bx & (bx - 1) == 0 and bx <= 32 and bx * by == 256 and (bx == 32 or bx >= L8)
    assert tiles * bx >= L8 > (tiles - 1) * bx and tiles < 2**31
    assert 1 <= slices <= min(65535, -(-R // by))


def test_cuda_sources_have_distinct_stems():
    """setup.py's build names an object after its source's stem in the source's folder: <op>.cu and
    <op>.cpp would both become <op>.o (the glue is <op>_glue.cpp)."""
    sources = extension.cuda_sources(ROOT / "csrc")
    stems = [s.with_suffix("") for s in sources]
    assert len(set(stems)) == len(stems), sorted(stems)
    assert all(s.name.endswith("_glue.cpp") for s in sources if s.suffix == ".cpp")


# (N, C, S, G): batch-1 diffusion maps, odd sizes, (N, C) input, more rows than grid.x in one plan
CN_SHAPES = [(1, 512, 64 * 64, 32), (1, 128, 256 * 256, 32), (2, 2048, 16 * 16, 32), (7, 6, 13, 3), (1, 1, 1, 1),
             (4096, 1000, 1, 10), (3, 320, 97, 32), (2**20, 4, 2**11, 2)]


@pytest.mark.parametrize("N,C,S,G", CN_SHAPES)
def test_channel_norm_plans(host, N, C, S, G):
    """csrc/cuda/channel_norm_plan.h: each plan's tile is 256 threads of bx (a power of two <= 32)
    lanes x 8 elements covering a row (or bx = 32); its tiles cover the (rows, columns) it walks; the
    splits J are within 1..tiles; grid.x within 2^31 - 1 (the kernels stride past it); batch-1 maps
    give an H100's 132 SMs work; the channels-last reductions aim at 2 blocks per SM, not 8 (fewer
    partials); the workspaces hold every partial."""
    sms = 132
    out = {line.split()[0]: list(map(int, line.split()[1:])) for line in host(f"cn {sms} {N} {C} {S} {G}")}
    walks = {  # kind: (segments, rows, row length) it tiles
        "gn_stats_nchw": (1, N * G, C // G * S), "gn_bwd_nchw": (1, N * C, S), "bn_nchw": (C, N, S),
        "elem_gn_nchw": (1, N * C, S), "elem_bn_nchw": (1, N * C, S),
        "gn_stats_cl": (N, S, C), "gn_bwd_cl": (N, S, C), "bn_cl": (1, N * S, C),
        "elem_gn_cl": (N, S, C), "elem_bn_cl": (1, N * S, C)}
    for kind, (nseg, rows, length) in walks.items():
        bx, by, rt, ct, J, items, grid = out[kind]
        assert bx & (bx - 1) == 0 and bx <= 32 and bx * by == 256 and (bx == 32 or bx * 8 >= length), kind
        assert rt * by >= rows > (rt - 1) * by and ct * bx * 8 >= length > (ct - 1) * bx * 8, kind
        splits = rt * ct if kind == "bn_nchw" else rt if kind.endswith("_cl") else ct
        assert 1 <= J <= splits, kind
        outputs = nseg * ct if kind.endswith("_cl") else C if kind == "bn_nchw" else rt  # each split J ways
        assert items == outputs * J, kind
        assert grid == min(items, 2**31 - 1), kind
        per_sm = 2 if kind in ("gn_stats_cl", "gn_bwd_cl", "bn_cl") else 8
        assert J == min(splits, max(1, -(-per_sm * sms // outputs))), kind
        if N == 1 and C * S >= 2**16:
            assert items >= sms, kind  # batch 1 fills the GPU
    J = {k: v[4] for k, v in out.items() if len(v) == 7}
    for cl, sfx in ((False, "_nchw"), (True, "_cl")):
        gn_fwd, gn_bwd, bn_stats, bn_bwd = out["ws" + sfx]
        assert gn_fwd == 24 * N * J["gn_stats" + sfx] * (C if cl else G)
        assert gn_bwd == 4 * (2 * N * J["gn_bwd" + sfx] * C + 2 * N * G)
        assert bn_stats == 24 * J["bn" + sfx] * C and bn_bwd == 4 * 2 * J["bn" + sfx] * C
