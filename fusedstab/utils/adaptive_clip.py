"""Adaptive, time-dependent gradient clipping with its state on the device: ``AdaptiveGradClipper``.

One ``step()`` after ``backward()``:
1. per-tensor reductions of every gradient, one multi-tensor pass per (device, dtype) group: the sum
   of squares (``fusedstab::multi_tensor_norm``) or, with telemetry, also max |x| and the count of
   non-finite elements from the same read (``fusedstab::grad_stats``); all-reduced over
   ``process_group`` (or a 1-D DTensor mesh) for sharded gradients;
2. one finishing program (``fusedstab::grad_clip_finish``): the total norm, the mode's threshold,
   the clip coefficient, the skip flag ``found_inf``, the mode's state update and the telemetry ring
   slot;
3. the scaling of every gradient by the coefficient (``fusedstab::multi_tensor_scale_``).
No ``.item()``, no host branch on a value: the step can run under ``torch.compile(fullgraph=True)``
and be captured in a CUDA graph (see ``mode="schedule"`` for the exception).

Modes (see fusedstab.reference.grad_clip_finish for the arithmetic):
- ``"fixed"``: ``max_norm`` (a float, or a tensor on the gradients' device: changed without
  recompiling or syncing), as torch.nn.utils.clip_grad_norm_;
- ``"schedule"``: ``max_norm`` is a callable of the step (0, 1, ...) returning a float or a tensor
  (evaluated on the host each step: not inside a CUDA graph, and a float recompiles a compiled step),
  or a tensor that the user updates in place;
- ``"zclip"``: ZClip (arXiv 2504.02507): an EMA of the norm's mean and variance; a norm whose
  z-score exceeds ``z_thresh`` is clipped to mean + z_thresh^2 std / z;
- ``"quantile"``: the ``quantile`` of the last ``window`` norms (AutoClip's percentile, over a window).
The adaptive modes clip at ``max_norm`` (None: not at all) during their first ``warmup_steps``
good steps, and never above it after.

Skip-step: a step whose total norm is NaN/Inf (``skip_nonfinite``) or above ``skip_above`` leaves
the gradients as they are, changes no statistic and sets ``found_inf`` (0-d float32, 1.0): hand it
to the optimizer with ``fusedstab.utils.SkipStep`` (a fused optimizer takes it as GradScaler's
found_inf; any other is restored on the device), or pass ``scaler=`` / ``optimizer=`` to ``step``
to merge it into ``torch.amp.GradScaler``'s flag.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .. import ops  # noqa: F401  (registers torch.ops.fusedstab.*)
from ..reference import WINDOW
from .clip_grad import _grouped, _inverse_permutation, _real_dtype, _unshard
from .grad_stats import GradStats
from .skip_step import merge_found_inf, unscale_once

_ops = torch.ops.fusedstab
MODES = ("fixed", "schedule", "zclip", "quantile")

__all__ = ["AdaptiveGradClipper"]


class AdaptiveGradClipper:
    """Global-norm (L2) gradient clipping of ``params`` (Parameters, or ``(name, Parameter)`` pairs
    such as ``model.named_parameters()``: the names label the telemetry) with a threshold that may
    change over time, a device-side skip flag and optional telemetry. See the module docstring."""

    def __init__(self, params: Iterable, mode: str = "fixed",
                 max_norm: Union[float, Tensor, Callable[[int], Union[float, Tensor]], None] = None, *,
                 warmup_steps: int = 25, z_thresh: float = 2.5, alpha: float = 0.97, eps: float = 1e-6,
                 quantile: float = 0.9, window: int = 128, skip_nonfinite: bool = True,
                 skip_above: Optional[float] = None, telemetry: Optional[GradStats] = None, process_group=None):
        items = list(params)
        if not items:
            raise ValueError("AdaptiveGradClipper: got no parameters")
        named = isinstance(items[0], tuple)
        self.names = [n for n, _ in items] if named else [str(i) for i in range(len(items))]
        self.params = [p for _, p in items] if named else items
        if mode not in MODES:
            raise ValueError(f"AdaptiveGradClipper: mode must be one of {MODES}, got {mode!r}")
        if mode == "fixed" and (max_norm is None or callable(max_norm) and not isinstance(max_norm, Tensor)):
            raise ValueError("AdaptiveGradClipper: mode='fixed' needs max_norm (a float or a tensor)")
        if mode == "schedule" and not (isinstance(max_norm, Tensor) or callable(max_norm)):
            raise ValueError("AdaptiveGradClipper: mode='schedule' needs max_norm as a callable of the step "
                             "or a tensor updated in place")
        if mode in ("zclip", "quantile") and callable(max_norm) and not isinstance(max_norm, Tensor):
            raise ValueError(f"AdaptiveGradClipper: mode={mode!r} takes max_norm as a float or tensor cap")
        checks = [(warmup_steps >= 0, "warmup_steps >= 0"), (z_thresh > 0, "z_thresh > 0"),
                  (0 <= alpha < 1, "0 <= alpha < 1"), (eps >= 0, "eps >= 0"), (0 <= quantile <= 1, "0 <= quantile <= 1"),
                  (window >= 1, "window >= 1"), (skip_above is None or skip_above > 0, "skip_above > 0"),
                  # ZClip's variance comes from its warm-up: with one norm it is 0 and every later
                  # step above the mean is clipped to it, for good
                  (mode != "zclip" or warmup_steps >= 2, "warmup_steps >= 2 for mode='zclip'")]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"AdaptiveGradClipper: expected {what}")
        self.mode = mode
        self.max_norm = max_norm
        self.hparams = dict(warmup=int(warmup_steps), z_thresh=float(z_thresh), alpha=float(alpha), eps=float(eps),
                            q=float(quantile), skip_nonfinite=bool(skip_nonfinite),
                            skip_above=math.inf if skip_above is None else float(skip_above))
        self.window = int(window) if mode == "quantile" else 0
        self.process_group = process_group
        self.telemetry = telemetry
        p0 = self.params[0]
        self.device = (p0.to_local() if hasattr(p0, "to_local") else p0).device
        self.state = torch.zeros(WINDOW + self.window, dtype=torch.float64, device=self.device)
        self.state[WINDOW:] = math.nan  # an empty window
        if telemetry is not None:
            telemetry.bind(self.names, self.device)
            self._rings = (telemetry.ring_tensors, telemetry.ring_scalars)
        else:
            self._rings = (torch.zeros(0, 3, len(self.params), device=self.device),
                           torch.zeros(0, 5, dtype=torch.float64, device=self.device))
        self._calls = 0  # host count of steps, for a schedule callable only
        self.total_norm = self.coef = self.threshold = None
        self.found_inf = torch.zeros((), dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ the step
    def _cap(self) -> tuple[Optional[Tensor], float]:
        m = self.max_norm
        if self.mode == "schedule" and not isinstance(m, Tensor):
            m = m(self._calls)
            self._calls += 1
        if isinstance(m, Tensor):
            return m.to(self.device).reshape(()), math.nan
        return None, math.inf if m is None else float(m)

    def _reductions(self, grads: list[Tensor], full: bool) -> Tensor:
        """(3 or 1, len(grads)): grad_stats or the sums of squares, in input order, on self.device."""
        acc = torch.float64 if any(_real_dtype(g) == torch.float64 for g in grads) else torch.float32
        parts, order = [], []
        for idx in _grouped(grads).values():
            group = [grads[i] for i in idx]
            r = _ops.grad_stats(group) if full else _ops.multi_tensor_norm(group, 2.0).unsqueeze(0)
            parts.append(r.to(self.device, acc))
            order += idx
        red = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        if order != list(range(len(grads))):
            red = red[:, _inverse_permutation(tuple(order), self.device)]
        return red

    @torch.no_grad()
    def step(self, scaler=None, optimizer=None) -> Tensor:
        """Clip the gradients in place; returns the total norm (before clipping; accumulation dtype).
        Sets ``found_inf``, ``total_norm``, ``coef`` and ``threshold`` (0-d device tensors).

        With ``scaler`` (an enabled torch.amp.GradScaler) and its ``optimizer``: unscales the
        gradients first (unless done already) and merges the skip flag into the scaler's, so that
        ``scaler.step(optimizer)`` skips a step that either found bad."""
        if scaler is not None and scaler.is_enabled():
            if optimizer is None:
                raise ValueError("AdaptiveGradClipper.step: scaler= needs the optimizer= it unscales")
            unscale_once(scaler, optimizer)
        full = self.telemetry is not None
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads, group = _unshard([self.params[i].grad for i in have], self.process_group)
        if grads:
            red = self._reductions(grads, full)
        else:
            red = torch.zeros(3 if full else 1, 0, device=self.device)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(red[:2], op=dist.ReduceOp.SUM, group=group)  # sums of squares, counts
            if full:
                dist.all_reduce(red[2], op=dist.ReduceOp.MAX, group=group)
                # a MAX all-reduce may drop a NaN (gloo does); a NaN anywhere made the sum NaN
                red[2] = torch.where(red[0].isnan(), red[0], red[2])
        if full and len(have) < len(self.params):  # rows for the parameters without a gradient: 0
            red = red.new_zeros(3, len(self.params)).index_copy_(1, _index(tuple(have), self.device), red)
        cap_t, cap_v = self._cap()
        h = self.hparams
        mode = "fixed" if self.mode == "schedule" else self.mode
        total, coef, found, thr = _ops.grad_clip_finish(
            red, self.state, cap_t, cap_v, mode, h["warmup"], h["z_thresh"], h["alpha"], h["eps"], h["q"],
            h["skip_nonfinite"], h["skip_above"], *self._rings)
        for (device, _), idx in _grouped(grads).items():
            _ops.multi_tensor_scale_([grads[i] for i in idx], coef.to(device), False)
        self.total_norm, self.coef, self.found_inf, self.threshold = total, coef, found, thr
        if scaler is not None and scaler.is_enabled():
            merge_found_inf(scaler, optimizer, found)
        return total

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"mode": self.mode, "state": self.state.detach().cpu().clone(), "calls": self._calls,
                "hparams": dict(self.hparams), "window": self.window}

    def load_state_dict(self, sd: dict) -> None:
        """Restore a ``state_dict()`` of a clipper of the same mode and window (written in place, so a
        captured CUDA graph keeps working)."""
        if sd["mode"] != self.mode or sd["window"] != self.window:
            raise ValueError(f"AdaptiveGradClipper.load_state_dict: saved mode {sd['mode']!r} window {sd['window']}, "
                             f"this clipper has {self.mode!r} window {self.window}")
        self.state.copy_(sd["state"])
        self._calls = int(sd["calls"])
        self.hparams.update(sd["hparams"])


@functools.lru_cache(64)
def _index(idx: tuple, device: torch.device) -> Tensor:
    """A cached device index (no host-to-device copy in steady state)."""
    return torch.tensor(idx, dtype=torch.int64).to(device)
