"""Fused blocks and small models end to end: fusedstab.nn.TransformerBlock and ConvNormAct against
plain-torch twins with the same parameter names (same numbers from the same weights, state_dicts
interchangeable), torch.compile(fullgraph=True) of a block model, autocast, a ResNet-style block
(conv, BatchNorm, ReLU(inplace=True), ``out += identity``) training after replace_modules, eager and
compiled, and DDP with gloo in 2 processes.

Numbers: the fp32 block and its fp32 torch twin are both compared with the twin in float64; the
block's error may be at most 2x the twin's own plus a small floor.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF

import fusedstab
import fusedstab.nn as fnn

from helpers import init_gloo, rank_result, recorder, run_gloo_workers


# ----------------------------------------------------------------------------- plain-torch twins
class TorchAttention(torch.nn.Module):
    def __init__(self, d, h, hkv, qk_norm, causal):
        super().__init__()
        self.h, self.hkv, self.hd, self.causal = h, hkv, d // h, causal
        self.qkv = torch.nn.Linear(d, (h + 2 * hkv) * self.hd)
        self.proj = torch.nn.Linear(d, d)
        self.q_norm = torch.nn.RMSNorm(self.hd) if qk_norm else None
        self.k_norm = torch.nn.RMSNorm(self.hd) if qk_norm else None

    def forward(self, x, attn_mask=None):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).split([self.h * self.hd, self.hkv * self.hd, self.hkv * self.hd], -1)
        q, k, v = (t.view(B, L, -1, self.hd).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        o = TF.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=self.causal and attn_mask is None,
                                            enable_gqa=self.hkv != self.h)
        return self.proj(o.transpose(1, 2).reshape(B, L, -1))


class TorchMLP(torch.nn.Module):
    def __init__(self, d, d_ff, kind, slope):
        super().__init__()
        self.kind, self.slope = kind, slope
        self.fc1 = torch.nn.Linear(d, 2 * d_ff if kind == "swiglu" else d_ff)
        self.fc2 = torch.nn.Linear(d_ff, d)

    def forward(self, x):
        h = self.fc1(x)
        if self.kind == "leaky_relu":
            h = TF.leaky_relu(h, self.slope)
        elif self.kind == "gelu":
            h = TF.gelu(h)
        else:
            g, v = h.chunk(2, -1)
            h = TF.silu(g) * v
        return self.fc2(h)


class TorchBlock(torch.nn.Module):
    """The plain-torch block fusedstab.nn.TransformerBlock computes."""

    def __init__(self, d, h, d_ff=None, *, n_kv_heads=None, norm="layernorm", norm_first=True, qk_norm=False,
                 mlp="leaky_relu", negative_slope=0.01, causal=False):
        super().__init__()
        Norm = torch.nn.LayerNorm if norm == "layernorm" else torch.nn.RMSNorm
        self.norm_first = norm_first
        self.norm1 = Norm(d)
        self.attn = TorchAttention(d, h, n_kv_heads or h, qk_norm, causal)
        self.norm2 = Norm(d)
        self.mlp = TorchMLP(d, d_ff or 4 * d, mlp, negative_slope)

    def forward(self, x, attn_mask=None):
        if self.norm_first:
            h = x + self.attn(self.norm1(x), attn_mask)
            return h + self.mlp(self.norm2(h))
        h = self.norm1(x + self.attn(x, attn_mask))
        return self.norm2(h + self.mlp(h))


class TorchConvNormAct(torch.nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, norm="batch", num_groups=32, activation="relu", slope=0.01):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.norm = torch.nn.BatchNorm2d(cout) if norm == "batch" else torch.nn.GroupNorm(min(num_groups, cout), cout)
        self.activation, self.slope = activation, slope

    def forward(self, x):
        y = self.norm(self.conv(x))
        return {"relu": TF.relu, "silu": TF.silu, None: lambda t: t,
                "leaky_relu": lambda t: TF.leaky_relu(t, self.slope)}[self.activation](y)


def _randomize(m, seed=0):
    """Non-trivial norm weights and biases (they start at 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("weight") else
                        0.3 * torch.randn(p.shape, generator=g))
    return m


def _twins(fused_cls, torch_cls, *args, **kwargs):
    fused = _randomize(fused_cls(*args, **kwargs))
    twin = torch_cls(*args, **kwargs)
    twin.load_state_dict(fused.state_dict())
    return fused, twin


