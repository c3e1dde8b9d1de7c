"""replace_modules(): switch a model's norms and attention to fusedstab's, in place, and say what it did.

Three kinds of module are converted, each by swapping the module's class (so parameters, buffers,
devices, dtypes, train/eval mode, hooks and state_dict keys stay as they are):

- exact torch.nn norms and MultiheadAttention: their fusedstab drop-in subclasses;
- classes from other libraries whose forward fusedstab computes (timm's and torchvision's torch.nn
  subclasses, Hugging Face's RMSNorm classes): a subclass of the module's own class (same name, so
  ``isinstance`` and repr are unchanged) whose forward is fused. Each is found by what its class is
  and then by its numerics: the class's own forward and fusedstab's are run on a small random probe
  (fp32, and for the RMSNorm kinds fp16/bf16 input or parameters: output dtype and values),
  and a class whose forward differs is left alone and reported, never swapped for a near match;
- Hugging Face attention: the model's ``attn_implementation`` is switched to "fusedstab"
  (fusedstab.integrations.transformers).

In an ``nn.Sequential``, an activation right after a fusedstab GroupNorm / BatchNorm (ReLU, SiLU,
LeakyReLU, without hooks) is fused into the norm's kernels and becomes ``nn.Identity``. Nothing
here imports transformers or timm: classes are recognised by their names and base classes.
"""
from __future__ import annotations

import collections
import fnmatch
import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .. import functional as F
from .attention import MultiheadAttention
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm, _BatchNorm
from .group_norm import GroupNorm
from .layer_norm import LayerNorm, RMSNorm

# torch.nn class -> fusedstab subclass with the same state (so swapping the class is enough; the fused
# activation, which torch's modules lack, starts as None).
_DROP_INS = {torch.nn.LayerNorm: LayerNorm, torch.nn.RMSNorm: RMSNorm, torch.nn.GroupNorm: GroupNorm,
             torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d,
             torch.nn.SyncBatchNorm: SyncBatchNorm, torch.nn.MultiheadAttention: MultiheadAttention}
_FUSED_TYPES = tuple(_DROP_INS.values())
# Activations a fusedstab GroupNorm / BatchNorm can run in its own kernels: module type -> (name, slope).
_ACTIVATIONS = {torch.nn.ReLU: lambda m: ("relu", 0.01), torch.nn.SiLU: lambda m: ("silu", 0.01),
                torch.nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope))}
# Modules worth reporting when left alone: norms and attention by name.
_NORM_OR_ATTENTION = re.compile(r"Norm|Attention|MultiheadAttention")


@dataclass
class ReplaceReport:
    """What ``replace_modules`` did, by type: ``replaced`` maps "OldType -> NewType" to the module
    names, ``left`` maps "Type: why" to the names of the norm and attention modules it left alone,
    ``fused_activations`` lists "norm + activation" pairs now one kernel, and ``notes`` what else the
    user should know (torch fast paths that bypass the replaced modules, the attention switch)."""

    replaced: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    left: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    fused_activations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def num_replaced(self) -> int:
        return sum(len(v) for v in self.replaced.values())

    def __str__(self) -> str:
        def names(v):
            shown = ", ".join(n or "<model>" for n in v[:4])
            return shown + (f", ... ({len(v)} in all)" if len(v) > 4 else "")

        lines = [f"fusedstab.nn.replace_modules: {self.num_replaced} modules replaced"]
        lines += [f"  replaced {k}: {names(v)}" for k, v in self.replaced.items()]
        lines += [f"  left {k}: {names(v)}" for k, v in self.left.items()]
        lines += [f"  fused activation: {p}" for p in self.fused_activations]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- fused forwards
def _eps(m) -> float:
    return float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))


def _rms(x, weight, eps, out_dtype):
    """rms_norm over the last dim computed in promote(x, out_dtype), returned in ``out_dtype``."""
    cd = torch.promote_types(x.dtype, out_dtype)
    half = cd in (torch.float16, torch.bfloat16)
    if weight is not None and weight.dtype != cd and not (half and weight.dtype == torch.float32):
        weight = weight.to(cd)
    return F.rms_norm(x.to(cd), (x.shape[-1],), weight, eps).to(out_dtype)


