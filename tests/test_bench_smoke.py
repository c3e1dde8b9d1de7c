"""The benchmark harness end to end: `python -m fusedstab.bench --smoke` in a subprocess
(one tiny shape per op, every mode, no torch.compile), then its JSON and table are checked."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusedstab.bench import MODES, OPS
from fusedstab.bench import activation as act_bench
from fusedstab.bench import clip as clip_bench
from fusedstab.bench.norms import bytes_model

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"op", "mode", "provider", "dtype", "ms", "bytes", "gbps", "pct_copy",
            "speedup_vs_eager", "speedup_vs_compile", "max_rel_err"}
SHAPE_KEYS = {"clip_grad_norm": {"model", "tensors", "numel"},  # every other op: rows of N, M of them
              "bias_leaky_relu": {"shape", "dim", "layout", "numel"},
              "linear_leaky_relu": {"M", "K", "N", "tflops"},
              "group_norm": {"shape", "groups", "layout", "act"},
              "batch_norm": {"shape", "layout", "act"},
              "attention": {"B", "H", "L", "E", "causal", "tflops"},
              "train_step": {"model", "batch", "params", "tflops"}}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bench_smoke(tmp_path, device):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-m", "fusedstab.bench", "--smoke", "--device", device, "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[1/" in p.stderr  # progress lines
    (js,) = tmp_path.glob("*.json")
    assert (tmp_path / (js.stem + ".txt")).read_text().startswith(p.stdout.splitlines()[0])
    res = json.loads(js.read_text())
    for k in ("device_name", "torch", "triton", "python", "date", "dtype"):
        assert res["meta"][k], k
    assert res["copy_bandwidth"]["gbps"] > 0
    rows = res["rows"]
    assert {r["op"] for r in rows} == set(OPS)
    assert {r["mode"] for r in rows} == set(MODES)
    provs = {r["provider"] for r in rows}
    assert "fusedstab-torch" in provs
    assert "matmul" in provs  # linear_leaky_relu's bare-matmul yardstick
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # tests/conftest.py sets it on CPU
        assert "fusedstab-triton" in provs
    for r in rows:
        assert ROW_KEYS | SHAPE_KEYS.get(r["op"], {"M", "N"}) <= r.keys(), r
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
    assert act_bench.bias_bytes_model(n, C, e, e) == {"fwd": 2 * n * e + C * e, "bwd": 3 * n * e + C * e,
                                                      "fwd+bwd": 5 * n * e + 2 * C * e}
    M, K, N = 8192, 4096, 16384
    fwd = (M * K + N * K + M * N) * e + N * e  # read x, w, b; write y
    bwd = (M * N + M * K + N * K + M * N + M * K + N * K) * e + N * e  # read dy, x, w, y; write dx, dw, db
    assert act_bench.linear_bytes_model(M, K, N, e, e) == {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
    assert act_bench.linear_flops(M, K, N) == {"fwd": 2 * M * N * K, "bwd": 4 * M * N * K, "fwd+bwd": 6 * M * N * K}
