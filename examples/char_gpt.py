"""A small character-level GPT, eager torch vs fusedstab, on a text every Python ships with (the
reference topics of ``pydoc``, about 460 KB of English and code: no download).

Both models start from the same weights and see the same batches: the eager one is built from torch.nn
(LayerNorm, Linear, scaled_dot_product_attention), the fused one from fusedstab.nn.TransformerBlock
(pre-norm, the residual add fused with the norm, Linear + Leaky ReLU in one matmul, FlashAttention
kernels). Each step clips the global gradient norm (fusedstab.utils.clip_grad_norm_ for the fused
model). On a GPU they train under bf16 autocast and torch.compile; on CPU in fp32, eagerly, sized to
finish in a minute or two. The loss curves agree; the plot shows both.

    python examples/char_gpt.py                       # CPU by default, a GPU when there is one
    python examples/char_gpt.py --steps 2000 --compile --plot gpt_loss.png
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as TF

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fusedstab  # noqa: E402
from fusedstab.bench.train_step import GPT  # noqa: E402  (the model the train_step benchmark times)
from fusedstab.nn.torch_blocks import TorchTransformerBlock  # noqa: E402

# (d_model, layers, heads, context, batch, steps) on CPU and on a GPU
SIZES = {"cpu": (64, 2, 4, 64, 16, 150), "cuda": (384, 6, 6, 256, 64, 1000)}


def load_text() -> tuple[torch.Tensor, list[str]]:
    import pydoc_data.topics

    text = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    text = "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def batches(data, context, batch, seed, device):
    g = torch.Generator().manual_seed(seed)
    while True:
        i = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
        x = torch.stack([data[j:j + context] for j in i])
        y = torch.stack([data[j + 1:j + context + 1] for j in i])
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def main(argv=None) -> dict:
    parser = _common.common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile both models (default: on a GPU)")
    parser.add_argument("--size", choices=tuple(SIZES), default=None, help="model size (default: the device's)")
    parser.add_argument("--sample", type=int, default=120, help="characters to sample from the trained model")
    args = parser.parse_args(argv)
    dev = _common.device(args.device)
    d, layers, heads, context, batch, steps = SIZES[args.size or dev.type]
    steps = args.steps or steps
    compile_ = dev.type == "cuda" if args.compile is None else args.compile
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext())
    plot = os.path.join(os.getcwd(), "char_gpt_loss.png") if args.plot is None else args.plot

    data, chars = load_text()
    split = int(0.95 * len(data))
    torch.manual_seed(args.seed)
    eager = GPT(TorchTransformerBlock, torch.nn.LayerNorm, len(chars), d, layers, heads, context).to(dev)
    fused = GPT(fusedstab.nn.TransformerBlock, fusedstab.nn.LayerNorm, len(chars), d, layers, heads, context).to(dev)
    fused.load_state_dict(eager.state_dict())  # the same initial weights

    def make_step(model):
        fn = torch.compile(model) if compile_ else model
        return fn

    models = {}
    for name, model, clip in (("eager torch", eager, torch.nn.utils.clip_grad_norm_),
                              ("fusedstab", fused, fusedstab.utils.clip_grad_norm_)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3 if dev.type == "cpu" else 1e-3, weight_decay=0.1)
        models[name] = (model, opt, (make_step(model), clip))
    counter = {"step": 0}

    def step(model, opt, fns, batch_):
        fn, clip = fns
        x, y = batch_
        for group in opt.param_groups:
            group["lr"] = _common.cosine_lr(counter["step"] // len(models), steps, opt.defaults["lr"], steps // 10)
        counter["step"] += 1
        with autocast:
            loss = TF.cross_entropy(fn(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    title = f"char GPT ({layers}x{d}, context {context}) on {dev.type}{', compiled' if compile_ else ''}"
    result = _common.train_side_by_side(models, batches(data[:split], context, batch, args.seed, dev), step,
                                        steps, title)
    with torch.no_grad(), autocast:
        xv, yv = next(batches(data[split:], context, 4 * batch, args.seed + 1, dev))
        result["val_loss"] = {name: TF.cross_entropy(m(xv).float().flatten(0, 1), yv.flatten()).item()
                              for name, (m, _, _) in models.items()}
    _common.report(result, title, plot)
    print("  validation loss: " + ", ".join(f"{n} {v:.4f}" for n, v in result["val_loss"].items()))
    if args.sample:
        print("  sample (fusedstab): " + repr(sample(fused, chars, context, dev, autocast, args.sample)))
    return result


@torch.no_grad()
def sample(model, chars, context, dev, autocast, n=120):
    model.eval()
    idx = torch.tensor([[chars.index("T")]], device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    for _ in range(n):
        with autocast:
            logits = model(idx[:, -context:])[0, -1].float()
        nxt = torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=g)
        idx = torch.cat([idx, nxt[None]], 1)
    return "".join(chars[i] for i in idx[0].tolist())


if __name__ == "__main__":
    main()