def _rms_llama(self, hidden_states):
    """Llama, Mistral, Qwen2/3, Phi-3, ...: ``weight * normalize(x.float()).to(x.dtype)``."""
    w = self.weight
    return _rms(hidden_states, w, _eps(self), torch.promote_types(w.dtype, hidden_states.dtype))


def _rms_t5(self, hidden_states):
    """T5: x * rsqrt(mean(x.float()^2) + eps), cast to a half weight's dtype, times weight."""
    w = self.weight
    h = torch.promote_types(hidden_states.dtype, torch.float32)
    out = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.promote_types(w.dtype, h)
    return _rms(hidden_states, w, _eps(self), out)


def _rms_gemma(self, x):
    """Gemma: ``(normalize(x.float()) * (1 + weight.float())).type_as(x)``."""
    w = 1.0 + self.weight.float()
    return _rms(x, w, _eps(self), x.dtype)


def _then_drop_act(m, y):
    """timm's norm + act modules: ``act(drop(y))`` where they have them."""
    drop, act = getattr(m, "drop", None), getattr(m, "act", None)
    y = y if drop is None else drop(y)
    return y if act is None else act(y)


def _layer_norm(self, input):
    """LayerNorm (timm's LayerNorm, and LayerNormAct with its drop and act after it)."""
    return _then_drop_act(self, F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps))


def _layer_norm_2d(self, x):
    """LayerNorm over the channels of NCHW input (torchvision's and timm's LayerNorm2d, LayerNormAct2d)."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
    return _then_drop_act(self, y.permute(0, 3, 1, 2))


def _fusable_activation(m):
    """(activation, slope, rest) for a norm module with timm's ``drop`` and ``act`` children: the
    activation to fuse (None when it cannot be) and what still has to run after the norm."""
    drop, act = getattr(m, "drop", None), getattr(m, "act", None)
    no_drop = drop is None or isinstance(drop, torch.nn.Identity)
    if act is None or (isinstance(act, torch.nn.Identity) and no_drop):
        return None, 0.01, None
    if no_drop and type(act) in _ACTIVATIONS and not _has_hooks(act):
        return (*_ACTIVATIONS[type(act)](act), None)
    return None, 0.01, (lambda y: act(drop(y))) if drop is not None else act


def _group_norm_act(self, x):
    """GroupNorm, then timm's drop and act (the act fused where it can be)."""
    act, slope, rest = _fusable_activation(self)
    y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, act, slope)
    return y if rest is None else rest(y)


def _batch_norm_act(self, x):
    """BatchNorm (torch's running-statistics logic), then timm's drop and act (fused where it can be)."""
    self._check_input_dim(x)
    act, slope, rest = _fusable_activation(self)
    factor, bn_training, running_mean, running_var = _BatchNorm._factor_and_buffers(self)
    y = F.batch_norm(x, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps, act, slope)
    return y if rest is None else rest(y)


@dataclass(frozen=True)
class _Kind:
    name: str
    forward: Callable
    applies: Callable  # module -> bool: the structure this forward needs
    probe_shape: Callable  # module -> input shape
    half_probes: bool = False  # also compare fp16/bf16 output dtypes and values


def _is_sub(base):
    return lambda m: isinstance(m, base) and type(m) not in _DROP_INS and type(m) not in _FUSED_TYPES


_RMS_NAME = re.compile(r"RMSNorm|RmsNorm|T5LayerNorm")  # T5LayerNorm (and MT5's, LongT5's) is an RMSNorm


def _rms_like(m) -> bool:
    """A class named like an RMSNorm with a 1-D weight, no bias and an eps (Hugging Face's, timm's)."""
    w = getattr(m, "weight", None)
    return (bool(_RMS_NAME.search(type(m).__name__)) and isinstance(w, torch.nn.Parameter) and w.dim() == 1
            and getattr(m, "bias", None) is None and (hasattr(m, "variance_epsilon") or hasattr(m, "eps"))
            and not isinstance(m, torch.nn.RMSNorm))


