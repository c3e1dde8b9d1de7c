"""Global-norm clipping of gradients sharded over ranks: 2 CPU processes with gloo.

Each rank holds half of every gradient (``torch.tensor_split`` along dim 0, as FSDP and DTensor
``Shard(0)`` do; a one-row tensor leaves rank 1 an empty shard) and calls fusedstab with an explicit
``process_group``; then the same with DTensor gradients on a 1-D CPU mesh and no process_group. The
global norm every rank gets, and the clipped shards put back together, are compared here, in the
pytest process, with torch.nn.utils on the unsharded gradients (and a float64 truth).

One ``spawn`` serves every test of this module (a module-scoped fixture): the workers run all the
calls and save their results; the tests only compare. A NaN on one rank must reach every rank
(error_if_nonfinite raises everywhere, nonfinite="skip" zeroes everywhere).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.nn import utils as TU

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from helpers import init_gloo, rank_result, recorder, run_gloo_workers  # noqa: E402

WORLD = 2
INF = float("inf")
NORMS = [2.0, 1.0, INF, -INF, 0.0, 0.5, 3.0]
MAX_NORM = 0.5
TIMEOUT_S = 150  # the whole spawn: far above its usual ~15 s, far below a hung CI job


def full_grads() -> list[torch.Tensor]:
    """The unsharded gradients (the same on every rank: seeded)."""
    g = torch.Generator().manual_seed(1234)
    spec = [((7, 5), torch.float32), ((1,), torch.float32), ((300,), torch.float64), ((2, 3, 4), torch.float32),
            ((20001,), torch.float32), ((3, 1), torch.float64), ((1, 4), torch.float16), ((9, 2), torch.float32)]
    out = []
    for shape, dt in spec:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if dt == torch.float16:
            t = t * 0.1
        out.append(t.to(dt))
    out[7].zero_()  # an all-zero gradient (counts in no norm, and p=0 counts tensors)
    return out  # the fp16 group is one row: rank 1 holds none of it (an empty dtype group)


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.tensor_split(t, WORLD, dim=0)[rank].clone()


def _params(shards):
    ps = []
    for s in shards:
        p = torch.zeros(s.shape, dtype=s.dtype).requires_grad_()
        p.grad = s.clone()
        ps.append(p)
    return ps


def _worker(rank: int, init_file: str, out_dir: str, backends: list[str]) -> None:
    init_gloo(rank, init_file, WORLD)
    import fusedstab
    from fusedstab import utils as FU

    group = dist.group.WORLD
    res: dict = {}

    record = recorder(res)

    full = full_grads()
    for backend in backends:
        with fusedstab.use_backend(backend):
            for p in NORMS:
                local = [shard(t, rank) for t in full]

                def norm_case(local=local, p=p):
                    total, per = FU.get_total_norm(local, p, process_group=group, return_per_tensor=True)
                    return {"total": total, "total_plain": FU.get_total_norm(local, p, process_group=group),
                            "per": per}

                def clip_case(local=local, p=p):
                    ps = _params(local)
                    total = FU.clip_grad_norm_(ps, MAX_NORM, p, process_group=group)
                    return {"total": total, "grads": [q.grad for q in ps]}

                record((backend, "norm", p), norm_case)
                record((backend, "clip", p), clip_case)

            def nan_case():
                local = [shard(t, rank) for t in full]
                if rank == 1:
                    local[4][-1] = float("nan")  # only rank 1 sees it
                out = {}
                try:
                    FU.clip_grad_norm_(_params(local), MAX_NORM, error_if_nonfinite=True, process_group=group)
                    out["raised"] = None
                except RuntimeError as e:
                    out["raised"] = str(e)
                ps = _params(local)
                out["skip_total"] = FU.clip_grad_norm_(ps, MAX_NORM, nonfinite="skip", process_group=group)
                out["skip_grads"] = [q.grad for q in ps]
                return out

            record((backend, "nan"), nan_case)
            dist.barrier()

    # DTensor gradients sharded on a 1-D mesh: no process_group argument
    def dtensor_available():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (WORLD,))
        x = distribute_tensor(torch.arange(6.0).reshape(3, 2), mesh, [Shard(0)])
        assert torch.equal(x.full_tensor(), torch.arange(6.0).reshape(3, 2))
        return mesh

    try:
        mesh = dtensor_available()
    except Exception as e:
        res["dtensor_unavailable"] = f"{type(e).__name__}: {e}"
        mesh = None
    if mesh is not None:
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor

        def plain(t):
            return t.full_tensor() if isinstance(t, DTensor) else t

        for backend in backends:
            with fusedstab.use_backend(backend):
                for p in (2.0, INF, 1.0):
                    def dt_case(p=p):
                        params = []
                        for t in full:
                            q = torch.nn.Parameter(distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]))
                            q.grad = distribute_tensor(t.clone(), mesh, [Shard(0)])
                            params.append(q)
                        norm = plain(FU.get_total_norm([q.grad for q in params], p))
                        total = FU.clip_grad_norm_(params, MAX_NORM, p)
                        return {"norm": norm, "total": plain(total), "is_dtensor": isinstance(total, DTensor),
                                "grads": [q.grad.to_local().clone() for q in params]}

                    record((backend, "dtensor", p), dt_case)

                def replicated_case():
                    from torch.distributed.tensor import Replicate

                    q = torch.nn.Parameter(distribute_tensor(torch.zeros(6), mesh, [Replicate()]))
                    q.grad = distribute_tensor(torch.arange(6.0), mesh, [Replicate()])
                    try:
                        return {"total": plain(FU.clip_grad_norm_([q], MAX_NORM)), "raised": None}
                    except Exception as e:
                        return {"total": None, "raised": f"{type(e).__name__}: {e}"}

                record((backend, "dtensor_replicate"), replicated_case)
                dist.barrier()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the workers once; {rank: results}."""
    return run_gloo_workers(_worker, tmp_path_factory.mktemp("dist"), WORLD, TIMEOUT_S)


