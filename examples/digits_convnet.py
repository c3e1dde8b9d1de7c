"""A small conv net on scikit-learn's bundled digits (8x8 images, no download), eager torch vs fusedstab.

Both models start from the same weights and see the same batches: the eager one is built from
torch.nn (Conv2d, BatchNorm2d, ReLU), the fused one from fusedstab.nn.ConvNormAct (the ReLU inside the
BatchNorm kernels). Their training-loss curves agree to fp32 rounding; the plot shows both.

    python examples/digits_convnet.py                 # CPU by default, a GPU when there is one
    python examples/digits_convnet.py --steps 400 --plot digits_loss.png
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as TF

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fusedstab  # noqa: E402
from fusedstab.nn.torch_blocks import TorchConvNormAct  # noqa: E402


def make_model(fused: bool, device) -> torch.nn.Module:
    block = fusedstab.nn.ConvNormAct if fused else TorchConvNormAct
    return torch.nn.Sequential(block(1, 16, 3), block(16, 32, 3, stride=2), block(32, 32, 3, stride=2),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).to(device)


def load_digits(device):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    return (x[:1500].to(device), y[:1500].to(device)), (x[1500:].to(device), y[1500:].to(device))


def batches(x, y, batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            if len(idx) == batch_size:
                idx = idx.to(x.device)
                yield x[idx], y[idx]


def step(model, opt, clip, batch):
    x, y = batch
    loss = TF.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def main(argv=None) -> dict:
    args = _common.common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    dev = _common.device(args.device)
    steps = args.steps or 200
    plot = os.path.join(os.getcwd(), "digits_loss.png") if args.plot is None else args.plot
    torch.manual_seed(args.seed)
    (xtr, ytr), (xte, yte) = load_digits(dev)
    eager = make_model(False, dev)
    fused = make_model(True, dev)
    fused.load_state_dict(eager.state_dict())  # the same initial weights
    models = {}
    for name, model, clip in (("eager torch", eager, torch.nn.utils.clip_grad_norm_),
                              ("fusedstab", fused, fusedstab.utils.clip_grad_norm_)):
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4), clip)
    result = _common.train_side_by_side(models, batches(xtr, ytr, 64, args.seed), step, steps,
                                        f"digits conv net ({dev.type})")
    with torch.no_grad():
        for name, (model, _, _) in models.items():
            model.eval()
            acc = (model(xte).argmax(1) == yte).float().mean().item()
            result.setdefault("test_accuracy", {})[name] = acc
    _common.report(result, f"digits conv net, {steps} steps on {dev.type}", plot)
    print("  test accuracy: " + ", ".join(f"{n} {a:.3f}" for n, a in result["test_accuracy"].items()))
    return result


if __name__ == "__main__":
    main()