_KINDS = (
    _Kind("layer_norm", _layer_norm, _is_sub(torch.nn.LayerNorm), lambda m: (2, 3, *m.normalized_shape)),
    _Kind("layer_norm_2d", _layer_norm_2d,
          lambda m: _is_sub(torch.nn.LayerNorm)(m) and len(m.normalized_shape) == 1,
          lambda m: (2, m.normalized_shape[0], 3, 2)),
    _Kind("group_norm_act", _group_norm_act, _is_sub(torch.nn.GroupNorm), lambda m: (2, m.num_channels, 3, 2)),
    _Kind("batch_norm_act", _batch_norm_act, _is_sub(torch.nn.BatchNorm2d), lambda m: (3, m.num_features, 3, 2)),
    _Kind("rms_norm_llama", _rms_llama, _rms_like, lambda m: (2, 3, m.weight.shape[0]), half_probes=True),
    _Kind("rms_norm_t5", _rms_t5, _rms_like, lambda m: (2, 3, m.weight.shape[0]), half_probes=True),
    _Kind("rms_norm_gemma", _rms_gemma, _rms_like, lambda m: (2, 3, m.weight.shape[0]), half_probes=True),
)


# ----------------------------------------------------------------------------- probing by numerics
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(m) -> bool:
    return any(getattr(m, d, None) for d in _HOOK_DICTS)


def _probe_copy(m, gen, dtype):
    """A hook-free CPU copy of m whose floating parameters and buffers are random in ``dtype`` (variances
    positive), sharing nothing with m (works for modules on any device, meta included)."""
    p = object.__new__(type(m))
    d = dict(m.__dict__)
    for name in _HOOK_DICTS:
        if name in d:
            d[name] = collections.OrderedDict()

    def fresh(name, t, param):
        if t is None:
            return None
        if not t.is_floating_point():
            return torch.zeros(t.shape, dtype=t.dtype) if t.device.type == "meta" else t.detach().cpu().clone()
        v = torch.randn(t.shape, generator=gen)
        v = v.abs() + 0.5 if "var" in name else v
        v = v.to(dtype)
        return torch.nn.Parameter(v, requires_grad=False) if param else v

    d["_parameters"] = {k: fresh(k, v, True) for k, v in m._parameters.items()}
    d["_buffers"] = {k: fresh(k, v, False) for k, v in m._buffers.items()}
    d["_modules"] = {k: None if v is None else _probe_copy(v, gen, dtype) for k, v in m._modules.items()}
    p.__dict__.update(d)
    return p


def _probe_input(shape, gen, dtype):
    """Random values off zero mean, and a first sample scaled by 1e-3 so that eps matters (a class that
    ignores its eps, or adds it elsewhere, differs)."""
    x = torch.randn(shape, generator=gen) + 0.3
    x[0] *= 1e-3
    return x.to(dtype)


def _same(a, b, tol) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and torch.allclose(a.double(), b.double(), rtol=tol, atol=tol))


def _matches(m, kind: _Kind) -> bool:
    """The class's own forward and ``kind.forward`` agree on random probes (train and eval mode)."""
    from .. import backend

    cls = type(m)
    cases = [(torch.float32, torch.float32, 1e-5)]
    if kind.half_probes:
        for half in (torch.bfloat16, torch.float16):  # the output dtype rules differ between the kinds
            cases += [(half, torch.float32, 1e-2), (half, half, 1e-2), (torch.float32, half, 1e-2)]
    try:
        for x_dtype, p_dtype, tol in cases:
            for training in (True, False):
                ref, ours = (_probe_copy(m, torch.Generator().manual_seed(0), p_dtype) for _ in range(2))
                ref.train(training), ours.train(training)
                x = _probe_input(kind.probe_shape(m), torch.Generator().manual_seed(1), x_dtype)
                with torch.no_grad(), backend.use_backend("torch"):
                    want = cls.forward(ref, x.clone())
                    got = kind.forward(ours, x.clone())
                if not _same(got, want, tol):
                    return False
    except Exception:  # the class's forward needs more than one tensor, or another shape: not this kind
        return False
    return True


@functools.lru_cache(maxsize=None)
def _fused_class(cls, kind: _Kind):
    """A subclass of ``cls`` with the same name whose forward is ``kind.forward``."""
    return type(cls.__name__, (cls,), {"forward": kind.forward, "_fusedstab_kind": kind.name,
                                       "__doc__": f"{cls.__qualname__} computed by fusedstab ({kind.name})."})


