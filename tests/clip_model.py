"""A plain-Python reimplementation of the adaptive clipping rules (scalars, if/else, lists), written
from the papers' descriptions rather than from fusedstab's code: the oracle of the finishing program's
tests (tests/test_grad_stats_ops.py, tests/test_adaptive_clip.py).

- fixed: threshold = cap.
- zclip (ZClip, arXiv 2504.02507, as its reference implementation): the first ``warmup`` good norms
  are collected, their mean and population variance start an EMA; then z = (g - mean) / (std + eps),
  a norm with z > z_thresh is clipped to mean + z_thresh * std / (z / z_thresh) (and the EMA takes
  that value), else the EMA takes g. ``cap`` bounds every threshold (max_grad_norm).
- quantile (AutoClip's percentile, over the last ``window`` good norms, this one included; linear
  interpolation as numpy / torch.quantile); cap before ``warmup`` good norms.
A step is skipped (found_inf = 1, coefficient 1, no statistic changes) when g is NaN/Inf
(skip_nonfinite) or g > skip_above. coef = min(threshold / (g + 1e-6), 1).
"""
from __future__ import annotations

import collections
import math


class PyClipper:
    def __init__(self, mode: str, cap: float = math.inf, warmup: int = 25, z_thresh: float = 2.5,
                 alpha: float = 0.97, eps: float = 1e-6, q: float = 0.9, window: int = 128,
                 skip_nonfinite: bool = True, skip_above: float = math.inf):
        self.mode, self.cap, self.warmup = mode, cap, warmup
        self.z_thresh, self.alpha, self.eps, self.q = z_thresh, alpha, eps, q
        self.skip_nonfinite, self.skip_above = skip_nonfinite, skip_above
        self.n = 0  # good norms seen
        self.buffer: list[float] = []
        self.mean = self.var = 0.0
        self.history = collections.deque(maxlen=window)

    @staticmethod
    def percentile(values, q: float) -> float:
        s = sorted(values)
        p = q * (len(s) - 1)
        lo = math.floor(p)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (p - lo) * (s[hi] - s[lo])

    def step(self, g: float, cap: float | None = None) -> tuple[float, float, bool]:
        """(threshold, coef, skipped) of a step whose total norm is ``g``."""
        cap = self.cap if cap is None else cap
        finite = math.isfinite(g)
        skip = (self.skip_nonfinite and not finite) or g > self.skip_above
        good = finite and not skip
        thr = cap
        if self.mode == "zclip":
            if self.n < self.warmup:
                if good:
                    self.buffer.append(g)
                    self.n += 1
                    if self.n == self.warmup:
                        self.mean = sum(self.buffer) / self.n
                        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / self.n
            else:
                std = math.sqrt(self.var)
                z = (g - self.mean) / (std + self.eps)  # inf for g = inf, NaN for NaN
                x = g
                if z > self.z_thresh:
                    x = self.mean + self.z_thresh * std / (z / self.z_thresh)
                    thr = min(x, cap)
                if good:
                    self.mean = self.alpha * self.mean + (1 - self.alpha) * x
                    self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
                    self.n += 1
        elif self.mode == "quantile":
            before = self.n
            if good:
                self.history.append(g)
                self.n += 1
            if before >= self.warmup and self.history:
                thr = min(self.percentile(self.history, self.q), cap)
        elif self.mode == "fixed":
            self.n += good
        else:
            raise ValueError(self.mode)
        if skip:
            return thr, 1.0, True
        coef = thr / (g + 1e-6)  # NaN for inf / inf or a NaN norm
        return thr, (1.0 if coef > 1.0 else coef), False
