import copy

import torch

import fusedstab


def test_replace_modules_swaps_norms_and_keeps_numbers():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.RMSNorm(16, eps=1e-6)))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 8)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fusedstab.nn.replace_modules(model) is model
    assert type(model[1]) is fusedstab.nn.LayerNorm
    assert type(model[3][1]) is fusedstab.nn.RMSNorm
    assert type(model[0]) is torch.nn.Linear
    assert model.state_dict().keys() == state.keys()
    torch.testing.assert_close(model(x), expected)
    model(x).sum().backward()
    assert model[1].weight.grad is not None and model[3][1].weight.grad is not None


def test_replace_modules_swaps_conv_norms_and_attention():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(2, 8),
                                torch.nn.Flatten(2), torch.nn.BatchNorm1d(8))
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    twin, twin_mha = copy.deepcopy(model), copy.deepcopy(mha)
    fusedstab.nn.replace_modules(model)
    fusedstab.nn.replace_modules(mha)
    assert [type(m) for m in model] == [torch.nn.Conv2d, fusedstab.nn.BatchNorm2d, fusedstab.nn.GroupNorm,
                                        torch.nn.Flatten, fusedstab.nn.BatchNorm1d]
    assert type(mha) is fusedstab.nn.MultiheadAttention
    assert model[1].activation is None and repr(model) == repr(twin)
    for _ in range(2):  # training steps: outputs and running statistics as torch's
        x, s = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 16)
        torch.testing.assert_close(model(x), twin(x))
        torch.testing.assert_close(mha(s, s, s, need_weights=False)[0], twin_mha(s, s, s, need_weights=False)[0])
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


# ============================================================================= the report, selection, state
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

import fusedstab.nn as fnn  # noqa: E402
from helpers import assert_matches  # noqa: E402


def _conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(inplace=True),
                               torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                               torch.nn.InstanceNorm2d(8), torch.nn.LayerNorm(4))


def test_report_by_type_and_backwards_compatible_return():
    model = _conv_net()
    assert fusedstab.nn.replace_modules(copy.deepcopy(model)).__class__ is torch.nn.Sequential  # returns the model
    report = fusedstab.nn.replace_modules(model, return_report=True)
    assert isinstance(report, fnn.ReplaceReport)
    assert dict(report.replaced) == {"torch.nn.BatchNorm2d -> fusedstab.nn.BatchNorm2d": ["1"],
                                     "torch.nn.GroupNorm -> fusedstab.nn.GroupNorm": ["4"],
                                     "torch.nn.LayerNorm -> fusedstab.nn.LayerNorm": ["7"]}
    assert dict(report.left) == {"InstanceNorm2d: no fusedstab kernel": ["6"]}
    assert report.fused_activations == ["1 + 2 (relu)", "4 + 5 (silu)"]
    assert (model[1].activation, model[4].activation) == ("relu", "silu")
    assert type(model[2]) is torch.nn.Identity and type(model[5]) is torch.nn.Identity
    assert "4 modules replaced" not in str(report) and "3 modules replaced" in str(report)


def test_include_exclude_and_verbose(capsys):
    model = _conv_net()
    report = fusedstab.nn.replace_modules(model, exclude=["GroupNorm", "7"], verbose=True, return_report=True)
    assert type(model[4]) is torch.nn.GroupNorm and type(model[7]) is torch.nn.LayerNorm
    assert type(model[5]) is torch.nn.SiLU  # its norm was left: nothing to fuse into
    assert report.left["GroupNorm: excluded"] == ["4"] and report.left["LayerNorm: excluded"] == ["7"]
    assert "fusedstab.nn.replace_modules: 1 modules replaced" in capsys.readouterr().out
    model = _conv_net()
    fusedstab.nn.replace_modules(model, include=[torch.nn.GroupNorm], fuse_activations=False)
    assert [type(m) for m in model][1:6] == [torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.Conv2d, fnn.GroupNorm,
                                             torch.nn.SiLU]


