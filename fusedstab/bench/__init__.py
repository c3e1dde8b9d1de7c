"""Benchmark harness behind ``python -m fusedstab.bench``.

Layout: ``case.py`` (Case, Provider, Config), ``timing.py`` (timers, copy bandwidth, matmul peak),
``providers.py`` (eager / torch.compile / fusedstab backends / peers, and what each one is), one module
per op, named after it (``layer_norm.py`` also holds rms_norm and add_layer_norm), ``runner.py`` (runs
cases into result rows), ``progress.py`` (progress bar, ETA), ``report.py`` (table, JSON, Markdown
page), ``plots.py`` (one matplotlib figure per op), ``__main__.py`` (the command line).

To add an op: write ``fusedstab/bench/<op>.py`` with a function ``<op>(cfg) -> list[Case]`` and add
it to ``OPS`` below. Modules are imported lazily so that one broken op never stops the others.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple


class OpInfo(NamedTuple):
    target: str  # "module:function" returning the op's cases
    what: str  # what is timed, one line (``--help``, report headings)
    shape: str  # the units of the cases' ``desc`` (the shape column's heading)
    x: str = ""  # the plot's size axis, where the cases have a numeric ``x``
    fuses: str = ""  # what fusedstab's kernel fuses (report headings)


OPS: dict[str, OpInfo] = {
    "layer_norm": OpInfo("fusedstab.bench.layer_norm:layer_norm", "F.layer_norm(x, (hidden,), w, b)",
                         "tokens x hidden", "hidden size (row length)",
                         "statistics, normalization and affine in one pass; dx, dw, db in one more"),
    "rms_norm": OpInfo("fusedstab.bench.layer_norm:rms_norm", "F.rms_norm(x, (hidden,), w)",
                       "tokens x hidden", "hidden size (row length)",
                       "statistic, normalization and scale in one pass; dx, dw in one more"),
    "add_layer_norm": OpInfo("fusedstab.bench.layer_norm:add_layer_norm",
                             "h = x + residual; F.layer_norm(h, (hidden,), w, b), h",
                             "tokens x hidden", "hidden size (row length)",
                             "the residual add into the LayerNorm pass (h written with y, not re-read)"),
    "clip_grad_norm": OpInfo("fusedstab.bench.clip_grad_norm:clip_grad_norm",
                             "torch.nn.utils.get_total_norm (norm) and clip_grad_norm_ (clip)",
                             "parameter list", "",
                             "the norm of every gradient in one launch per dtype; no host sync"),
    "bias_leaky_relu": OpInfo("fusedstab.bench.bias_leaky_relu:bias_leaky_relu",
                              "F.leaky_relu(x + bias, 0.01), bias along hidden or channels",
                              "tokens x hidden, or N x C x H x W and layout", "",
                              "the bias add into the activation; dbias into its backward"),
    "linear_leaky_relu": OpInfo("fusedstab.bench.linear_leaky_relu:linear_leaky_relu",
                                "F.leaky_relu(F.linear(x, w, b), 0.01)",
                                "tokens: in -> out features", "",
                                "bias and activation in the matmul's epilogue"),
    "group_norm": OpInfo("fusedstab.bench.group_norm:group_norm", "F.group_norm(x, groups, w, b), then SiLU or not",
                         "N x C x H x W, groups, layout, act", "",
                         "statistics, normalization, affine and activation in one kernel per pass"),
    "batch_norm": OpInfo("fusedstab.bench.batch_norm:batch_norm",
                         "F.batch_norm(x, ..., training=True), then ReLU / SiLU or not",
                         "N x C [x H x W], layout, act", "",
                         "statistics pass, then normalize + affine + activation + running stats"),
    "attention": OpInfo("fusedstab.bench.attention:attention",
                        "F.scaled_dot_product_attention(q, k, v, is_causal=...)",
                        "B x H x L x E", "sequence length L (B x L fixed)",
                        "FlashAttention: softmax online, the L x L scores never in memory"),
    "train_step": OpInfo("fusedstab.bench.train_step:train_step",
                         "a training step: forward, loss, backward, clip_grad_norm_, AdamW",
                         "model, batch", "",
                         "every fused op of the model (norms, attention, activations, the clip)"),
}


def load_cases(op: str, cfg) -> list:
    module, fn = OPS[op].target.split(":")
    return getattr(importlib.import_module(module), fn)(cfg)


def __getattr__(name):  # the case types import torch: only when asked for
    if name in ("AUTOGRAD_MODES", "CLIP_MODES", "MODES", "TRAIN_MODES", "Case", "Config", "Provider"):
        return getattr(importlib.import_module(".case", __name__), name)
    raise AttributeError(name)


__all__ = ["AUTOGRAD_MODES", "CLIP_MODES", "MODES", "OPS", "TRAIN_MODES", "Case", "Config", "OpInfo", "Provider", "load_cases"]
