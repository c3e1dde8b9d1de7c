"""Gradient telemetry that never stalls the device: ``GradStats``.

An ``AdaptiveGradClipper(..., telemetry=GradStats())`` writes, in its finishing program, one slot of
two device rings per step: per tensor [L2 norm, max |x|, non-finite count] (K, 3, T) float32, and
[step, total norm, threshold, clip coefficient, skipped] (K, 5) float64. ``poll()`` copies the rings
to (pinned, where CUDA is there) host memory with ``non_blocking=True`` and returns the steps that
an earlier copy brought back, never waiting for the device: on a GPU the steps arrive one poll later,
on CPU (a plain copy) at once. Poll at least every K - 1 steps to see every step (``dropped`` counts
the others).

Helpers: ``StepStats.by_name()`` (a dict by parameter name), ``tensorboard_hook`` and ``logger_hook``
(called with each new step), ``save`` / ``load`` (JSON) and ``plot_layer_norms`` (matplotlib PNG of
per-layer norms over steps, from a saved run).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import torch

__all__ = ["GradStats", "StepStats", "tensorboard_hook", "logger_hook", "plot_layer_norms"]


@dataclass
class StepStats:
    """One clipping step's telemetry (host values)."""

    step: int
    total_norm: float
    threshold: float
    coef: float
    skipped: bool
    norm: np.ndarray  # (T,) per-tensor L2 norm
    max_abs: np.ndarray  # (T,)
    nonfinite: np.ndarray  # (T,) count of NaN/Inf elements (exact below 2^24)
    names: list[str] = field(repr=False, default_factory=list)

    def by_name(self) -> dict[str, dict[str, float]]:
        """{parameter name: {"norm", "max_abs", "nonfinite"}}."""
        return {n: {"norm": float(a), "max_abs": float(b), "nonfinite": int(c)}
                for n, a, b, c in zip(self.names, self.norm, self.max_abs, self.nonfinite)}

    def to_json(self) -> dict:
        """Plain Python values (NaN/Inf stay floats: Python's json writes and reads them)."""
        return {"step": self.step, "total_norm": self.total_norm, "threshold": self.threshold, "coef": self.coef,
                "skipped": self.skipped, "norm": self.norm.tolist(), "max_abs": self.max_abs.tolist(),
                "nonfinite": self.nonfinite.tolist()}

    @classmethod
    def from_json(cls, d: dict, names: list[str]) -> "StepStats":
        return cls(d["step"], d["total_norm"], d["threshold"], d["coef"], bool(d["skipped"]),
                   np.array(d["norm"], dtype=np.float64), np.array(d["max_abs"], dtype=np.float64),
                   np.array(d["nonfinite"], dtype=np.int64), names)


