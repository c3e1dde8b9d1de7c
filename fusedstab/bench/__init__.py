"""Benchmark harness behind ``python -m fusedstab.bench``.

Layout: ``case.py`` (Case, Provider, Config), ``timing.py`` (timers, copy bandwidth),
``providers.py`` (eager / torch.compile / fusedstab backends / peers), one module per op family
(``norms.py``, ``clip.py``, ``activation.py``, ``group_norm.py``, ``batch_norm.py``,
``attention.py``), ``runner.py`` (runs cases into result rows), ``report.py`` (table, JSON, plot).

To add an op: write ``fusedstab/bench/<family>.py`` with a function ``cfg -> list[Case]`` and add
it to ``OPS`` below. Modules are imported lazily so that one broken op never stops the others.
"""
from __future__ import annotations

import importlib

from .case import AUTOGRAD_MODES, CLIP_MODES, MODES, TRAIN_MODES, Case, Config, Provider

OPS = {
    "layer_norm": "fusedstab.bench.norms:layer_norm",
    "rms_norm": "fusedstab.bench.norms:rms_norm",
    "add_layer_norm": "fusedstab.bench.norms:add_layer_norm",
    "clip_grad_norm": "fusedstab.bench.clip:clip_grad_norm",
    "bias_leaky_relu": "fusedstab.bench.activation:bias_leaky_relu",
    "linear_leaky_relu": "fusedstab.bench.activation:linear_leaky_relu",
    "group_norm": "fusedstab.bench.group_norm:group_norm",
    "batch_norm": "fusedstab.bench.batch_norm:batch_norm",
    "attention": "fusedstab.bench.attention:attention",
    "train_step": "fusedstab.bench.train_step:train_step",
}


def load_cases(op: str, cfg: Config) -> list[Case]:
    module, fn = OPS[op].split(":")
    return getattr(importlib.import_module(module), fn)(cfg)


__all__ = ["AUTOGRAD_MODES", "CLIP_MODES", "MODES", "OPS", "TRAIN_MODES", "Case", "Config", "Provider", "load_cases"]
