"""A small model trained on CPU through a gradient spike and a NaN, with four clipping set-ups:

  fixed      AdaptiveGradClipper(mode="fixed", max_norm=1) as torch's clip_grad_norm_ behaves (the
             NaN is not skipped: skip_nonfinite=False)
  zclip      mode="zclip" (an EMA of the norm's mean and variance) + skip-step for NaN/Inf
  skip-step  mode="fixed", max_norm=1, and steps above a hard ceiling (skip_above) or non-finite are
             skipped: neither the parameters nor the Adam state move
  quantile   mode="quantile": the 0.9-quantile of the last 100 norms + skip-step for NaN/Inf

The model: a 3-layer MLP regressing a fixed random teacher network; Adam (fused: it takes the skip
flag on the device). At step SPIKE one batch has its targets scaled x300 (a corrupted batch); at step
NAN one input is NaN. Writes the loss curves and each run's per-layer gradient norms (from GradStats
telemetry) as PNGs, and prints a summary.

    python examples/stability.py [--out examples/stability] [--steps 300]
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from fusedstab.utils import AdaptiveGradClipper, GradStats, SkipStep, plot_layer_norms

SPIKE, NAN = 120, 200


def data(steps: int, batch: int = 64, d_in: int = 32, d_out: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(d_in, 64, generator=g) / d_in ** 0.5, torch.randn(64, d_out, generator=g) / 8]
    out = []
    for s in range(steps):
        x = torch.randn(batch, d_in, generator=g)
        y = torch.tanh(x @ teacher[0]) @ teacher[1]
        if s == SPIKE:
            y = y * 300.0  # a corrupted batch: a gradient ~300x the usual
        if s == NAN:
            x = x.clone()
            x[3, 5] = float("nan")
        out.append((x, y))
    return out


def model(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(),
                               torch.nn.Linear(128, 8))


SETUPS = {
    "fixed": dict(mode="fixed", max_norm=1.0, skip_nonfinite=False),
    "zclip": dict(mode="zclip", max_norm=None, warmup_steps=25, z_thresh=2.5, alpha=0.97),
    "skip-step": dict(mode="fixed", max_norm=1.0, skip_above=10.0),
    "quantile": dict(mode="quantile", max_norm=None, warmup_steps=25, quantile=0.9, window=100),
}


def train(name: str, batches) -> dict:
    net = model()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, fused=True)
    stats = GradStats(ring=16, keep_history=True)
    clip = AdaptiveGradClipper(net.named_parameters(), telemetry=stats, **SETUPS[name])
    guard = SkipStep(opt)
    losses = []
    t0 = time.perf_counter()
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        clip.step()
        guard.step(clip.found_inf)  # every set-up steps through SkipStep; "fixed" never sets the flag
        stats.poll()
        losses.append(loss.detach())
    stats.wait()
    return {"loss": torch.stack(losses).tolist(), "stats": stats, "seconds": time.perf_counter() - t0}


def clean_loss(losses, a, b):
    v = [x for x in losses[a:b] if math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(""))
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    batches = data(a.steps)
    runs = {name: train(name, batches) for name in SETUPS}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    finite = [v for r in runs.values() for v in r["loss"] if math.isfinite(v)]
    for (name, r), ls in zip(runs.items(), ("-", "--", ":", "-.")):
        ax.plot(r["loss"], lw=1.2, ls=ls, label=name)
    ax.set_ylim(min(finite) * 0.8, 0.5)  # the corrupted batch's own loss (~1e4) is off the top
    for s, what in ((SPIKE, "gradient spike"), (NAN, "NaN batch")):
        ax.axvline(s, color="grey", ls=":", lw=1)
        ax.text(s, 0.98, f" {what}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (NaN not drawn)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "loss.png", dpi=80)
    plt.close(fig)
    for name, r in runs.items():
        plot_layer_norms(r["stats"], a.out / f"norms_{name}.png", top=6, title=f"per-layer gradient norms: {name}",
                         dpi=80)

    print(f"{'set-up':10s} {'loss before':>12s} {'after spike':>12s} {'after NaN':>12s} {'final':>10s} "
          f"{'clipped':>8s} {'skipped':>8s} {'spike coef':>10s}")
    for name, r in runs.items():
        L, h = r["loss"], r["stats"].history
        clipped = sum(1 for s in h if s.coef < 1 and not s.skipped)
        spike = h[SPIKE]
        print(f"{name:10s} {clean_loss(L, SPIKE - 20, SPIKE):12.4g} {clean_loss(L, SPIKE + 1, SPIKE + 21):12.4g} "
              f"{clean_loss(L, NAN + 1, NAN + 21):12.4g} {clean_loss(L, len(L) - 20, len(L)):10.4g} {clipped:8d} "
              f"{sum(s.skipped for s in h):8d} {'skip' if spike.skipped else f'{spike.coef:.3g}':>10s}")
    print("wrote", ", ".join(str(p) for p in sorted(a.out.glob("*.png"))))


if __name__ == "__main__":
    main()
