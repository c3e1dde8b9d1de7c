"""AdaptiveGradClipper, SkipStep and GradStats end to end.

- fixed mode against torch.nn.utils.clip_grad_norm_ and a float64 truth (mixed dtypes, layouts,
  parameters without a gradient), with the telemetry's per-tensor rows checked too;
- every mode (fixed, schedule, zclip, quantile) against the plain-Python model of tests/clip_model.py
  over a norm sequence with spikes and NaN, fed through real gradients;
- skip-step: a skipped step leaves parameters and optimizer state bit for bit unchanged (fused
  optimizers through found_inf, the others restored on the device, a first step read on the host),
  and the next good step equals a run that never saw the bad one; GradScaler with one combined flag;
- no host sync in the step path (``Tensor.item`` / ``__bool__`` / ... raise during it), a
  state_dict round trip mid-run, ``torch.compile(fullgraph=True)`` of the step;
- telemetry: ring and poll semantics, hooks, save/load, the plot; on a GPU (marked): sync debug mode
  "error" over whole training steps with telemetry, and CUDA-graph capture and replay.
"""
from __future__ import annotations

import copy
import io
import logging
import math
import os
import random

import pytest
import torch

import fusedstab
from fusedstab import backend as fs_backend
from fusedstab.utils import AdaptiveGradClipper, GradStats, SkipStep, logger_hook, plot_layer_norms, tensorboard_hook

from clip_model import PyClipper
from helpers import assert_matches

INF, NAN = math.inf, math.nan
_NEEDS = ("grad_stats", "grad_clip_finish", "multi_tensor_norm", "multi_tensor_scale_")
BACKENDS = [b for b in fs_backend.BACKENDS if all(b in fs_backend._impls[op] for op in _NEEDS)]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def backend(request):
    with fusedstab.use_backend(request.param):
        yield request.param


