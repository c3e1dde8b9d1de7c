"""SyncBatchNorm (+ fused activation) over 2 CPU processes with gloo: ``fusedstab.nn.SyncBatchNorm``.

Each rank holds a slice of one global batch (different sizes: 3 and 5 samples, and 0 and 5) and runs
several training steps (forward, backward with its slice of one global upstream gradient), then eval.
Here, in the pytest process, the results are compared with one BatchNorm over the concatenated batch
(torch's, followed by the activation, in fp32 and in float64: the truth), sliced back to the rank:

- output and dinput: the single-process ones (the statistics and the backward sums are the group's);
- running_mean / running_var / num_batches_tracked: the same on both ranks, and the single-process ones;
- dweight / dbias: the rank's LOCAL contribution (as torch.nn.SyncBatchNorm: DDP reduces them), i.e.
  the single-process gradients with the upstream gradient zeroed outside the rank's slice;
- eval: no synchronization (with track_running_stats=False eval normalizes by the rank's own batch).

One ``spawn`` serves every test of this module (a module-scoped fixture): the workers run all the cases
on both backends and save their results; the tests only compare. Also, without a process group:
the module is a drop-in for torch.nn.SyncBatchNorm (signature, state_dict, repr), behaves as
BatchNorm, and convert_sync_batchnorm swaps torch's and fusedstab's BatchNorm*d, sharing parameters
and buffers and keeping the activation.
"""
from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch
import torch.nn.functional as F

import fusedstab
import fusedstab.nn as fnn

from helpers import (act_fn, assert_matches, init_gloo, leaf, rank_result, recorder,
                     run_gloo_workers)

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


WORLD = 2
STEPS = 3
TIMEOUT_S = 150  # the whole spawn: far above its usual ~20 s, far below a hung CI job

# (id, channels, per-rank batch sizes, spatial dims, memory format, activation, slope, momentum)
CASES = [
    ("nchw-none-3+5", 4, (3, 5), (3, 4), "contiguous", None, 0.01, 0.1),
    ("cl-silu-3+5", 4, (3, 5), (3, 4), "channels_last", "silu", 0.01, 0.1),
    ("nchw-leaky-0+5-cumulative", 3, (0, 5), (2, 3), "contiguous", "leaky_relu", 0.2, None),
]
CASE_IDS = [c[0] for c in CASES]


def _fmt(name):
    return {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[name]


def _slices(sizes):
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def global_batch(case, step):
    """The global (x, dy) of a training step (eval: step = STEPS), the same in every process (seeded)."""
    _, C, sizes, spatial, _, _, _, _ = case
    g = torch.Generator().manual_seed(1000 * CASES.index(case) + step)
    shape = (sum(sizes), C, *spatial)
    x = torch.randn(shape, generator=g) * (1 + 0.5 * step) + 0.5 * step - 0.3
    dy = torch.randn(shape, generator=g)
    return x, dy


def init_params(C, seed=7):
    g = torch.Generator().manual_seed(seed)
    return 1 + 0.5 * torch.randn(C, generator=g), 0.5 * torch.randn(C, generator=g)


def _model(bn_a, bn_b):
    """conv -> bn_a -> relu -> conv -> bn_b (seeded: the same on every rank)."""
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), bn_a, torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 4, 1), bn_b)


def model_batch():
    g = torch.Generator().manual_seed(77)
    return torch.randn(6, 3, 5, 4, generator=g), torch.randn(6, 4, 5, 4, generator=g)


MODEL_SIZES = (2, 4)


