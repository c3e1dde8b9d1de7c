"""The benchmark harness end to end: `python -m fusedstab.bench --tiny` in a subprocess (one tiny shape
per op, every mode, one call per provider, no torch.compile, no figures: tests/test_bench_report.py
checks those), then its JSON (the schema), its text and its progress lines are checked.

On CPU the Triton interpreter is left off here (it would triple the time): the harness's path for a
fusedstab backend is the same for every backend, the Triton kernels have their own tests, and the
GPU variant runs fusedstab-triton for real."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusedstab.bench import MODES, OPS
from fusedstab.bench import bias_leaky_relu as bias_bench
from fusedstab.bench import clip_grad_norm as clip_bench
from fusedstab.bench import linear_leaky_relu as linear_bench
from fusedstab.bench.layer_norm import bytes_model
from fusedstab.bench.runner import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = {"schema", "meta", "copy_bandwidth", "matmul_peak", "providers", "backends", "ops", "cases", "rows",
            "notes", "elapsed_s", "estimate_s"}
META_KEYS = {"date", "device", "device_name", "dtype", "python", "torch", "triton", "platform", "argv", "quick",
             "tiny", "compile", "torch_threads", "git_commit", "git_dirty"}
ROW_KEYS = {"op", "case", "desc", "mode", "provider", "dtype", "ms", "bytes", "gbps", "pct_copy",
            "speedup_vs_eager", "speedup_vs_compile", "max_rel_err"}
SHAPE_KEYS = {"layer_norm": {"M", "N"}, "rms_norm": {"M", "N"}, "add_layer_norm": {"M", "N"},
              "clip_grad_norm": {"model", "tensors", "numel"},
              "bias_leaky_relu": {"shape", "dim", "layout", "numel"},
              "linear_leaky_relu": {"M", "K", "N", "tflops", "pct_matmul"},
              "group_norm": {"shape", "groups", "layout", "act"},
              "batch_norm": {"shape", "layout", "act"},
              "attention": {"B", "H", "L", "E", "causal", "tflops", "pct_matmul"},
              "train_step": {"model", "batch", "params", "tflops"}}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bench_tiny(tmp_path, device):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_WAIT_POLICY": "passive"}  # set: no re-exec to set it
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it on CPU
    p = subprocess.run([sys.executable, "-m", "fusedstab.bench", "--tiny", "--plot", "none", "--device", device,
                        "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # progress: the first line says what runs and how long it takes; then a line per row
    # (lines of fusedstab itself, e.g. "fusedstab: compiling the C++ CPU kernels", may come first)
    first = next(line for line in p.stderr.splitlines() if not line.startswith("fusedstab: "))
    assert first.startswith("fusedstab.bench: ") and f"timings of {len(OPS)} ops" in first and "about" in first, first
    assert "[1/" in p.stderr and "copy bandwidth" in p.stderr
    (js,) = tmp_path.glob("*.json")
    assert {f.name for f in tmp_path.iterdir()} == {js.name, js.stem + ".txt", js.stem + ".md"}  # --plot none
    assert (tmp_path / (js.stem + ".txt")).read_text().startswith(p.stdout.splitlines()[0])
    assert p.stdout.splitlines()[-1].startswith("wrote: ")  # benchmarks/gpu_run.sh reads this line

    res = json.loads(js.read_text())
    assert set(res) == TOP_KEYS and res["schema"] == SCHEMA
    assert META_KEYS <= set(res["meta"]) and res["meta"]["tiny"] is True and res["meta"]["device"] == device
    for k in ("device_name", "torch", "triton", "python", "date", "dtype"):
        assert res["meta"][k], k
    assert res["copy_bandwidth"]["gbps"] > 0 and res["matmul_peak"]["tflops"] > 0
    rows = res["rows"]
    assert {r["op"] for r in rows} == set(OPS) == set(res["ops"])
    assert {r["mode"] for r in rows} == set(MODES)
    provs = {r["provider"] for r in rows}
    assert provs <= set(res["providers"]) and all(res["providers"][p] for p in provs)  # each explained
    assert "fusedstab-torch" in provs
    assert "matmul" in provs and "eager-loop" in provs  # the yardsticks
    backends = {b["name"]: b for b in res["backends"]}
    assert backends["torch"]["ran"]
    assert all(b["ran"] or b["why"] for b in backends.values())
    if device == "cuda":
        assert "fusedstab-triton" in provs and backends["triton"]["ran"]
    else:
        assert not backends["triton"]["ran"] and "TRITON_INTERPRET" in backends["triton"]["why"]
        assert "not run triton" in p.stdout
    for r in rows:
        assert ROW_KEYS | SHAPE_KEYS[r["op"]] <= r.keys(), r
        assert r["case"] in res["cases"] and res["cases"][r["case"]]["desc"] == r["desc"] != ""
        if device == "cuda" and r["op"] == "clip_grad_norm":
            assert r["launches"] is None or r["launches"] > 0
            if r["provider"].startswith("fusedstab") or r["provider"] == "eager":
                assert r["syncs"] == 0, r  # the no-sync claim, measured by the harness
        assert r["ms"] > 0 and r["gbps"] > 0 and r["bytes"] > 0
        if r["provider"] == "eager":
            assert r["speedup_vs_eager"] == 1.0
        if r["provider"] == "matmul":  # Provider(check=False): a yardstick, never compared with eager
            assert r["max_rel_err"] is None and r["tflops"] > 0, r
    # every provider ran and agreed with eager (the runner turns failures and mismatches into notes)
    bad = [n for n in res["notes"] if "failed:" in n or "differs from eager" in n]
    assert not bad, bad
    md = (tmp_path / (js.stem + ".md")).read_text()
    assert all(f"## {op}" in md for op in OPS)


def test_bytes_model():
    M, N, e = 4096, 1024, 2  # bf16 x and weight; fp32 statistics
    act = M * N * e
    assert bytes_model(M, N, e, e) == {"fwd": 2 * act + 2 * N * e + 8 * M, "bwd": 3 * act + 3 * N * e + 8 * M,
                                       "fwd+bwd": 5 * act + 5 * N * e + 16 * M}
    rms = bytes_model(M, N, e, e, rms=True)
    assert rms["fwd"] == 2 * act + N * e + 4 * M and rms["bwd"] == 3 * act + 2 * N * e + 4 * M
    add = bytes_model(M, N, e, e, add=True)
    assert add["fwd"] == 4 * act + 2 * N * e + 8 * M and add["bwd"] == 4 * act + 3 * N * e + 8 * M


def test_clip_bytes_model_and_lists():
    assert clip_bench.bytes_model(1000, 2) == {"norm": 2000, "clip": 6000}  # read; read, read + write
    gpt2 = clip_bench.transformer(50257, 1024, 768, 12)
    assert len(gpt2) == 148 and sum(math.prod(s) for s in gpt2) == 124_439_808  # GPT-2 small
    big = clip_bench.transformer(50257, 2048, 2048, 24)
    assert 1.2e9 < sum(math.prod(s) for s in big) < 1.4e9
    mixed = clip_bench.mixed(1000, 16, 1 << 20)
    assert len(mixed) == 1000 and all(16 <= math.prod(s) <= 1 << 20 for s in mixed)


def test_activation_bytes_and_flops_model():
    n, C, e = 8192 * 4096, 4096, 2  # bf16 x and bias; slope >= 0: backward reads the saved y
    assert bias_bench.bias_bytes_model(n, C, e, e) == {"fwd": 2 * n * e + C * e, "bwd": 3 * n * e + C * e,
                                                      "fwd+bwd": 5 * n * e + 2 * C * e}
    M, K, N = 8192, 4096, 16384
    fwd = (M * K + N * K + M * N) * e + N * e  # read x, w, b; write y
    bwd = (M * N + M * K + N * K + M * N + M * K + N * K) * e + N * e  # read dy, x, w, y; write dx, dw, db
    assert linear_bench.linear_bytes_model(M, K, N, e, e) == {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
    assert linear_bench.linear_flops(M, K, N) == {"fwd": 2 * M * N * K, "bwd": 4 * M * N * K, "fwd+bwd": 6 * M * N * K}


def test_help():
    """Plain text (no reST markup), the ops and the providers listed once each, examples; no torch
    import beyond what ``import fusedstab`` does before the arguments are parsed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-m", "fusedstab.bench", "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "``" not in out and ":mod:" not in out and ":func:" not in out
    for op in OPS:  # once each: in the list of ops, not in --ops' usage too
        assert len(re.findall(rf"^\s+{op}\s", out, re.M)) == 1, op
    for name in ("eager", "compile", "fusedstab-torch", "fusedstab-triton", "eager-loop", "matmul"):
        assert len(re.findall(rf"^\s+{name}\s", out, re.M)) == 1, name
    assert "{layer_norm," not in out and "{fwd," not in out  # no choices list in the usage or the options
    assert "\nexamples:\n" in out and "python -m fusedstab.bench --tiny" in out
    bad = subprocess.run([sys.executable, "-m", "fusedstab.bench", "--providers", "nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown provider 'nope'" in bad.stderr and "fusedstab-torch" in bad.stderr
