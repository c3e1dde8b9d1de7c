"""torch.nn.utils-style helpers: gradient clipping; adaptive clipping, skip-step and gradient telemetry."""
from .adaptive_clip import AdaptiveGradClipper
from .clip_grad import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .grad_stats import GradStats, StepStats, logger_hook, plot_layer_norms, tensorboard_hook
from .skip_step import SkipStep, merge_found_inf, unscale_once

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm",
           "AdaptiveGradClipper", "GradStats", "StepStats", "SkipStep", "logger_hook", "merge_found_inf",
           "plot_layer_norms", "tensorboard_hook", "unscale_once"]