def _outputs_and_grads(model, x, dy, **kw):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x, **kw)
    y.backward(dy)
    return {"output": y.detach(), "dx": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


def _check_against_float64(fused, twin, x, dy, **kw):
    """fusedstab's fp32 results vs the twin in float64: error at most 2x the fp32 twin's own (+ a floor)."""
    got = _outputs_and_grads(fused, x, dy, **kw)
    want = _outputs_and_grads(twin, x, dy, **kw)
    truth = _outputs_and_grads(copy.deepcopy(twin).double(), x.double(), dy.double(), **kw)
    assert got.keys() == truth.keys()
    for name, t in truth.items():
        g, w = got[name], want[name]
        assert g.shape == t.shape and g.dtype == w.dtype, name
        err, err_torch = (g.double() - t).abs().max().item(), (w.double() - t).abs().max().item()
        assert err <= 2 * err_torch + 1e-6 * max(1.0, t.abs().max().item()), (name, err, err_torch)


BLOCKS = {
    "prenorm-layernorm-leaky_relu": dict(),
    "postnorm-rmsnorm-gelu": dict(norm="rmsnorm", norm_first=False, mlp="gelu"),
    "prenorm-rmsnorm-swiglu-qknorm-gqa-causal": dict(norm="rmsnorm", mlp="swiglu", qk_norm=True, n_kv_heads=1,
                                                   causal=True, d_ff=24),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_transformer_block_matches_torch_twin(name, op_backend):
    fused, twin = _twins(fnn.TransformerBlock, TorchBlock, 16, 4, **BLOCKS[name])
    x, dy = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    _check_against_float64(fused, twin, x, dy)


def test_transformer_block_with_mask_and_errors(op_backend):
    fused, twin = _twins(fnn.TransformerBlock, TorchBlock, 16, 2, mlp="gelu")
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True  # every query sees a key
    _check_against_float64(fused, twin, torch.randn(2, 5, 16), torch.randn(2, 5, 16), attn_mask=mask)
    with pytest.raises(ValueError, match="norm"):
        fnn.TransformerBlock(16, 2, norm="batchnorm")
    with pytest.raises(ValueError, match="mlp"):
        fnn.TransformerBlock(16, 2, mlp="relu6")
    with pytest.raises(ValueError, match="n_kv_heads"):
        fnn.TransformerBlock(16, 4, n_kv_heads=3)


CONVS = [("batch", "relu", False), ("batch", "silu", True), ("group", "leaky_relu", True), ("group", None, False)]


@pytest.mark.parametrize("norm,act,channels_last", CONVS, ids=[f"{n}-{a}-{'cl' if c else 'nchw'}" for n, a, c in CONVS])
def test_conv_norm_act_matches_torch_twin(norm, act, channels_last, op_backend):
    fused, twin = _twins(fnn.ConvNormAct, TorchConvNormAct, 3, 8, 3, 2, norm=norm, num_groups=4, activation=act)
    x, dy = torch.randn(2, 3, 7, 6), torch.randn(2, 8, 4, 3)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    for training in (True, False):
        fused.train(training), twin.train(training)
        _check_against_float64(fused, twin, x, dy)
    for k, v in twin.state_dict().items():  # running statistics as torch's
        torch.testing.assert_close(fused.state_dict()[k], v)


def test_state_dicts_interchange():
    for fused_cls, torch_cls, args in ((fnn.TransformerBlock, TorchBlock, (16, 4)),
                                       (fnn.ConvNormAct, TorchConvNormAct, (3, 8))):
        fused, twin = fused_cls(*args), _randomize(torch_cls(*args), seed=3)
        assert list(fused.state_dict()) == list(twin.state_dict())
        fused.load_state_dict(twin.state_dict())
        back = torch_cls(*args)
        back.load_state_dict(fused.state_dict())
        for a, b in zip(back.state_dict().values(), twin.state_dict().values()):
            assert torch.equal(a, b)


class TinyGPT(torch.nn.Module):
    def __init__(self, block_cls, layers=2, d=16, **kw):
        super().__init__()
        self.emb = torch.nn.Embedding(11, d)
        self.blocks = torch.nn.ModuleList(block_cls(d, 2, causal=True, **kw) for _ in range(layers))
        self.head = torch.nn.Linear(d, 11)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_compile_fullgraph_block_model():
    """torch.compile(fullgraph=True) of a model of blocks: no graph break; the numbers of eager. (The
    ops are opaque to the compiler: the backend does not matter here, the torch one is the quickest.)"""
    torch.manual_seed(0)
    model = TinyGPT(fnn.TransformerBlock, norm="rmsnorm", mlp="leaky_relu")
    idx = torch.randint(0, 11, (2, 6))
    with fusedstab.use_backend("torch"):
        eager = model(idx)
        eager.sum().backward()
        g_eager = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out = compiled(idx)
        out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip((p.grad for p in model.parameters()), g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_autocast_matches_torch_twin(device):
    """Under bf16 autocast the block runs its matmuls in bf16 (as torch's Linear does) and its norms
    as torch's do: the same output dtype as the twin, values within bf16 rounding of it."""
    fused, twin = _twins(fnn.TransformerBlock, TorchBlock, 32, 4, mlp="leaky_relu")
    fused, twin = fused.to(device), twin.to(device)
    x = torch.randn(2, 8, 32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16), fusedstab.use_backend("torch" if device == "cpu" else None):
        got, want = fused(x), twin(x)
        got.float().sum().backward()
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())


# ----------------------------------------------------------------------------- ResNet-style block
class BasicBlock(torch.nn.Module):
    """torchvision's ResNet BasicBlock: in-place ReLU on a norm's output and ``out += identity``."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def _resnet():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(inplace=True), BasicBlock(8), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 4))


def _train(model, steps=2, compiled=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step_model = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(4, 3, 5, 4, generator=g), torch.randint(0, 4, (4,), generator=g)
        loss = TF.cross_entropy(step_model(x), y)
        opt.zero_grad()
        loss.backward()
        fusedstab.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def _check_resnet_training(compiled):
    twin, model = _resnet(), _resnet()
    report = fnn.replace_modules(model, return_report=True)
    assert report.fused_activations == ["1 + 2 (relu)"] and isinstance(model[2], torch.nn.Identity)
    torch._dynamo.reset()
    want, got = _train(twin), _train(model, compiled=compiled)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_resnet_block_trains_after_conversion(op_backend):
    _check_resnet_training(compiled=False)


def test_resnet_block_trains_after_conversion_compiled():
    """Under torch.compile(fullgraph=True): the in-place ReLU and ``out += identity`` on the norms'
    outputs (the ops are opaque to the compiler: the quickest backend serves)."""
    with fusedstab.use_backend("torch"):
        _check_resnet_training(compiled=True)


# ----------------------------------------------------------------------------- DDP, 2 processes
WORLD = 2


def _ddp_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(fnn.ConvNormAct(3, 8, norm="group", num_groups=4, activation="silu"),
                               torch.nn.Flatten(2), _Transpose(), fnn.TransformerBlock(8, 2, causal=True),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 16, 3))


class _Transpose(torch.nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def _ddp_data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(4, 3, 4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)


def _ddp_worker(rank: int, init_file: str, out_dir: str, backends: list[str]) -> None:
    init_gloo(rank, init_file, WORLD)
    res: dict = {}
    record = recorder(res)
    x, y = _ddp_data()
    for backend in ("torch",):  # DDP's hooks and gloo are the point here; the kernels are tested elsewhere
        def step(backend=backend):
            with fusedstab.use_backend(backend):
                model = torch.nn.parallel.DistributedDataParallel(_ddp_model())
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                for _ in range(2):
                    loss = TF.cross_entropy(model(x[rank::WORLD]), y[rank::WORLD])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            return {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        record(backend, step)
    torch.save(res, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_gloo_two_processes(tmp_path):
    """Each rank trains on half the batch; DDP averages the gradients: the parameters after two steps
    are those of one process training on the whole batch (the mean loss), on every rank."""
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    results = run_gloo_workers(_ddp_worker, tmp_path, WORLD, timeout_s=300)
    x, y = _ddp_data()
    for backend in results[0]:
        with fusedstab.use_backend(backend):
            model = _ddp_model()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(2):
                loss = sum(TF.cross_entropy(model(x[r::WORLD]), y[r::WORLD]) for r in range(WORLD)) / WORLD
                opt.zero_grad()
                loss.backward()
                opt.step()
        for rank in range(WORLD):
            got = rank_result(results, rank, backend)
            for k, v in model.state_dict().items():
                torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{backend} {k}: {m}")