def _kind_of(m, cache: dict):
    """The kind whose forward matches m's class (None if none), probed once per class and repr."""
    key = (type(m), repr(m))
    if key not in cache:
        cache[key] = next((k for k in _KINDS if k.applies(m) and _matches(m, k)), None)
    return cache[key]


# ----------------------------------------------------------------------------- selection
def _selector(patterns: Iterable | None):
    """Module types, or strings matched (fnmatch) against a module's qualified name or class name."""
    if patterns is None:
        return None
    if isinstance(patterns, (str, type)):
        patterns = [patterns]
    pats = list(patterns)

    def match(name: str, m) -> bool:
        for p in pats:
            if isinstance(p, type) and isinstance(m, p):
                return True
            if isinstance(p, str) and (fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(type(m).__name__, p)):
                return True
        return False
    return match


def _type_name(t) -> str:
    return t.__name__ if t.__module__.startswith(("torch.nn", "builtins")) else f"{t.__module__}.{t.__qualname__}"


def _short(t) -> str:
    mod = t.__module__
    if mod.startswith("fusedstab."):
        return f"fusedstab.nn.{t.__name__}"
    if mod.startswith("torch.nn"):
        return f"torch.nn.{t.__name__}"
    return f"{mod.split('.')[0]}.{t.__name__}"


def replace_modules(model: torch.nn.Module, include=None, exclude=None, verbose: bool = False,
                    fuse_activations: bool = True, return_report: bool = False):
    """Make ``model``'s norms and attention fusedstab's, in place (the model itself included):

    - torch.nn LayerNorm, RMSNorm, GroupNorm, BatchNorm1d/2d/3d, SyncBatchNorm, MultiheadAttention;
    - timm's and torchvision's subclasses of them whose forward fusedstab computes (timm ``LayerNorm``,
      ``LayerNorm2d``, ``GroupNormAct``, ``BatchNormAct2d``, torchvision ``LayerNorm2d``), with timm's
      activation fused into the norm where it is ReLU, SiLU or LeakyReLU;
    - Hugging Face RMSNorm classes (Llama, Mistral, Qwen2/3, Phi-3, ..., T5's ``T5LayerNorm``, Gemma's
      weight-offset RMSNorm), each checked against its class's own forward on random probes, and the
      model's attention (``attn_implementation="fusedstab"``) for transformers models;
    - with ``fuse_activations``, a ReLU / SiLU / LeakyReLU right after a GroupNorm or BatchNorm in an
      ``nn.Sequential`` runs in the norm's kernels (the activation module becomes ``nn.Identity``).

    Parameters, buffers, devices, dtypes, train/eval mode, hooks and state_dict keys are kept: each
    module keeps its identity, only its class changes. ``include`` / ``exclude``: module types, or
    patterns (fnmatch) of qualified module names ("encoder.layers.*") or class names ("BatchNorm2d",
    "*RMSNorm", "attention" for a transformers model's attention); a module is converted if it matches
    ``include`` (default: all) and not ``exclude``.

    Returns ``model`` (as before), or with ``return_report=True`` a :class:`ReplaceReport` of what
    was replaced and what was left, by type (``verbose=True`` prints it).
    """
    report = ReplaceReport()
    inc, exc = _selector(include), _selector(exclude)

    def wanted(name, m):
        return (inc is None or inc(name, m)) and (exc is None or not exc(name, m))

    cache: dict = {}
    hf_attention = collections.defaultdict(list)  # transformers attention modules, by class
    for name, m in model.named_modules():
        cls = type(m)
        if isinstance(m, _FUSED_TYPES) or getattr(cls, "_fusedstab_kind", None):
            continue  # already fusedstab's
        new = _DROP_INS.get(cls)
        kind = None if new is not None else (_kind_of(m, cache) if _candidate(m) else None)
        if new is None and kind is None:
            if cls.__module__.startswith("transformers.") and cls.__name__.endswith("Attention"):
                hf_attention[cls.__name__].append(name)
            elif _NORM_OR_ATTENTION.search(cls.__name__) or isinstance(m, _norm_bases()):
                report.left[f"{_type_name(cls)}: {_why_left(m)}"].append(name)
            continue
        if not wanted(name, m):
            report.left[f"{_type_name(cls)}: excluded"].append(name)
            continue
        if new is not None:
            m.__class__ = new
            if new not in (LayerNorm, RMSNorm, MultiheadAttention):
                m.activation, m.negative_slope = None, 0.01
            report.replaced[f"{_short(cls)} -> {_short(new)}"].append(name)
        else:
            m.__class__ = _fused_class(cls, kind)
            report.replaced[f"{_short(cls)} -> fused {kind.name}"].append(name)
    if fuse_activations:
        _fuse_sequential_activations(model, report, wanted)
    _transformers_attention(model, report, wanted, hf_attention)
    _fast_path_notes(model, report)
    if verbose:
        print(report)
    return report if return_report else model