def _steps(backend: str, n: int) -> int:
    """Fewer steps under the Triton interpreter (~0.3 s a step); the arithmetic of every step is
    covered on every backend by tests/test_grad_stats_ops.py."""
    return max(6, n // 3) if backend == "triton" and INTERPRET else n


def _params(seed: int, dtypes=(torch.float32,), device="cpu", none_every: int = 0):
    """Named parameters of assorted shapes (dtypes cycled), with random gradients (``none_every``:
    every so many has no gradient)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (1,), (300,), (2, 3, 4), (17000,), (3, 1), (12, 8), (5,)]
    out = []
    for i, s in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.zeros(s, dtype=dt, device=device))
        if not (none_every and i % none_every == none_every - 1):
            p.grad = (torch.randn(s, generator=g, dtype=torch.float64) * 10 ** (i % 3 - 1)).to(device, dt)
        out.append((f"layer{i}", p))
    return out


# ============================================================================ fixed mode vs torch
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("max_norm", [0.5, "tensor", 1e6], ids=["float", "tensor", "noclip"])
def test_fixed_matches_torch(backend, max_norm):
    dtypes = (torch.float32, torch.float16, torch.float64, torch.float32)
    named = _params(3, dtypes, none_every=4)
    named[6][1].grad = torch.randn(12, 16, dtype=named[6][1].dtype)[:, ::2]  # strided: the reference path
    mn = torch.tensor(0.5) if max_norm == "tensor" else max_norm
    stats = GradStats(ring=2)
    clip = AdaptiveGradClipper(named, "fixed", max_norm=mn, telemetry=stats)
    ref = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    for r, (_, p) in zip(ref, named):
        r.grad = None if p.grad is None else p.grad.clone()
    before = [None if p.grad is None else p.grad.to(torch.float64, copy=True) for _, p in named]
    total = clip.step()
    total_t = torch.nn.utils.clip_grad_norm_(ref, float(mn))
    total64 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b) for b in before if b is not None]))
    assert total.dtype == torch.float64  # the accumulation dtype of a list with an fp64 gradient
    torch.testing.assert_close(total, total64, rtol=1e-6, atol=0)
    assert total_t.item() == pytest.approx(total64.item(), rel=1e-3)
    coef64 = min(float(mn) / (total64.item() + 1e-6), 1.0)
    for i, ((_, p), r, b) in enumerate(zip(named, ref, before)):
        if b is None:
            assert p.grad is None
            continue
        if p.grad.dtype == torch.float64:  # the coefficient carries the list's fp32 (fp16 tensors') precision
            torch.testing.assert_close(p.grad, b * coef64, rtol=1e-6, atol=0, msg=lambda m: f"grad {i}: {m}")
        else:
            assert_matches(p.grad, b * coef64, r.grad, f"grad {i}")
    assert clip.found_inf.item() == 0.0
    rec = stats.poll()[-1]
    assert rec.step == 1 and not rec.skipped and rec.total_norm == pytest.approx(total64.item(), rel=1e-6)
    for i, b in enumerate(before):
        want = (0.0, 0.0, 0) if b is None else (torch.linalg.vector_norm(b).item(), b.abs().max().item(), 0)
        d = rec.by_name()[f"layer{i}"]
        assert (d["norm"], d["max_abs"], d["nonfinite"]) == pytest.approx(want, rel=1e-6), f"layer{i}"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_schedule_callable_and_tensor(backend):
    seen = []

    def sched(step):
        seen.append(step)
        return 2.0 / (1 + step)

    limit = torch.tensor(3.0)
    by_call, by_tensor = (AdaptiveGradClipper(_params(4), "schedule", max_norm=m) for m in (sched, limit))
    for step in range(3):
        limit.fill_(1.0 + step)  # changed in place between steps
        for clip, want in ((by_call, 2.0 / (1 + step)), (by_tensor, 1.0 + step)):
            for p in clip.params:
                p.grad.normal_().mul_(10)
            clip.step()
            assert clip.threshold.item() == pytest.approx(want)
            total = math.sqrt(sum(p.grad.double().square().sum().item() for p in clip.params))
            assert total == pytest.approx(want, rel=1e-5)  # clipped to the scheduled value
    assert seen == [0, 1, 2]


# ============================================================================ every mode vs the Python model
def _set_norm(params, g: float, rng: torch.Generator) -> None:
    """Random gradients whose global L2 norm is ``g`` (NaN/Inf: one element of one gradient)."""
    gs = [torch.randn(p.shape, generator=rng, dtype=torch.float64) for p in params]
    n = math.sqrt(sum(x.square().sum().item() for x in gs))
    for p, x in zip(params, gs):
        p.grad = (x * (g / n if math.isfinite(g) else 1.0)).to(p.dtype)
    if not math.isfinite(g):
        params[1].grad.view(-1)[0] = g


MODES = {
    "fixed": dict(max_norm=3.0),
    "zclip": dict(max_norm=50.0, warmup_steps=4, z_thresh=2.0, alpha=0.8),
    "quantile": dict(max_norm=None, warmup_steps=3, quantile=0.75, window=5),
    "zclip-ceiling": dict(max_norm=None, warmup_steps=4, z_thresh=2.0, alpha=0.8, skip_above=40.0),
}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", list(MODES))
def test_modes_match_python_model(backend, mode):
    kw = dict(MODES[mode])
    named = _params(5)
    params = [p for _, p in named]
    clip = AdaptiveGradClipper(named, mode.split("-")[0], telemetry=GradStats(ring=3), **kw)
    model = PyClipper(mode.split("-")[0], cap=INF if kw.get("max_norm") is None else kw["max_norm"],
                      warmup=kw.get("warmup_steps", 25), z_thresh=kw.get("z_thresh", 2.5), alpha=kw.get("alpha", 0.97),
                      q=kw.get("quantile", 0.9), window=kw.get("window", 128), skip_above=kw.get("skip_above", INF))
    rng = random.Random(9)
    norms = [rng.uniform(0.5, 2.0) for _ in range(40)]
    for i, m in {5: 30.0, 9: NAN, 11: 60.0, 12: INF, 14: 25.0}.items():
        norms[i] = m
    gen = torch.Generator().manual_seed(0)
    for step, g in enumerate(norms[:_steps(backend, 20)]):
        _set_norm(params, g, gen)
        before = [p.grad.clone() for p in params]
        total = clip.step()
        thr, coef, skipped = model.step(total.item())
        assert clip.found_inf.item() == float(skipped), f"step {step} (norm {g})"
        if not math.isnan(total.item()):
            assert total.item() == pytest.approx(g, rel=1e-5)
        assert clip.threshold.item() == pytest.approx(thr, rel=1e-6), f"step {step} threshold"  # fp32 outputs
        assert clip.coef.item() == pytest.approx(coef, rel=1e-6), f"step {step} coef"
        for p, b in zip(params, before):  # scaled by the coefficient in the gradient's dtype (fp32)
            want = b if skipped else b * clip.coef.to(b.dtype)
            assert torch.equal(p.grad.nan_to_num(), want.nan_to_num()), f"step {step}"
        rec = clip.telemetry.poll()[-1]
        assert (rec.step, rec.skipped) == (step + 1, skipped)


# ============================================================================ skip-step
def _optimizers(params):
    """(name, optimizer, read_flag_after_first_step): fused ones take found_inf, the others are restored."""
    mk = lambda cls, **kw: cls(params, **kw)
    return [("Adam-fused", mk(torch.optim.Adam, lr=0.1, fused=True)),
            ("AdamW-fused-amsgrad", mk(torch.optim.AdamW, lr=0.1, amsgrad=True, fused=True)),
            ("SGD-fused", mk(torch.optim.SGD, lr=0.1, momentum=0.9, fused=True)),
            ("Adagrad-fused", mk(torch.optim.Adagrad, lr=0.1, fused=True)),
            ("Adam-foreach", mk(torch.optim.Adam, lr=0.1, foreach=True, weight_decay=0.1)),
            ("SGD-nesterov", mk(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, foreach=False)),
            ("RMSprop", mk(torch.optim.RMSprop, lr=0.01, momentum=0.5, centered=True)),
            ("NAdam", mk(torch.optim.NAdam, lr=0.01)),
            ("Adamax", mk(torch.optim.Adamax, lr=0.01))]


def _snapshot(params, opt):
    state = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()} for p in params]
    return [p.detach().clone() for p in params], state


def _same(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    eq = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and all(
        s.keys() == t.keys() and all(eq(s[k], t[k]) for k in s) for s, t in zip(sa, sb))


def test_skip_step_is_bitwise_and_the_next_step_proceeds():
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(6, 4, generator=gen), torch.randn(4, generator=gen)] for _ in range(4)]
    bad = [grads[0][0].clone(), torch.full((4,), NAN)]
    for k in range(len(_optimizers([torch.nn.Parameter(torch.zeros(1))]))):
        runs = {}
        for kind, seq in (("with_bad", [0, 1, "bad", "bad", 2, 3]), ("clean", [0, 1, 2, 3])):
            params = [torch.nn.Parameter(torch.linspace(-1, 1, 24).reshape(6, 4)), torch.nn.Parameter(torch.ones(4))]
            name, opt = _optimizers(params)[k]
            clip = AdaptiveGradClipper(params, "fixed", max_norm=1.0)
            guard = SkipStep(opt)
            for j, which in enumerate(seq):
                for p, g in zip(params, bad if which == "bad" else grads[which]):
                    p.grad = g.clone()
                before = _snapshot(params, opt)
                creates_state = not all(opt.state.get(p) for p in params)  # (Adagrad makes it in __init__)
                clip.step()
                guard.step(clip.found_inf)
                assert guard.last_step_read_flag == creates_state, f"{name} step {j}: host read {creates_state}"
                if which == "bad":
                    assert clip.found_inf.item() == 1.0
                    assert _same(before, _snapshot(params, opt)), f"{name}: a skipped step changed params or state"
            runs[kind] = _snapshot(params, opt)
        assert _same(runs["with_bad"], runs["clean"]), f"{name}: the steps after a skipped one differ"


def test_skip_on_a_first_step_reads_the_flag_once():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    guard = SkipStep(opt)
    p.grad = torch.tensor([1.0, NAN, 0.0])
    guard.step(torch.tensor(1.0))
    assert guard.last_step_read_flag and not opt.state[p] and torch.equal(p.detach(), torch.ones(3))
    p.grad = torch.ones(3)
    guard.step(torch.tensor(0.0))
    assert opt.state[p]["step"].item() == 1 and not torch.equal(p.detach(), torch.ones(3))
    sgd = torch.optim.SGD([p], lr=0.1)  # keeps no state: the host read happens once
    g2 = SkipStep(sgd)
    g2.step(torch.tensor(0.0))
    g2.step(torch.tensor(0.0))
    assert not g2.last_step_read_flag


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_grad_scaler_one_combined_flag(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused, foreach=not fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    clip = AdaptiveGradClipper(model.parameters(), "fixed", max_norm=1e9, skip_above=100.0)
    x = torch.randn(8, 4)
    for step, xs in enumerate([x, x * 1e4, x, x]):  # step 1: a norm above the ceiling (finite)
        opt.zero_grad()
        scaler.scale(model(xs).square().mean()).backward()
        before = _snapshot(list(model.parameters()), opt)
        raw = [p.grad.clone() for p in model.parameters()]
        clip.step(scaler=scaler, optimizer=opt)
        for p, r in zip(model.parameters(), raw):  # unscaled first (and not clipped: max_norm 1e9)
            assert torch.equal(p.grad, r * (1 / 1024.0 if step < 2 else 1 / 512.0)), step
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        changed = not _same(before, _snapshot(list(model.parameters()), opt))
        assert changed == (step != 1), f"step {step}: skipped {not changed}"
        assert scaler.get_scale() == (scale / 2 if step == 1 else scale)  # a skip counts as an overflow


# ============================================================================ no host sync, checkpoints, compile
class _NoSync:
    """Tensor.item / __bool__ / tolist / __float__ / __int__ / numpy raise while active."""

    NAMES = ("item", "__bool__", "tolist", "__float__", "__int__", "numpy")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(torch.Tensor, n, _raiser(n))

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def _raiser(name):
    def f(*a, **k):
        raise AssertionError(f"Tensor.{name} called in the step path (a host sync on a GPU)")
    return f


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "restore"])
def test_no_host_read_in_the_step(backend, fused):
    named = _params(6, (torch.float32, torch.float64), none_every=5)
    params = [p for _, p in named]
    # (non-fused Adam reads its CPU step counts with .item(): SGD stands for the restored optimizers)
    opt = torch.optim.Adam(params, lr=0.01, fused=True) if fused else torch.optim.SGD(params, lr=0.1, momentum=0.9)
    clip = AdaptiveGradClipper(named, "quantile", max_norm=2.0, warmup_steps=1, window=4,
                               telemetry=GradStats(ring=4))
    guard = SkipStep(opt)
    for step in range(3):
        if step == 2:
            params[0].grad[0, 0] = NAN
        if step == 0:  # the first step creates the optimizer state (and the caches): a host read
            clip.step()
            guard.step(clip.found_inf)
            continue
        with _NoSync():
            clip.step()
            guard.step(clip.found_inf)
        assert not guard.last_step_read_flag
    assert clip.found_inf.item() == 1.0


@pytest.mark.parametrize("mode", ["zclip", "quantile", "schedule"])
def test_state_dict_round_trip_mid_run(mode):
    kw = {"zclip": dict(max_norm=5.0, warmup_steps=3, alpha=0.7), "quantile": dict(warmup_steps=2, window=4),
          "schedule": dict(max_norm=lambda s: 1.0 + 0.1 * s)}[mode]
    rng = random.Random(3)
    norms = [rng.uniform(0.5, 2) * (20 if i in (7, 12) else 1) for i in range(16)]
    norms[9] = NAN

    def run(clip, params, seq, gen):
        out = []
        for g in seq:
            _set_norm(params, g, gen)
            out.append([t.item() for t in (clip.step(), clip.threshold, clip.coef, clip.found_inf)])
        return out

    params = [p for _, p in _params(7)]
    full = run(AdaptiveGradClipper(params, mode, **kw), params, norms, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    first = AdaptiveGradClipper(params, mode, **kw)
    part = run(first, params, norms[:8], gen)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    second = AdaptiveGradClipper(params, mode, **kw)
    second.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    part += run(second, params, norms[8:], gen)
    torch.testing.assert_close(torch.tensor(part), torch.tensor(full), rtol=0, atol=0, equal_nan=True)


def test_compile_fullgraph_matches_eager():
    """The post-backward step (norm, statistics, threshold, scaling, telemetry) as one graph: no
    graph break, no recompilation across steps, the eager result. (backward itself cannot be in a
    fullgraph region in torch 2.13: Tensor.backward is unsupported by dynamo.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    named_e, named_c = _params(8), _params(8)
    kw = dict(max_norm=3.0, warmup_steps=2, z_thresh=2.0, alpha=0.8)
    eager = AdaptiveGradClipper(named_e, "zclip", telemetry=GradStats(ring=4), **kw)
    comp = AdaptiveGradClipper(named_c, "zclip", telemetry=GradStats(ring=4), **kw)
    cnt = CompileCounterWithBackend("aot_eager")
    step = torch.compile(comp.step, backend=cnt, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    with fusedstab.use_backend("torch"):
        for i, g in enumerate([1.0, 1.2, 0.9, 30.0, NAN, 1.1]):
            _set_norm([p for _, p in named_e], g, gen)
            for (_, a), (_, b) in zip(named_e, named_c):
                b.grad = a.grad.clone()
            te, tc = eager.step(), step()
            torch.testing.assert_close(tc, te, equal_nan=True, rtol=0, atol=0)
            for (_, a), (_, b) in zip(named_e, named_c):
                assert torch.equal(a.grad.nan_to_num(), b.grad.nan_to_num()), i
            assert torch.equal(comp.state.nan_to_num(), eager.state.nan_to_num()), i
            assert comp.found_inf.item() == eager.found_inf.item() == float(i == 4)
    assert cnt.frame_count == 1, f"{cnt.frame_count} compilations for 6 steps"
    assert torch.equal(comp.telemetry.ring_scalars.nan_to_num(), eager.telemetry.ring_scalars.nan_to_num())


def test_argument_errors():
    ps = [torch.nn.Parameter(torch.zeros(2))]
    for kw, match in [(dict(mode="median"), "mode"), (dict(mode="fixed"), "max_norm"),
                      (dict(mode="schedule", max_norm=1.0), "callable"), (dict(mode="zclip", z_thresh=0), "z_thresh"),
                      (dict(mode="zclip", alpha=1.0), "alpha"), (dict(mode="quantile", quantile=1.5), "quantile"),
                      (dict(mode="quantile", window=0), "window"), (dict(mode="zclip", skip_above=-1), "skip_above"),
                      (dict(mode="zclip", warmup_steps=1), "warmup_steps")]:
        with pytest.raises(ValueError, match=match):
            AdaptiveGradClipper(ps, **kw)
    with pytest.raises(ValueError, match="no parameters"):
        AdaptiveGradClipper([], "fixed", max_norm=1.0)
    with pytest.raises(ValueError, match="mode"):
        AdaptiveGradClipper(ps, "zclip").load_state_dict(AdaptiveGradClipper(ps, "fixed", max_norm=1.0).state_dict())
    with pytest.raises(ValueError, match="optimizer"):
        AdaptiveGradClipper(ps, "fixed", max_norm=1.0).step(scaler=torch.amp.GradScaler("cpu"))


# ============================================================================ telemetry
def test_telemetry_poll_ring_hooks_save_plot(tmp_path):
    named = _params(9, none_every=3)
    params = [p for _, p in named if p.grad is not None]
    written, lines = [], []

    class Writer:
        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

    stats = GradStats(ring=4, keep_history=True, hooks=[tensorboard_hook(Writer()), logger_hook(lines.append, every=2)])
    clip = AdaptiveGradClipper(named, "fixed", max_norm=2.0, telemetry=stats)
    assert stats.poll() == [] and stats.latest() is None
    gen = torch.Generator().manual_seed(1)
    for g in (1.0, 3.0, NAN):
        _set_norm(params, g, gen)
        clip.step()
        assert [r.step for r in stats.poll()] == [clip.state[0].item()]  # on CPU at once
    for g in (1.0,) * 3:  # three steps, one poll
        _set_norm(params, g, gen)
        clip.step()
    assert [r.step for r in stats.poll()] == [4, 5, 6] and stats.dropped == 0
    for g in (1.0,) * 6:  # six steps through a ring of four: two lost
        _set_norm(params, g, gen)
        clip.step()
    assert [r.step for r in stats.poll()] == [9, 10, 11, 12] and stats.dropped == 2
    rec = stats.history[2]  # the NaN step
    assert rec.skipped and math.isnan(rec.total_norm) and rec.coef == 1.0 and rec.threshold == 2.0
    assert rec.by_name()["layer0"]["nonfinite"] == 0 and rec.by_name()["layer1"]["nonfinite"] == 1
    assert rec.by_name()["layer2"] == {"norm": 0.0, "max_abs": 0.0, "nonfinite": 0}  # no gradient
    assert stats.history[1].coef == pytest.approx(2.0 / 3.0, rel=1e-5)
    # hooks: every step to the writer; the logger every 2nd step and every skipped one
    steps = sorted({s for t, _, s in written if t == "grad/total_norm"})
    assert steps == [r.step for r in stats.history]
    assert ("grad/norm/layer0", pytest.approx(stats.history[0].norm[0]), 1) in written
    assert [ln.split(":")[0] for ln in lines] == ["step 2", "step 3", "step 4", "step 6", "step 10", "step 12"]
    assert "SKIPPED" in lines[1] and "layer1 (1)" in lines[1]
    # save / load / plot
    path = tmp_path / "run.json"
    stats.save(path)
    back = GradStats.load(path)
    assert [r.step for r in back] == [r.step for r in stats.history]
    assert math.isnan(back[2].total_norm) and str(back[2].by_name()) == str(rec.by_name())
    png = tmp_path / "norms.png"
    plot_layer_norms(path, png, top=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stats.wait() == []  # nothing new


def test_logger_hook_default_logger(caplog):
    stats = GradStats(ring=2, hooks=[logger_hook()])
    clip = AdaptiveGradClipper(_params(2), "fixed", max_norm=1.0, telemetry=stats)
    with caplog.at_level(logging.INFO, logger="fusedstab"):
        clip.step()
        stats.poll()
    assert "step 1: grad norm" in caplog.text


def test_host_buffers_without_cuda():
    from fusedstab.utils.grad_stats import _host_like

    t = _host_like(torch.zeros(3, 2), pin=True)  # pinning needs CUDA; without it plain memory
    assert t.shape == (3, 2) and t.device.type == "cpu"


# ============================================================================ GPU (marked)
def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).cuda()


@pytest.mark.gpu
def test_gpu_whole_step_has_no_sync():
    """set_sync_debug_mode("error") over forward, backward, the clip with telemetry, the fused
    optimizer's skip-aware step and the telemetry poll; after warm-up steps (state, caches)."""
    model = _mlp(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    stats = GradStats(ring=8)
    clip = AdaptiveGradClipper(model.named_parameters(), "zclip", max_norm=10.0, warmup_steps=2, telemetry=stats)
    guard = SkipStep(opt)
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 64, device="cuda")
    recs = []

    def step(scale=1.0):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x * scale), y).backward()
        clip.step()
        guard.step(clip.found_inf)
        recs.extend(stats.poll())

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in (1.0, 1e3, float("nan"), 1.0):
            step(s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    recs += stats.wait()
    assert [r.step for r in recs] == list(range(1, 8))  # every step arrived, once, in order
    assert [r.skipped for r in recs] == [False] * 5 + [True, False] and not guard.last_step_read_flag
    assert recs[4].coef < 1.0  # the x1e3 step was clipped


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    """forward + backward + clip (zclip, telemetry) + fused Adam taking found_inf, captured once and
    replayed over new inputs (a NaN batch included), equals the same steps run eagerly."""
    xs = [torch.randn(32, 64, device="cuda") for _ in range(8)]
    xs[5][0, 0] = float("nan")
    y = torch.randn(32, 64, device="cuda")

    def setup():
        model = _mlp(1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=True)
        clip = AdaptiveGradClipper(model.named_parameters(), "zclip", max_norm=5.0, warmup_steps=2,
                                   telemetry=GradStats(ring=16))
        return model, opt, clip, SkipStep(opt)

    def train_step(model, opt, clip, guard, x):
        opt.zero_grad(set_to_none=False)  # grads keep their addresses (the cached chunk tables)
        torch.nn.functional.mse_loss(model(x), y).backward()
        clip.step()
        guard.step(clip.found_inf)

    m_e, o_e, c_e, g_e = setup()
    m_g, o_g, c_g, g_g = setup()
    for x in xs[:2]:  # warm-up: optimizer state, chunk tables
        train_step(m_e, o_e, c_e, g_e, x)
        train_step(m_g, o_g, c_g, g_g, x)
    static_x = xs[2].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # a side-stream warm-up, as torch's whole-network capture recipe
        train_step(m_g, o_g, c_g, g_g, static_x)
    torch.cuda.current_stream().wait_stream(s)
    train_step(m_e, o_e, c_e, g_e, static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(m_g, o_g, c_g, g_g, static_x)
    for x in xs[3:]:
        static_x.copy_(x)
        graph.replay()
        train_step(m_e, o_e, c_e, g_e, x)
        torch.testing.assert_close(c_g.found_inf, c_e.found_inf)
    torch.cuda.synchronize()
    for a, b in zip(m_g.parameters(), m_e.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_g.state, c_e.state, rtol=1e-6, atol=1e-9, equal_nan=True)
    recs = c_g.telemetry.wait()
    assert [r.skipped for r in recs][-3] and recs[-1].step == c_e.state[0].item()