# ----------------------------------------------------------------------------- the workers
def _worker(rank: int, init_file: str, out_dir: str, backends: list[str]) -> None:
    init_gloo(rank, init_file, WORLD)
    res: dict = {}

    record = recorder(res)

    for backend in backends:
        with fusedstab.use_backend(backend):
            for case in CASES:
                def train_case(case=case):
                    _, C, sizes, _, fmt, act, slope, momentum = case
                    sl = _slices(sizes)[rank]
                    m = fnn.SyncBatchNorm(C, momentum=momentum, activation=act, negative_slope=slope)
                    w, b = init_params(C)
                    with torch.no_grad():
                        m.weight.copy_(w)
                        m.bias.copy_(b)
                    steps = []
                    for step in range(STEPS):
                        x, dy = global_batch(case, step)
                        xl = leaf(x[sl].contiguous(memory_format=_fmt(fmt)))
                        y = m(xl)
                        y.backward(dy[sl].contiguous(memory_format=_fmt(fmt)))
                        steps.append({"y": y.detach(), "dx": xl.grad, "dweight": m.weight.grad.clone(),
                                      "dbias": m.bias.grad.clone(), "running_mean": m.running_mean.clone(),
                                      "running_var": m.running_var.clone(),
                                      "num_batches_tracked": m.num_batches_tracked.clone(),
                                      "y_channels_last": y.is_contiguous(memory_format=torch.channels_last)})
                        m.zero_grad()
                    m.eval()
                    x, _ = global_batch(case, STEPS)
                    with torch.no_grad():
                        y_eval = m(x[sl])
                    return {"steps": steps, "eval": y_eval, "running_mean": m.running_mean.clone()}

                record((backend, "train", case[0]), train_case)
                dist.barrier()

            def eval_no_running_stats():
                """eval with track_running_stats=False: batch statistics of the rank's own batch."""
                case = CASES[0]
                _, C, sizes, _, _, _, _, _ = case
                sl = _slices(sizes)[rank]
                m = fnn.SyncBatchNorm(C, track_running_stats=False, activation="silu").eval()
                x, _ = global_batch(case, 0)
                with torch.no_grad():
                    return {"y": m(x[sl])}

            record((backend, "eval_no_running_stats"), eval_no_running_stats)

            def converted_model():
                model = _model(torch.nn.BatchNorm2d(4), fnn.BatchNorm2d(4, activation="silu"))
                sync = fnn.SyncBatchNorm.convert_sync_batchnorm(model)
                x, dy = model_batch()
                sl = _slices(MODEL_SIZES)[rank]
                xl = leaf(x[sl])
                y = sync(xl)
                y.backward(dy[sl])
                return {"types": [type(sync[i]).__module__ + "." + type(sync[i]).__name__ for i in (1, 4)],
                        "y": y.detach(), "dx": xl.grad,
                        "buffers": {n: t.clone() for n, t in sync.named_buffers()}}

            record((backend, "converted"), converted_model)
            dist.barrier()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the workers once; {rank: results}."""
    return run_gloo_workers(_worker, tmp_path_factory.mktemp("sync_bn"), WORLD, TIMEOUT_S)


# ----------------------------------------------------------------------------- the truth
class _WithAct(torch.nn.Module):
    def __init__(self, m, act, slope):
        super().__init__()
        self.m, self.act, self.slope = m, act, slope

    def forward(self, x):
        return act_fn(self.m(x), self.act, self.slope)


def _grads(m, x, dy):
    xl = leaf(x)
    y = m(xl)
    gx, gw, gb = torch.autograd.grad(y, [xl, m.m.weight, m.m.bias], dy)
    return y.detach(), gx, gw, gb


def single_process_truth(case):
    """Per step, from torch's BatchNorm + activation over the concatenated batch, in fp32 (eager)
    and float64 (truth): y, dx, the buffers after the step, and per rank the LOCAL dweight / dbias
    (the upstream gradient zeroed outside the rank's slice)."""
    _, C, sizes, spatial, _, act, slope, momentum = case
    cls = torch.nn.BatchNorm1d if len(spatial) == 1 else torch.nn.BatchNorm2d
    bn = cls(C, momentum=momentum)
    w, b = init_params(C)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    mods = {"eager": _WithAct(bn, act, slope), "truth": _WithAct(copy.deepcopy(bn).double(), act, slope)}
    out = []
    for step in range(STEPS):
        x, dy = global_batch(case, step)
        rec = {}
        for kind, m in mods.items():
            dt = torch.float32 if kind == "eager" else torch.float64
            local = []
            for sl in _slices(sizes):
                mask = torch.zeros_like(dy)
                mask[sl] = 1
                _, _, gw, gb = _grads(copy.deepcopy(m), x.to(dt), (dy * mask).to(dt))
                local.append((gw, gb))
            y, gx, _, _ = _grads(m, x.to(dt), dy.to(dt))
            rec[kind] = {"y": y, "dx": gx, "local": local, "buffers": {n: t.clone() for n, t in m.m.named_buffers()}}
        out.append(rec)
    x, _ = global_batch(case, STEPS)
    ev = {}
    for kind, m in mods.items():
        m.eval()
        with torch.no_grad():
            ev[kind] = m(x.to(torch.float32 if kind == "eager" else torch.float64))
    out.append(ev)
    return out


_TRUTH: dict = {}


def _truth(case):
    if case[0] not in _TRUTH:
        _TRUTH[case[0]] = single_process_truth(case)
    return _TRUTH[case[0]]


def _case(cid):
    return CASES[CASE_IDS.index(cid)]


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("cid", CASE_IDS)
def test_output_and_dinput_are_the_global_batchs(results, backend, cid):
    """Per rank and step: output and dinput equal one BatchNorm's over the concatenated batch,
    sliced back to the rank (and keep the input's memory format)."""
    case = _case(cid)
    sl = _slices(case[2])
    truth = _truth(case)
    for r in range(WORLD):
        out = rank_result(results, r, (backend, "train", cid))
        for step in range(STEPS):
            got, t = out["steps"][step], truth[step]
            tag = f"[{backend}] {cid} rank {r} step {step}"
            assert_matches(got["y"], t["truth"]["y"][sl[r]], t["eager"]["y"][sl[r]], f"{tag} y")
            assert_matches(got["dx"], t["truth"]["dx"][sl[r]], t["eager"]["dx"][sl[r]], f"{tag} dx")
            if case[4] == "channels_last" and got["y"].numel():
                assert got["y_channels_last"], f"{tag}: the output is not channels_last"


@pytest.mark.parametrize("cid", CASE_IDS)
def test_dweight_dbias_are_local(results, backend, cid):
    """dweight / dbias: the rank's own contribution (zero on a rank with no samples); the two ranks'
    sum is the single-process gradient."""
    case = _case(cid)
    truth = _truth(case)
    outs = [rank_result(results, r, (backend, "train", cid)) for r in range(WORLD)]
    for step in range(STEPS):
        t = truth[step]
        for r in range(WORLD):
            got = outs[r]["steps"][step]
            for i, name in enumerate(("dweight", "dbias")):
                assert_matches(got[name], t["truth"]["local"][r][i], t["eager"]["local"][r][i],
                               f"[{backend}] {cid} rank {r} step {step} {name} (local)")
            if case[2][r] == 0:
                assert (got["dweight"] == 0).all() and (got["dbias"] == 0).all()


@pytest.mark.parametrize("cid", CASE_IDS)
def test_running_stats_equal_on_ranks_and_single_process(results, backend, cid):
    """After every step: running_mean / running_var / num_batches_tracked the same on both ranks
    (bitwise) and equal to the single-process BatchNorm's (momentum=None: the cumulative average);
    then eval uses them: each rank's eval output is the single-process one, sliced."""
    case = _case(cid)
    sl = _slices(case[2])
    truth = _truth(case)
    outs = [rank_result(results, r, (backend, "train", cid)) for r in range(WORLD)]
    for step in range(STEPS):
        t = truth[step]
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            a, c = outs[0]["steps"][step][name], outs[1]["steps"][step][name]
            assert torch.equal(a, c), f"[{backend}] {cid} step {step}: ranks disagree on {name}: {a} vs {c}"
            if name == "num_batches_tracked":
                assert a.item() == step + 1
                continue
            t64, te = t["truth"]["buffers"][name], t["eager"]["buffers"][name]
            assert_matches(a, t64, te, f"[{backend}] {cid} step {step} {name}", scale=t64.abs().clamp(min=1.0))
    ev = truth[STEPS]
    for r in range(WORLD):
        assert_matches(outs[r]["eval"], ev["truth"][sl[r]], ev["eager"][sl[r]], f"[{backend}] {cid} rank {r} eval")


def test_eval_does_not_sync(results, backend):
    """track_running_stats=False in eval: batch statistics, but of the rank's own batch (no sync;
    as torch.nn.SyncBatchNorm)."""
    case = CASES[0]
    x, _ = global_batch(case, 0)
    for r, sl in enumerate(_slices(case[2])):
        got = rank_result(results, r, (backend, "eval_no_running_stats"))["y"]
        xs = x[sl]
        exp64 = F.silu(F.batch_norm(xs.double(), None, None, training=True))
        exp = F.silu(F.batch_norm(xs, None, None, training=True))
        assert_matches(got, exp64, exp, f"[{backend}] rank {r} eval, track_running_stats=False")
        glob = F.silu(F.batch_norm(x, None, None, training=True))[sl]
        assert not torch.allclose(got, glob, atol=1e-3), "eval used the group's statistics"


def test_convert_sync_batchnorm_model(results, backend):
    """A conv model with torch's and fusedstab's BatchNorm2d (silu), converted: both become
    fusedstab SyncBatchNorm; the output, dinput and running statistics are the single-process model's
    over the concatenated batch."""
    x, dy = model_batch()
    ref = _model(torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4))
    ref64 = copy.deepcopy(ref).double()
    sl = _slices(MODEL_SIZES)
    outs = []
    for m, dt in ((ref, torch.float32), (ref64, torch.float64)):
        xl = leaf(x.to(dt))
        z = m[:4](xl)
        y = F.silu(m[4](z))
        (gx,) = torch.autograd.grad(y, [xl], dy.to(dt))
        outs.append((y.detach(), gx, dict(m.named_buffers())))
    (ye, dxe, be), (yt, dxt, bt) = outs
    for r in range(WORLD):
        got = rank_result(results, r, (backend, "converted"))
        assert got["types"] == ["fusedstab.nn.batch_norm.SyncBatchNorm"] * 2, got["types"]
        assert_matches(got["y"], yt[sl[r]], ye[sl[r]], f"[{backend}] rank {r} model y")
        assert_matches(got["dx"], dxt[sl[r]], dxe[sl[r]], f"[{backend}] rank {r} model dx")
        for n, v in got["buffers"].items():
            if n.endswith("num_batches_tracked"):
                assert torch.equal(v, be[n]), n
            else:
                assert_matches(v, bt[n], be[n], f"[{backend}] rank {r} model {n}", scale=bt[n].abs().clamp(min=1.0))