class GradStats:
    """Device rings of the last ``ring`` steps' gradient statistics, filled by the clipper's own
    pass; ``poll()`` brings them to the host without a sync. ``hooks``: callables taking each new
    ``StepStats`` (see ``tensorboard_hook``, ``logger_hook``); ``keep_history``: keep every polled
    step in ``history`` (for ``save`` and ``plot_layer_norms``)."""

    def __init__(self, ring: int = 16, *, hooks: Iterable[Callable] = (), keep_history: bool = False):
        if ring < 1:
            raise ValueError(f"GradStats: ring must be >= 1, got {ring}")
        self.ring = int(ring)
        self.hooks = list(hooks)
        self.keep_history = keep_history
        self.history: list[StepStats] = []
        self.names: list[str] = []
        self.dropped = 0  # steps overwritten on the device before a copy reached them
        self.ring_tensors = self.ring_scalars = None
        self._last = 0  # the newest step returned
        self._latest: Optional[StepStats] = None
        self._buffers: list[dict] = []
        self._seq = 0

    # -- set up by the clipper
    def bind(self, names: list[str], device: torch.device) -> None:
        """Allocate the rings for ``len(names)`` tensors on ``device`` (the clipper calls this)."""
        T = len(names)
        if self.ring_tensors is not None and self.ring_tensors.shape[2] == T and self.ring_tensors.device == device:
            self.names = list(names)
            return
        self.names = list(names)
        self.ring_tensors = torch.zeros(self.ring, 3, T, dtype=torch.float32, device=device)
        self.ring_scalars = torch.zeros(self.ring, 5, dtype=torch.float64, device=device)
        pin = device.type == "cuda"
        self._buffers = [{"t": _host_like(self.ring_tensors, pin), "s": _host_like(self.ring_scalars, pin),
                          "event": None, "pending": False, "seq": 0} for _ in range(2)]

    # -- reading
    def poll(self) -> list[StepStats]:
        """The steps that earlier copies brought back (oldest first; each step once), after issuing
        the next copy. Never waits for the device."""
        if self.ring_scalars is None:
            return []
        new = self._collect()
        self._issue()
        if self.ring_scalars.device.type != "cuda":  # a plain, finished copy: read it now
            new += self._collect()
        return self._deliver(new)

    def wait(self) -> list[StepStats]:
        """Copy now and wait for it (one sync: e.g. at the end of a run), then deliver as poll."""
        if self.ring_scalars is None:
            return []
        for b in self._buffers:
            if b["pending"] and b["event"] is not None:
                b["event"].synchronize()
        new = self._collect()
        self._issue()
        for b in self._buffers:
            if b["pending"] and b["event"] is not None:
                b["event"].synchronize()
        return self._deliver(new + self._collect())

    def latest(self) -> Optional[StepStats]:
        """The newest step polled so far."""
        return self._latest

    def _issue(self) -> None:
        free = [b for b in self._buffers if not b["pending"]]
        if not free:  # both copies still in flight: the device is behind; skip this one
            return
        b = free[0]
        b["t"].copy_(self.ring_tensors, non_blocking=True)
        b["s"].copy_(self.ring_scalars, non_blocking=True)
        if self.ring_scalars.device.type == "cuda":
            b["event"] = torch.cuda.Event()
            b["event"].record()
        self._seq += 1
        b["pending"], b["seq"] = True, self._seq

    def _collect(self) -> list[StepStats]:
        out = []
        for b in sorted((b for b in self._buffers if b["pending"]), key=lambda b: b["seq"]):
            if b["event"] is not None and not b["event"].query():
                break  # copies finish in order
            b["pending"] = False
            out += self._parse(b["t"].numpy(), b["s"].numpy())
        return out

    def _parse(self, rt: np.ndarray, rs: np.ndarray) -> list[StepStats]:
        steps = rs[:, 0].astype(np.int64)
        order = [int(i) for i in np.argsort(steps) if steps[i] > self._last]
        if not order:
            return []
        first = int(steps[order[0]])
        self.dropped += max(0, first - self._last - 1)
        out = []
        for i in order:
            s = rs[i]
            out.append(StepStats(int(s[0]), float(s[1]), float(s[2]), float(s[3]), bool(s[4]),
                                 rt[i, 0].astype(np.float64), rt[i, 1].astype(np.float64),
                                 rt[i, 2].astype(np.int64), self.names))
        self._last = int(steps[order[-1]])
        return out

    def _deliver(self, new: list[StepStats]) -> list[StepStats]:
        for rec in new:
            for hook in self.hooks:
                hook(rec)
        if self.keep_history:
            self.history += new
        if new:
            self._latest = new[-1]
        return new

    # -- saving
    def save(self, path) -> None:
        """The polled history (``keep_history=True``) as JSON."""
        with open(path, "w") as f:
            json.dump({"names": self.names, "steps": [r.to_json() for r in self.history]}, f)

    @staticmethod
    def load(path) -> list[StepStats]:
        with open(path) as f:
            d = json.load(f)
        return [StepStats.from_json(s, d["names"]) for s in d["steps"]]


