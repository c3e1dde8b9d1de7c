"""What the examples share: the device, a progress bar, training two models side by side from the same
initial weights, and the loss plot."""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def progress(total: int, desc: str):
    """tqdm where it is installed, else a line every ~10%."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True)
    except ImportError:
        return _Lines(total, desc)


class _Lines:
    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.postfix, self.t0 = total, desc, 0, "", time.time()

    def update(self, k=1):
        self.n += k
        if self.n == self.total or self.n % max(1, self.total // 10) == 0:
            print(f"{self.desc}: {self.n}/{self.total} {self.postfix} ({time.time() - self.t0:.0f} s)", file=sys.stderr)

    def set_postfix_str(self, s):
        self.postfix = s

    def close(self):
        pass


def common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is a GPU)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the example's)")
    parser.add_argument("--plot", default=None, help="where to write the loss plot (PNG); '' for none")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def train_side_by_side(models: dict, batches, step_fn, steps: int, desc: str) -> dict:
    """Train each model (name -> (model, optimizer, step callable)) on the same batches; returns the
    losses per model and the seconds each spent in its steps."""
    losses = {name: [] for name in models}
    seconds = {name: 0.0 for name in models}
    bar = progress(steps, desc)
    for i, batch in zip(range(steps), batches):
        for name, (model, opt, fn) in models.items():
            if batch[0].is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss = step_fn(model, opt, fn, batch)
            losses[name].append(loss.item())  # the sync that ends the step
            seconds[name] += time.perf_counter() - t
        bar.set_postfix_str(" ".join(f"{n} {v[-1]:.4f}" for n, v in losses.items()))
        bar.update()
    bar.close()
    return {"losses": losses, "seconds": seconds}


def report(result: dict, title: str, plot: str | None) -> None:
    """Print how close the curves are and the time per model; write the plot."""
    losses = result["losses"]
    names = list(losses)
    a, b = losses[names[0]], losses[names[1]]
    rel = sorted(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
    print(f"{title}: final loss {names[0]} {a[-1]:.4f}, {names[1]} {b[-1]:.4f}; relative difference of the "
          f"{len(a)} losses: median {rel[len(rel) // 2]:.1e}, largest {rel[-1]:.1e}")
    for n in names:
        print(f"  {n}: {result['seconds'][n]:.1f} s in training steps")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for n, style in zip(names, ("-", "--")):
            ax.plot(range(1, len(losses[n]) + 1), losses[n], style, label=n)
        ax.set(xlabel="step", ylabel="training loss", title=title, yscale="log" if min(a + b) > 0 else "linear")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"  loss plot: {plot}")


def cosine_lr(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
