"""Skip an optimizer step on a device flag, without reading the flag on the host: ``SkipStep``.

``found_inf`` is a 0-d float32 tensor, 1.0 to skip (``AdaptiveGradClipper.found_inf``, or anything
of GradScaler's convention). A skipped step leaves the parameters and the optimizer state bit for
bit as they were:
- an optimizer whose every param group is ``fused=True`` (Adam, AdamW, SGD, Adagrad on CPU and CUDA
  in torch 2.13) takes the flag the way GradScaler hands it over (``optimizer.found_inf``): its
  kernels skip the update and undo the step count, on the device;
- any other optimizer steps, then every parameter and state tensor it touched is put back where the
  flag says so (``torch.where`` from a copy taken before the step): two more reads and writes of
  parameters and state per step, no sync.
The host reads the flag (one sync) only on a step that cannot be undone on the device: one that
creates optimizer state (a parameter's first step: the state did not exist before), an optimizer
that keeps Python numbers in its state, or state tensors on another device than the flag (e.g.
Adam's CPU step counts with CUDA parameters unless ``capturable=True``). ``last_step_read_flag``
says whether the last step did.

With ``torch.amp.GradScaler``: ``unscale_once`` and ``merge_found_inf`` (used by
``AdaptiveGradClipper.step(scaler=, optimizer=)``) fold a flag into the scaler's, then
``scaler.step(optimizer)`` skips on either (and ``scaler.update()`` backs off its scale for both).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SkipStep", "merge_found_inf", "unscale_once"]


class SkipStep:
    """``SkipStep(optimizer).step(found_inf)``: ``optimizer.step()`` unless ``found_inf`` is 1."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.last_step_read_flag = False
        self._stateless: set[int] = set()  # parameters the optimizer keeps no state for
        self._backups: dict[int, Tensor] = {}

    def _fused(self) -> bool:
        o = self.optimizer
        return getattr(o, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in o.param_groups)

    @torch.no_grad()
    def step(self, found_inf: Tensor) -> None:
        opt = self.optimizer
        flag = found_inf.reshape(())
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        fresh = [p for p in params if not opt.state.get(p) and id(p) not in self._stateless]
        states = [opt.state[p] for p in params if opt.state.get(p)]
        host = bool(fresh) or any(
            not isinstance(v, Tensor) and v is not None or isinstance(v, Tensor) and v.device != flag.device
            for s in states for v in s.values())
        self.last_step_read_flag = host
        if host:
            if not bool(flag):  # the one host read (see the module docstring)
                opt.step()
            for p in fresh:
                if not opt.state.get(p):
                    self._stateless.add(id(p))
            return
        if self._fused():
            had = getattr(opt, "found_inf", None)
            opt.found_inf = flag.to(torch.float32)
            try:
                opt.step()
            finally:
                if had is None:
                    del opt.found_inf
                else:
                    opt.found_inf = had
            return
        # step, then put back what the flag says to keep
        live = [(None, None, p) for p in params] + [(s, k, v) for s in states for k, v in s.items()
                                                   if isinstance(v, Tensor)]
        backups = [self._backup(t) for _, _, t in live]
        torch._foreach_copy_(backups, [t for _, _, t in live])
        opt.step()
        keep = flag != 0
        for (s, k, t), b in zip(live, backups):
            now = t if s is None else s[k]
            if now is t:
                torch.where(keep, b, t, out=t)
            else:  # the optimizer put a new tensor in its state
                s[k] = torch.where(keep, b, now)

    def _backup(self, t: Tensor) -> Tensor:
        b = self._backups.get(id(t))
        if b is None or b.shape != t.shape or b.dtype != t.dtype or b.device != t.device:
            b = self._backups[id(t)] = torch.empty_like(t, memory_format=torch.preserve_format)
        return b


# ----------------------------------------------------------------------------- GradScaler
def _scaler_state(scaler, optimizer) -> dict:
    return scaler._per_optimizer_states[id(optimizer)]  # GradScaler keeps no public handle on it


def unscale_once(scaler, optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless it ran since the last ``update()``."""
    from torch.amp.grad_scaler import OptState

    if _scaler_state(scaler, optimizer)["stage"] is OptState.READY:
        scaler.unscale_(optimizer)


def merge_found_inf(scaler, optimizer, found_inf: Tensor) -> None:
    """Fold ``found_inf`` (1.0: skip) into the flags ``scaler.unscale_(optimizer)`` recorded, on the
    device (max, so a flag stays 0.0 or 1.0 as fused optimizers require)."""
    per_device = _scaler_state(scaler, optimizer)["found_inf_per_device"]
    if not per_device:
        raise RuntimeError("merge_found_inf: call scaler.unscale_(optimizer) first")
    for dev, f in per_device.items():
        torch.maximum(f, found_inf.to(dev, f.dtype).reshape(f.shape), out=f)
