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
OPS_HERE = ["layer_norm", "rms_norm", "add_layer_norm", "bias_leaky_relu", "linear_leaky_relu", "batch_norm",
            "attention"]
CASES = [c for op in OPS_HERE if op in OPS for c in load_cases(op, CFG)]


def _params():
    for c in CASES:
        for mode in c.modes:
            for name, prov in c.providers.items():
                if prov.modes is None or mode in prov.modes:
                    yield pytest.param(c, mode, name, id=f"{c.label}-{mode}-{name}")


_compiled_case = [None]  # the case whose compiled graphs dynamo's cache holds


@pytest.mark.parametrize("case,mode,name", list(_params()))
def test_op(benchmark, case, mode, name):
    prov = case.providers[name]
    if name == "compile" and _compiled_case[0] is not case:
        # As the runner: a fresh cache per case. All cases of an op share one code object, and more
        # than torch._dynamo.config.recompile_limit (8) of them fail under fullgraph=True.
        torch._dynamo.reset()
        _compiled_case[0] = case
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.group = f"{case.label} {mode}"
    benchmark.extra_info.update(case.params, bytes=case.bytes_moved[mode])
    with prov.context():
        inputs, grads = case.make_inputs()
        try:
            thunk = (case.thunk or make_thunk)(prov.fn, inputs, grads, mode)
            thunk()  # warm-up outside the timing (torch.compile compiles here)
        except Exception as e:  # as the runner: a fusedstab backend without this op is no failure
            if type(e).__name__ == "BackendError" and "no implementation" in str(e):
                pytest.skip(str(e))
            raise
        benchmark(lambda: (thunk(), sync()))
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = case.bytes_moved[mode] / median / 1e9
        if case.flops:
            benchmark.extra_info["TFLOP/s"] = case.flops[mode] / median / 1e12