def _truth(p, clip=True):
    """torch on the unsharded grads (its dtype), and the float64 truth."""
    full = full_grads()
    total_t = TU.get_total_norm(full, p)
    full64 = [t.double() for t in full]
    total64 = TU.get_total_norm(full64, p)
    coef64 = min(MAX_NORM / (total64.item() + 1e-6), 1.0)
    ps = _params(full)
    TU.clip_grad_norm_(ps, MAX_NORM, p)
    return total_t, total64, [q.grad for q in ps], [t * coef64 for t in full64]


def _tol(dtype):
    return {torch.float16: dict(rtol=2e-3, atol=1e-4), torch.float32: dict(rtol=1e-5, atol=1e-6),
            torch.float64: dict(rtol=1e-5, atol=1e-6)}[dtype]  # fp64 grads: the list's fp32/fp16 precision


def _check_total(total, total_t, total64, what):
    assert total.dtype == total_t.dtype and total.shape == total_t.shape, \
        f"{what}: {total.dtype}{tuple(total.shape)} vs torch's {total_t.dtype}{tuple(total_t.shape)}"
    # an fp16 tensor in the list: torch's total carries that tensor's fp16-rounded norm
    torch.testing.assert_close(total.double(), total64, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("norm_type", NORMS, ids=str)
def test_sharded_global_norm(results, backend, norm_type):
    total_t, total64, _, _ = _truth(norm_type)
    r0, r1 = (rank_result(results, r, (backend, "norm", norm_type)) for r in range(WORLD))
    for r, out in enumerate((r0, r1)):
        _check_total(out["total"], total_t, total64, f"rank {r} get_total_norm")
        assert torch.equal(out["total"], out["total_plain"]), "return_per_tensor changed the total"
    assert torch.equal(r0["total"], r1["total"]), "ranks disagree on the global norm"
    # per-tensor norms: global too (the all-reduce is over the per-tensor reductions)
    full = full_grads()
    want = torch.stack([torch.linalg.vector_norm(t.double(), norm_type) for t in full])
    for r, out in enumerate((r0, r1)):
        torch.testing.assert_close(out["per"].double(), want, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"rank {r} per-tensor norms: {m}")


@pytest.mark.parametrize("norm_type", NORMS, ids=str)
def test_sharded_clip(results, backend, norm_type):
    total_t, total64, clipped_t, clipped64 = _truth(norm_type)
    outs = [rank_result(results, r, (backend, "clip", norm_type)) for r in range(WORLD)]
    for r, out in enumerate(outs):
        _check_total(out["total"], total_t, total64, f"rank {r} clip_grad_norm_")
    for i, (t, t64) in enumerate(zip(clipped_t, clipped64)):
        got = torch.cat([outs[r]["grads"][i] for r in range(WORLD)], dim=0)
        assert got.dtype == t.dtype and got.shape == t.shape
        torch.testing.assert_close(got.double(), t64, **_tol(t.dtype), msg=lambda m: f"grad[{i}] vs truth: {m}")
        torch.testing.assert_close(got, t, **_tol(t.dtype), msg=lambda m: f"grad[{i}] vs torch: {m}")


def test_sharded_nan_on_one_rank(results, backend):
    for r in range(WORLD):
        out = rank_result(results, r, (backend, "nan"))
        assert out["raised"] is not None and "non-finite" in out["raised"], \
            f"rank {r}: error_if_nonfinite did not raise for a NaN on rank 1"
        assert torch.isnan(out["skip_total"]), f"rank {r}: total {out['skip_total']}"
        for i, g in enumerate(out["skip_grads"]):
            assert torch.equal(g, torch.zeros_like(g)), f"rank {r} grad[{i}] not zeroed by nonfinite='skip'"


@pytest.mark.parametrize("norm_type", [2.0, INF, 1.0], ids=str)
def test_dtensor_shard0(results, backend, norm_type):
    if "dtensor_unavailable" in results[0]:
        pytest.skip(f"DTensor on a CPU gloo mesh does not work here: {results[0]['dtensor_unavailable']}")
    total_t, total64, clipped_t, clipped64 = _truth(norm_type)
    outs = [rank_result(results, r, (backend, "dtensor", norm_type)) for r in range(WORLD)]
    for r, out in enumerate(outs):
        _check_total(out["norm"], total_t, total64, f"rank {r} get_total_norm(DTensor)")
        _check_total(out["total"], total_t, total64, f"rank {r} clip_grad_norm_(DTensor)")
    for i, (t, t64) in enumerate(zip(clipped_t, clipped64)):
        got = torch.cat([outs[r]["grads"][i] for r in range(WORLD)], dim=0)
        torch.testing.assert_close(got.double(), t64, **_tol(t.dtype), msg=lambda m: f"grad[{i}]: {m}")


def test_dtensor_replicated_is_right_or_refused(results, backend):
    """Replicated DTensor grads (no shards): the plain norm, or a clear NotImplementedError, never a
    norm counted once per rank."""
    if "dtensor_unavailable" in results[0]:
        pytest.skip(f"DTensor on a CPU gloo mesh does not work here: {results[0]['dtensor_unavailable']}")
    for r in range(WORLD):
        out = rank_result(results, r, (backend, "dtensor_replicate"))
        if out["raised"] is not None:
            assert out["raised"].startswith("NotImplementedError"), out["raised"]
        else:
            torch.testing.assert_close(out["total"], torch.linalg.vector_norm(torch.arange(6.0)))