def _host_like(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A host buffer for copies of ``t``: pinned where CUDA can pin, else plain memory."""
    if pin:
        try:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(t.shape, dtype=t.dtype)


# ----------------------------------------------------------------------------- hooks
def tensorboard_hook(writer, prefix: str = "grad", per_tensor: bool = True) -> Callable[[StepStats], None]:
    """A hook writing each step's scalars (total_norm, threshold, coef, skipped) and, with
    ``per_tensor``, every parameter's norm, max |x| and non-finite count, to a TensorBoard
    ``SummaryWriter`` (anything with ``add_scalar(tag, value, step)``)."""
    def hook(r: StepStats) -> None:
        for k in ("total_norm", "threshold", "coef"):
            writer.add_scalar(f"{prefix}/{k}", getattr(r, k), r.step)
        writer.add_scalar(f"{prefix}/skipped", float(r.skipped), r.step)
        if per_tensor:
            for name, d in r.by_name().items():
                for k, v in d.items():
                    writer.add_scalar(f"{prefix}/{k}/{name}", v, r.step)
    return hook


def logger_hook(log: logging.Logger | Callable[[str], None] | None = None, every: int = 1,
                top: int = 3) -> Callable[[StepStats], None]:
    """A hook logging one line per ``every`` steps (and every skipped step): the total norm,
    threshold, coefficient, the ``top`` largest per-tensor norms, and the tensors with non-finite
    values. ``log``: a logging.Logger (INFO), a callable taking the line, or None (this module's
    logger)."""
    emit = (log.info if isinstance(log, logging.Logger) else log) or logging.getLogger("fusedstab").info

    def hook(r: StepStats) -> None:
        if r.step % every and not r.skipped:
            return
        names = r.names or [str(i) for i in range(len(r.norm))]
        big = sorted(range(len(r.norm)), key=lambda i: -np.nan_to_num(r.norm[i], nan=np.inf))[:top]
        line = (f"step {r.step}: grad norm {r.total_norm:.4g} threshold {r.threshold:.4g} coef {r.coef:.4g}"
                + (" SKIPPED" if r.skipped else "")
                + "; largest: " + ", ".join(f"{names[i]} {r.norm[i]:.3g}" for i in big))
        bad = [f"{names[i]} ({int(r.nonfinite[i])})" for i in range(len(r.norm)) if r.nonfinite[i]]
        emit(line + (f"; non-finite: {', '.join(bad)}" if bad else ""))
    return hook


# ----------------------------------------------------------------------------- plot
def plot_layer_norms(run, path, top: int | None = 12, title: str | None = None, dpi: int = 110):
    """A PNG of per-layer gradient norms over steps (the ``top`` layers by peak norm, log scale) over
    a panel of the total norm, the norm after clipping, the threshold and the skipped steps. ``run``: a GradStats with
    history, a list of StepStats, or the path of a ``GradStats.save`` file. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = run.history if isinstance(run, GradStats) else run if isinstance(run, list) else GradStats.load(run)
    if not recs:
        raise ValueError("plot_layer_norms: no steps to plot (GradStats(keep_history=True), then poll())")
    steps = np.array([r.step for r in recs])
    norms = np.stack([r.norm for r in recs])  # (steps, T)
    names = recs[0].names or [str(i) for i in range(norms.shape[1])]
    peak = np.nan_to_num(norms, nan=np.inf).max(0)
    keep = np.argsort(-peak)[:top] if top else np.arange(norms.shape[1])
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for i in keep:
        ax0.plot(steps, norms[:, i], lw=1, label=names[i])
    ax0.set_yscale("log")
    ax0.set_ylabel("per-layer grad norm")
    ax0.legend(fontsize=7, ncol=2, loc="upper right")
    total = np.array([r.total_norm for r in recs])
    after = np.array([np.nan if r.skipped else r.total_norm * min(r.coef, 1.0) for r in recs])
    thr = np.array([r.threshold for r in recs])
    ax1.plot(steps, total, lw=1, label="total norm")
    ax1.plot(steps, after, lw=1, ls="--", label="after clipping")
    ax1.plot(steps, np.where(np.isfinite(thr), thr, np.nan), lw=1, ls=":", label="threshold (where finite)")
    sk = [r.step for r in recs if r.skipped]
    for s in sk:
        ax1.axvline(s, color="red", alpha=0.4, lw=1)
    if sk:
        ax1.plot([], [], color="red", alpha=0.4, label="skipped step")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.legend(fontsize=7, loc="upper right")
    fig.suptitle(title or "gradient norms")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return fig