def test_keeps_parameters_buffers_mode_hooks_dtype_and_state_dict_keys():
    model = _conv_net()[:5].double().eval()
    calls = []
    model[1].register_forward_hook(lambda m, i, o: calls.append("bn"))
    model[2].register_forward_hook(lambda m, i, o: calls.append("relu"))  # a hooked activation is not fused
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = model(x)
    fusedstab.nn.replace_modules(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert list(model.state_dict()) == keys and not model.training and type(model[2]) is torch.nn.ReLU
    calls.clear()
    torch.testing.assert_close(model(x), expected)
    assert calls == ["bn", "relu"]


def test_transformer_encoder_fast_path_is_reported():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    report = fusedstab.nn.replace_modules(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                                          return_report=True)
    assert any("fast path" in n and "set_fastpath_enabled(False)" in n for n in report.notes)
    assert report.replaced["torch.nn.MultiheadAttention -> fusedstab.nn.MultiheadAttention"] == [
        "layers.0.self_attn", "layers.1.self_attn"]


def test_imports_no_other_library():
    """replace_modules on a torch model imports neither transformers nor timm."""
    code = ("import sys, torch, fusedstab; m = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.BatchNorm1d(4)); "
            "fusedstab.nn.replace_modules(m); print([k for k in ('transformers', 'timm', 'torchvision') "
            "if k in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "FUSEDSTAB_BUILD_EXT": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ============================================================================= timm / torchvision stand-ins
# Plain-torch copies of their norm classes (timm.layers.norm / norm_act, torchvision.ops.misc), whose
# real ones cannot import beside the CPU torch here; replace_modules finds them by base class and
# numerics, not by name, so the copies test the same path.
class LayerNorm(torch.nn.LayerNorm):  # timm.layers.LayerNorm
    def forward(self, x):
        return TF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(torch.nn.LayerNorm):  # timm.layers.LayerNorm2d and torchvision's LayerNorm2d
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = TF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GroupNormAct(torch.nn.GroupNorm):  # timm.layers.GroupNormAct
    def __init__(self, num_channels, num_groups=32, eps=1e-5, act_layer=torch.nn.ReLU, drop_layer=None):
        super().__init__(num_groups, num_channels, eps=eps)
        self.drop = drop_layer() if drop_layer is not None else torch.nn.Identity()
        self.act = act_layer(inplace=True) if act_layer is torch.nn.ReLU else act_layer()

    def forward(self, x):
        x = TF.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.act(self.drop(x))


class BatchNormAct2d(torch.nn.BatchNorm2d):  # timm.layers.BatchNormAct2d
    def __init__(self, num_features, act_layer=torch.nn.ReLU, momentum=0.1):
        super().__init__(num_features, momentum=momentum)
        self.drop = torch.nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = TF.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                          self.running_var if not self.training or self.track_running_stats else None,
                          self.weight, self.bias, bn_training, factor, self.eps)
        return self.act(self.drop(x))


class UnbiasedLayerNorm(torch.nn.LayerNorm):  # a near match: the unbiased variance
    def forward(self, x):
        v, m = torch.var_mean(x, -1, unbiased=True, keepdim=True)
        return (x - m) / torch.sqrt(v + self.eps) * self.weight + self.bias


def _timm_like_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), LayerNorm2d(8, eps=1e-6), GroupNormAct(8, 4),
                              BatchNormAct2d(8, torch.nn.SiLU), GroupNormAct(8, 2, act_layer=torch.nn.GELU),
                              BatchNormAct2d(8, torch.nn.LeakyReLU, momentum=None), torch.nn.Flatten(2),
                              LayerNorm(4 * 3, eps=1e-6), UnbiasedLayerNorm(12))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_timm_and_torchvision_norms(channels_last, op_backend):
    model, twin = _timm_like_net(), _timm_like_net()
    report = fusedstab.nn.replace_modules(model, return_report=True)
    kinds = [getattr(type(m), "_fusedstab_kind", None) for m in model]
    assert kinds == [None, "layer_norm_2d", "group_norm_act", "batch_norm_act", "group_norm_act", "batch_norm_act",
                     None, "layer_norm", None]
    assert [type(m).__name__ for m in model] == [type(m).__name__ for m in twin]
    assert isinstance(model[2], GroupNormAct) and repr(model) == repr(twin)
    assert list(report.left) == [f"{__name__}.UnbiasedLayerNorm: its forward differs from every fusedstab kind "
                                 "(checked on random probes)"]
    # float64: the same function to rounding, without fp32's sign flips at the ReLUs' kinks
    model, twin = model.double(), twin.double()
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    for training in (True, False):
        model.train(training), twin.train(training)
        got, want = _out_and_grads(model, x), _out_and_grads(twin, x)
        for name, w in want.items():
            torch.testing.assert_close(got[name], w, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name} {training}: {m}")
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


# ============================================================================= Hugging Face RMSNorm stand-ins
class LlamaRMSNorm(torch.nn.Module):  # transformers' Llama (Mistral, Qwen2/3, Phi-3, ...)
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class T5LayerNorm(LlamaRMSNorm):  # transformers' T5
    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class GemmaRMSNorm(torch.nn.Module):  # transformers' Gemma: the weight is offset by 1
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (output * (1.0 + self.weight.float())).type_as(x)


class EpsOutsideRMSNorm(LlamaRMSNorm):  # a near match: eps added to the rms, not the mean square
    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)


@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
                         ids=["fp32", "bf16-fp32w", "bf16", "fp16"])
def test_hugging_face_rms_norm_kinds(dtype, param_dtype):
    """Each class is recognised by its numerics: the right kind, the class's output dtype, its values within
    rounding (fp16/bf16: at most 2x the class's own error against float64, one rounding where it has two)."""
    classes = (LlamaRMSNorm, T5LayerNorm, GemmaRMSNorm, EpsOutsideRMSNorm)
    model = torch.nn.ModuleList(c(24) for c in classes)
    with torch.no_grad():
        for m in model:
            m.weight.normal_()
    twin = copy.deepcopy(model)
    model.to(param_dtype), twin.to(param_dtype)
    report = fusedstab.nn.replace_modules(model, return_report=True)
    assert [getattr(type(m), "_fusedstab_kind", None) for m in model] == ["rms_norm_llama", "rms_norm_t5",
                                                                          "rms_norm_gemma", None]
    assert [isinstance(m, c) for m, c in zip(model, classes)] == [True] * 4
    assert report.left == {f"{__name__}.EpsOutsideRMSNorm: its forward differs from every fusedstab kind "
                           "(checked on random probes)": ["3"]}
    x = (torch.randn(3, 5, 24) * torch.tensor([1.0, 1e-3, 10.0])[:, None, None]).to(dtype)
    g = torch.randn(3, 5, 24).to(dtype).float()  # exact in every dtype involved: the truth sees the same
    for m, t in list(zip(model, twin))[:3]:
        with fusedstab.use_backend("torch"):
            got = _out_and_grads(m, x, g)
        want = _out_and_grads(t, x, g)
        truth = _out_and_grads(copy.deepcopy(t).double(), x.double(), g.double())
        for name, w in want.items():  # the class's dtypes; within 2x its own error against float64
            assert_matches(got[name], truth[name], w, f"{type(t).__name__} {name}")


def _out_and_grads(model, x, g=None):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    g = torch.sin(torch.arange(out.numel(), dtype=torch.float64)).view(out.shape) if g is None else g
    out.backward(g.to(out.dtype))
    grads = {"output": out.detach(), "dx": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    model.zero_grad(set_to_none=True)
    return grads