def _norm_bases():
    return (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm,
            torch.nn.modules.normalization.LocalResponseNorm)


def _candidate(m) -> bool:
    """Worth probing: a subclass of a torch.nn norm, or a class named like an RMSNorm."""
    return isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)) or _rms_like(m)


def _why_left(m) -> str:
    if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm):
        return "no fusedstab kernel"
    if _candidate(m):
        return "its forward differs from every fusedstab kind (checked on random probes)"
    if "Attention" in type(m).__name__:
        return "attention fusedstab does not replace as a module (transformers models: attn_implementation)"
    return "no fusedstab equivalent"


def _fuse_sequential_activations(model, report, wanted):
    """[..., GroupNorm / BatchNorm (fusedstab, no activation), ReLU / SiLU / LeakyReLU, ...] in an
    nn.Sequential: the norm's output goes only to the activation, so the two can be one kernel."""
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, torch.nn.Sequential) or type(seq).forward is not torch.nn.Sequential.forward:
            continue  # a subclass with its own forward may use its children otherwise
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            norm, act = seq._modules[a], seq._modules[b]
            if not isinstance(norm, (GroupNorm, _BatchNorm)) or norm.activation is not None:
                continue
            act_name = f"{seq_name}.{b}" if seq_name else b
            if type(act) not in _ACTIVATIONS or _has_hooks(act) or _has_hooks(norm) or not wanted(act_name, act):
                continue
            norm.activation, norm.negative_slope = _ACTIVATIONS[type(act)](act)
            seq._modules[b] = torch.nn.Identity()
            report.fused_activations.append(f"{seq_name}.{a} + {act_name} ({norm.activation})".lstrip("."))


def _transformers_attention(model, report, wanted, modules: dict):
    """A transformers model: its attention layers (``modules``: class name -> module names) run
    fusedstab's kernels (attn_implementation "fusedstab")."""
    is_hf = type(model).__module__.startswith("transformers.") and hasattr(model, "set_attn_implementation")
    why = None
    if not is_hf:
        why = "not a transformers model: its attention is left as it is"
    elif not wanted("attention", _AttentionMarker()):
        why = "excluded"
    else:
        from ..integrations import transformers as hf

        before = getattr(getattr(model, "config", None), "_attn_implementation", None)
        try:
            hf.apply(model)
        except Exception as e:  # a model whose attention cannot take another implementation
            why = f"{type(e).__name__}: {e}"
    for cls_name, names in modules.items():
        if why is None:
            report.replaced[f"transformers.{cls_name} attention {before!r} -> 'fusedstab'"] += names
        else:
            report.left[f"transformers.{cls_name}: {why}"] += names


class _AttentionMarker:
    """Stands for a transformers model's attention in include / exclude ("attention")."""


def _fast_path_notes(model, report):
    """torch's inference fast paths that bypass the replaced modules."""
    layers = [n or "<model>" for n, m in model.named_modules() if isinstance(m, torch.nn.TransformerEncoderLayer)
              and any(isinstance(c, _FUSED_TYPES) for c in (m.self_attn, m.norm1, m.norm2))]
    if layers:
        report.notes.append(
            f"{len(layers)} TransformerEncoderLayer ({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}): "
            "in eval mode without autograd torch's inference fast path (torch._transformer_encoder_layer_fwd) runs "
            "the whole layer itself and bypasses the replaced modules; torch.backends.mha.set_fastpath_enabled(False) "
            "keeps fusedstab's kernels there")
    if any(isinstance(m, MultiheadAttention) for m in model.modules()):
        report.notes.append("MultiheadAttention: calls with need_weights=True (torch's default) run torch's own "
                            "forward, which returns the attention weights; need_weights=False runs fusedstab's kernels")
