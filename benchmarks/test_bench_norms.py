"""pytest-benchmark suite over the cases of ``python -m fusedstab.bench`` (quick shapes).

    pytest benchmarks --benchmark-only [--benchmark-group-by=group] [-k rms_norm]

Cases, providers and thunks come from fusedstab.bench; this file only parametrizes them.
On a GPU each timed call ends with a synchronize so that pytest-benchmark's wall clock is honest;
``python -m fusedstab.bench`` (CUDA events, L2 flushed) is the one whose numbers get recorded.
"""
import pytest
import torch

from fusedstab.bench import OPS, Config, load_cases
from fusedstab.bench.timing import make_thunk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = Config(DEVICE, torch.bfloat16 if DEVICE == "cuda" else torch.float32, quick=True)
CASES = [c for op in ["layer_norm", "rms_norm", "add_layer_norm"] if op in OPS for c in load_cases(op, CFG)]


def _params():
    for c in CASES:
        shape = "x".join(str(c.params[k]) for k in ("M", "N"))
        for mode in c.modes:
            for name in c.providers:
                yield pytest.param(c, mode, name, id=f"{c.op}-{shape}-{mode}-{name}")


@pytest.mark.parametrize("case,mode,name", list(_params()))
def test_norm(benchmark, case, mode, name):
    prov = case.providers[name]
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.group = f"{case.label} {mode}"
    benchmark.extra_info.update(case.params, bytes=case.bytes_moved[mode])
    with prov.context():
        inputs, grads = case.make_inputs()
        thunk = make_thunk(prov.fn, inputs, grads, mode)
        thunk()  # warm-up outside the timing (torch.compile compiles here)
        benchmark(lambda: (thunk(), sync()))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = case.bytes_moved[mode] / benchmark.stats.stats.median / 1e9
