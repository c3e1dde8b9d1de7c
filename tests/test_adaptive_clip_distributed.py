"""AdaptiveGradClipper on a model sharded over 2 CPU processes (gloo): every rank holds half of every
gradient (``torch.tensor_split`` along dim 0; a one-row tensor leaves rank 1 an empty shard) and
passes ``process_group``. Over a run with a spike and a NaN that only rank 1 sees, every rank must get
the global norm, the same threshold, the same skip flag and the same ZClip state as one process
clipping the unsharded gradients, and global per-tensor telemetry (norms and non-finite counts
summed, max |x| the max over ranks). One spawn serves the module; the tests compare.
"""
from __future__ import annotations

import os

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from helpers import init_gloo, rank_result, recorder, run_gloo_workers  # noqa: E402

WORLD = 2
STEPS = 8
SHAPES = [((7, 5), torch.float32), ((1, 4), torch.float32), ((300,), torch.float64), ((20001,), torch.float32),
          ((9, 2), torch.float32)]
NAMES = [f"t{i}" for i in range(len(SHAPES))]
KW = dict(max_norm=20.0, warmup_steps=3, z_thresh=2.0, alpha=0.8)
NEEDS = ("grad_stats", "grad_clip_finish", "multi_tensor_norm", "multi_tensor_scale_")
TIMEOUT_S = 200


def usable(backends):
    """The backends with every op the clipper calls; not Triton through the interpreter (~1 s a step
    per process here: its kernels are tested in one process, and this test is about the all-reduce)."""
    from fusedstab import backend as B

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return [b for b in backends if all(b in B._impls[op] for op in NEEDS) and not (b == "triton" and interpreted)]


def full_grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    out = [torch.randn(s, generator=g, dtype=torch.float64).to(dt) for s, dt in SHAPES]
    if step == 5:
        out[0][-1, 0] = float("nan")  # the last row: on rank 1 only
    if step == 6:
        out[3].mul_(30)  # a spike
    return out


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.tensor_split(t, WORLD, dim=0)[rank].clone()


def run_clipper(grads_of_step, process_group=None):
    """The clipper over STEPS steps: per step (total, found_inf, threshold, coef, clipped grads), the
    final state and the telemetry records."""
    from fusedstab.utils import AdaptiveGradClipper, GradStats

    first = grads_of_step(0)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in first]
    stats = GradStats(ring=16)
    clip = AdaptiveGradClipper(list(zip(NAMES, params)), "zclip", telemetry=stats, process_group=process_group, **KW)
    steps = []
    for s in range(STEPS):
        for p, g in zip(params, grads_of_step(s)):
            p.grad = g
        clip.step()
        steps.append({"total": clip.total_norm.clone(), "found": clip.found_inf.clone(),
                      "thr": clip.threshold.clone(), "coef": clip.coef.clone(), "grads": [p.grad.clone() for p in params]})
    return {"steps": steps, "state": clip.state.clone(), "records": [r.to_json() for r in stats.wait()]}


def _worker(rank: int, init_file: str, out_dir: str, backends: list[str]) -> None:
    init_gloo(rank, init_file, WORLD)
    import fusedstab

    res: dict = {}
    record = recorder(res)
    for backend in usable(backends):
        with fusedstab.use_backend(backend):
            record(backend, lambda: run_clipper(lambda s: [shard(t, rank) for t in full_grads(s)], dist.group.WORLD))
        dist.barrier()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_gloo_workers(_worker, tmp_path_factory.mktemp("dist"), WORLD, TIMEOUT_S)


@pytest.fixture(scope="module")
def single():
    """The unsharded run in this process, per backend (lazily)."""
    import fusedstab

    cache = {}

    def get(backend):
        if backend not in cache:
            with fusedstab.use_backend(backend):
                cache[backend] = run_clipper(full_grads)
        return cache[backend]
    return get


def test_ranks_agree_with_one_process(results, single, backend):
    if backend not in usable([backend]):
        pytest.skip(f"backend {backend!r}: not run here (see usable())")
    want = single(backend)
    outs = [rank_result(results, r, backend) for r in range(WORLD)]
    for s in range(STEPS):
        w = want["steps"][s]
        for r, out in enumerate(outs):
            o = out["steps"][s]
            what = f"rank {r} step {s}"
            assert o["found"].item() == w["found"].item(), f"{what}: found_inf {o['found']} != {w['found']}"
            for k in ("total", "thr", "coef"):
                torch.testing.assert_close(o[k], w[k], rtol=1e-6, atol=0, equal_nan=True, msg=lambda m: f"{what} {k}: {m}")
        for k in ("total", "found", "thr", "coef"):  # the ranks agree exactly: the same finishing program
            assert torch.equal(outs[0]["steps"][s][k].nan_to_num(), outs[1]["steps"][s][k].nan_to_num()), (s, k)
        for i, g in enumerate(w["grads"]):  # the clipped shards put back together
            got = torch.cat([outs[r]["steps"][s]["grads"][i] for r in range(WORLD)], dim=0)
            torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-7, equal_nan=True, msg=lambda m: f"step {s} grad {i}: {m}")
    assert [st["found"].item() for st in want["steps"]] == [float(s == 5) for s in range(STEPS)]
    assert want["steps"][6]["coef"].item() < 0.5  # the spike was clipped by the adaptive threshold
    for out in outs:  # (the variance amplifies the norms' last-bit differences: sums in other orders)
        torch.testing.assert_close(out["state"][:3], want["state"][:3], rtol=1e-6, atol=0)
        torch.testing.assert_close(out["state"][3], want["state"][3], rtol=1e-4, atol=0)
    assert torch.equal(outs[0]["state"], outs[1]["state"])


def test_global_per_tensor_telemetry(results, single, backend):
    if backend not in usable([backend]):
        pytest.skip(f"backend {backend!r}: not run here (see usable())")
    want = single(backend)["records"]
    for r in range(WORLD):
        got = rank_result(results, r, backend)["records"]
        assert [g["step"] for g in got] == [w["step"] for w in want] == list(range(1, STEPS + 1))
        for g, w in zip(got, want):
            assert g["nonfinite"] == w["nonfinite"], f"rank {r} step {g['step']}"
            assert g["skipped"] == w["skipped"]
            for k in ("norm", "max_abs"):
                torch.testing.assert_close(torch.tensor(g[k]), torch.tensor(w[k]), rtol=1e-5, atol=0, equal_nan=True)
    assert want[5]["nonfinite"] == [1, 0, 0, 0, 0]