# ============================================================================= without a process group
def test_module_is_torch_subclass_and_signature():
    assert issubclass(fnn.SyncBatchNorm, torch.nn.SyncBatchNorm)
    fs_params = inspect.signature(fnn.SyncBatchNorm).parameters
    t_sig = inspect.signature(torch.nn.SyncBatchNorm).parameters
    for name, p in t_sig.items():
        assert name in fs_params, f"torch.nn.SyncBatchNorm's argument {name!r} missing"
        q = fs_params[name]
        assert q.default == p.default, name
        if p.kind != p.KEYWORD_ONLY:
            assert q.kind == p.kind, name
            assert list(fs_params).index(name) == list(t_sig).index(name), f"{name} not at torch's position"
    assert fs_params["activation"].default is None and fs_params["negative_slope"].default == 0.01
    assert fs_params["activation"].kind == inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None},
                                    {"bias": False}], ids=["default", "no-affine", "no-running-stats",
                                                           "momentum-None", "no-bias"])
def test_module_repr_state_dict_both_ways(kwargs):
    fs, t = fnn.SyncBatchNorm(5, **kwargs), torch.nn.SyncBatchNorm(5, **kwargs)
    assert repr(fs) == repr(t)
    r = repr(fnn.SyncBatchNorm(5, **kwargs, activation="leaky_relu", negative_slope=0.2))
    assert r.startswith(repr(t)[:-1]) and "activation='leaky_relu'" in r and "negative_slope=0.2" in r, r
    assert [(n, b.shape, b.dtype) for n, b in fs.named_buffers()] == \
           [(n, b.shape, b.dtype) for n, b in t.named_buffers()]
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
        for bname in ("running_mean", "running_var"):
            if getattr(t, bname) is not None:
                getattr(t, bname).uniform_(0.5, 1.5)
    fs.load_state_dict(t.state_dict(), strict=True)
    for k, v in t.state_dict().items():
        assert torch.equal(fs.state_dict()[k], v), k
    t2 = torch.nn.SyncBatchNorm(5, **kwargs)
    t2.load_state_dict(fs.state_dict(), strict=True)
    for k, v in fs.state_dict().items():
        assert torch.equal(t2.state_dict()[k], v), k


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_without_distributed_behaves_as_batch_norm(backend, training):
    """No process group initialized: SyncBatchNorm is a BatchNorm (training and eval, CPU tensors)."""
    assert not (dist.is_available() and dist.is_initialized())
    C = 4
    fs = fnn.SyncBatchNorm(C, activation="silu")
    t = torch.nn.BatchNorm2d(C)
    w, b = init_params(C)
    with torch.no_grad():
        fs.weight.copy_(w), fs.bias.copy_(b), t.weight.copy_(w), t.bias.copy_(b)
        fs.running_mean.normal_(), t.running_mean.copy_(fs.running_mean)
    t64 = copy.deepcopy(t).double()
    for m in (fs, t, t64):
        m.train(training)
    x = (torch.randn(3, C, 4, 5) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(3, C, 4, 5)
    xl = leaf(x)
    with fusedstab.use_backend(backend):
        y = fs(xl)
        gx, gw, gb = torch.autograd.grad(y, [xl, fs.weight, fs.bias], dy)
    assert y.is_contiguous(memory_format=torch.channels_last)
    for m, dt, key in ((t, torch.float32, "eager"), (t64, torch.float64, "truth")):
        xm = leaf(x.to(dt))
        ym = F.silu(m(xm))
        g = torch.autograd.grad(ym, [xm, m.weight, m.bias], dy.to(dt))
        if key == "eager":
            eager = (ym.detach(), *g)
        else:
            truth = (ym.detach(), *g)
    for name, a, tr, e in zip(("y", "dx", "dweight", "dbias"), (y.detach(), gx, gw, gb), truth, eager):
        assert_matches(a, tr, e, f"[{backend}] {'train' if training else 'eval'} {name}")
    for n in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fs, n), getattr(t, n), msg=lambda m: f"{n}: {m}")


