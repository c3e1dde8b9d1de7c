"""Cases for one whole training step of a model: forward, loss, backward, global-norm clip, AdamW step.

Models (fusedstab.nn blocks, and the same blocks in plain torch.nn from fusedstab.nn.torch_blocks,
from the same initial weights):
  gpt      a GPT-small-like decoder: 12 pre-norm TransformerBlocks (LayerNorm, causal attention, the
           Linear + Leaky ReLU MLP), width 768, 12 heads, sequence 1024, batch 8, vocab 50304
  convnet  a ResNet-18-like conv net: a stem and 4 stages of 2 basic blocks (ConvNormAct with BatchNorm
           and ReLU, ``out += identity``), widths 64..512, 224 x 224 images, batch 64, channels_last
On CPU (quick) both shrink to a few layers of width 64 / 16-32 channels; --tiny to one tiny layer.
fp16/bf16 (``--dtype``) runs under autocast with fp32 weights, as mixed-precision training does.

Mode ``step``: the whole step, timed per call (the model keeps training across calls). bytes: a lower
bound on the parameter-side traffic (weights read forward and backward, gradients written, read and
scaled by the clip, AdamW reading weights, gradients and two moments and writing three): activations
are left out, so GB/s means little here; TFLOP/s counts 6 x parameters x tokens plus attention (gpt)
and 3 x the convolutions' forward FLOPs (convnet). The first call's loss is checked against eager's.

Providers: ``eager`` (torch.nn blocks, torch's clip), ``compile`` (torch.compile of that model,
fullgraph), ``fusedstab-<backend>`` (fusedstab's blocks and clip).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as TF

from .case import TRAIN_MODES, Case, Config, Provider
from .providers import fusedstab_providers


# ----------------------------------------------------------------------------- models
class GPT(torch.nn.Module):
    def __init__(self, block, norm, vocab, d, layers, heads, seq):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(seq, d)
        self.blocks = torch.nn.ModuleList(block(d, heads, causal=True) for _ in range(layers))
        self.norm = norm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


class BasicBlock(torch.nn.Module):
    def __init__(self, cna, cin, cout, stride):
        super().__init__()
        self.a = cna(cin, cout, 3, stride)
        self.b = cna(cout, cout, 3, activation=None)
        self.proj = cna(cin, cout, 1, stride, activation=None) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.b(self.a(x))
        out += x if self.proj is None else self.proj(x)
        return TF.relu_(out)


class ConvNet(torch.nn.Module):
    def __init__(self, cna, widths, blocks, classes=1000):
        super().__init__()
        layers, c = [cna(3, widths[0], 3, 2)], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cna, c, w, 2 if j == 0 and i > 0 else 1))
                c = w
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def _conv_flops(model: ConvNet, image: int) -> int:
    """Forward FLOPs of the convolutions (2 per multiply-add) for one image (model on the meta device)."""
    total, hooks = 0, []

    def count(m, inp, out):
        nonlocal total
        total += 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(count))
    with torch.no_grad():
        model(torch.zeros(1, 3, image, image, device="meta"))
    for h in hooks:
        h.remove()
    return total


# ----------------------------------------------------------------------------- sizes
def _sizes(cfg: Config) -> dict:
    if cfg.tiny:
        return {"gpt": dict(vocab=64, d=32, layers=1, heads=2, seq=8, batch=2),
                "convnet": dict(widths=(8,), blocks=1, image=8, batch=2, classes=10)}
    if cfg.device == "cpu" and cfg.quick:
        return {"gpt": dict(vocab=512, d=64, layers=2, heads=4, seq=64, batch=4),
                "convnet": dict(widths=(16, 32), blocks=1, image=32, batch=8, classes=10)}
    return {"gpt": dict(vocab=50304, d=768, layers=12, heads=12, seq=1024, batch=8),
            "convnet": dict(widths=(64, 128, 256, 512), blocks=2, image=224, batch=64, classes=1000)}


def _build(name: str, fused: bool, s: dict, device: str) -> torch.nn.Module:
    import fusedstab.nn as fnn
    from fusedstab.nn import torch_blocks as tb

    torch.manual_seed(0)  # every provider starts from the same weights
    if name == "gpt":
        block, norm = (fnn.TransformerBlock, fnn.LayerNorm) if fused else (tb.TorchTransformerBlock, torch.nn.LayerNorm)
        model = GPT(block, norm, s["vocab"], s["d"], s["layers"], s["heads"], s["seq"])
    else:
        model = ConvNet(fnn.ConvNormAct if fused else tb.TorchConvNormAct, s["widths"], s["blocks"], s["classes"])
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


class Trainer:
    """A provider's model, optimizer and clip: ``step(x, y) -> loss`` (detached)."""

    def __init__(self, name, fused, s, cfg: Config, compiled=False):
        self.model = _build(name, fused, s, cfg.device)
        self.forward = torch.compile(self.model, fullgraph=True, dynamic=False) if compiled else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        if fused:
            from fusedstab.utils import clip_grad_norm_
        else:
            clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
        self.clip = clip_grad_norm_
        low = cfg.dtype in (torch.float16, torch.bfloat16)
        self.autocast = (functools.partial(torch.autocast, cfg.device, dtype=cfg.dtype) if low else
                         contextlib.nullcontext)

    def step(self, x, y):
        with self.autocast():
            logits = self.forward(x)
        loss = TF.cross_entropy(logits.float().flatten(0, -2), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.clip(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.detach()


def _step_thunk(make_trainer, inputs, _grads, mode):
    if mode != "step":
        raise ValueError(f"unknown train_step mode {mode!r}")
    trainer = make_trainer()
    return functools.partial(trainer.step, *inputs)


def _inputs(name, s, device):
    g = torch.Generator(device).manual_seed(0)
    if name == "gpt":
        x = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device, generator=g)
        return [x, torch.roll(x, -1, 1)], []
    x = torch.randn(s["batch"], 3, s["image"], s["image"], device=device, generator=g)
    y = torch.randint(0, s["classes"], (s["batch"],), device=device, generator=g)
    return [x.contiguous(memory_format=torch.channels_last), y], []


def train_step(cfg: Config) -> list[Case]:
    cases = []
    for name, s in _sizes(cfg).items():
        with torch.device("meta"):  # shapes only
            eager_model = _build(name, False, s, "meta")
        params = sum(p.numel() for p in eager_model.parameters())
        if name == "gpt":
            tokens = s["batch"] * s["seq"]
            flops = 6 * params * tokens + 6 * s["layers"] * s["batch"] * s["seq"] ** 2 * s["d"]  # causal: half of 12
            acts = tokens * s["d"] * s["layers"]
            shape = {"layers": s["layers"], "d": s["d"], "seq": s["seq"]}
        else:
            flops = 3 * s["batch"] * _conv_flops(eager_model, s["image"])
            acts = s["batch"] * s["widths"][0] * (s["image"] // 2) ** 2 * len(s["widths"]) * s["blocks"]
            shape = {"widths": "-".join(map(str, s["widths"])), "image": s["image"]}
        provs = {"eager": Provider(lambda n=name, s=s: Trainer(n, False, s, cfg))}
        skipped = {}
        if cfg.compile:
            provs["compile"] = Provider(lambda n=name, s=s: Trainer(n, False, s, cfg, compiled=True))
        else:
            skipped["compile"] = "torch.compile left out (--no-compile or --tiny)"
        fp, fs = fusedstab_providers(lambda _f, n=name, s=s: (lambda: Trainer(n, True, s, cfg)), cfg, acts)
        provs.update(fp)
        skipped.update(fs)
        row = {"model": name, "batch": s["batch"], "params": params, **shape,
               "dtype": str(cfg.dtype).removeprefix("torch.")}
        cases.append(Case("train_step", row, functools.partial(_inputs, name, s, cfg.device), provs,
                          {"step": 12 * params * 4}, flops={"step": flops}, skipped=skipped, modes=TRAIN_MODES,
                          thunk=_step_thunk, desc=_desc(name, s)))
    return cases


def _desc(name: str, s: dict) -> str:
    if name == "gpt":
        return f"GPT {s['layers']} x {s['d']}, sequence {s['seq']}, batch {s['batch']}"
    return f"conv net {'-'.join(map(str, s['widths']))}, {s['image']}x{s['image']}, batch {s['batch']}"