def test_convert_sync_batchnorm_shares_and_keeps_activation():
    bn_t = torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.2)
    bn_f = fnn.BatchNorm2d(4, activation="leaky_relu", negative_slope=0.2, affine=True)
    bn_1d = fnn.BatchNorm1d(3, affine=False, track_running_stats=False, activation="silu")
    model = torch.nn.Sequential(bn_t, torch.nn.Sequential(bn_f, bn_1d))
    model.eval()
    olds = [bn_t, bn_f, bn_1d]
    sync = fnn.SyncBatchNorm.convert_sync_batchnorm(model)
    news = [sync[0], sync[1][0], sync[1][1]]
    for old, new in zip(olds, news):
        assert type(new) is fnn.SyncBatchNorm, type(new)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, attr) == getattr(old, attr), attr
        assert new.activation == getattr(old, "activation", None)
        assert new.negative_slope == getattr(old, "negative_slope", 0.01)
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            a, c = getattr(old, n), getattr(new, n)
            assert (a is None) == (c is None), n
            if a is not None:
                assert c.data_ptr() == a.data_ptr(), f"{n} is not shared"
        if old.affine:
            assert new.weight is old.weight and new.bias is old.bias
    # a module that is a fusedstab BatchNorm itself (not only its children)
    top = fnn.SyncBatchNorm.convert_sync_batchnorm(fnn.BatchNorm3d(2, activation="relu"))
    assert type(top) is fnn.SyncBatchNorm and top.activation == "relu"
