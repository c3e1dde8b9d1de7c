"""Errors every fusedstab norm shares with torch: the parameter dtype rule (torch's CPU rule, the same
for LayerNorm, RMSNorm, add + norm, GroupNorm and BatchNorm on every device), num_groups, and the
backend error that names the interpreter switch."""
import pytest
import torch
import torch.nn.functional as TF

import fusedstab
import fusedstab.functional as F

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ALLOWED = [(f32, f32), (f64, f64), (f16, f16), (bf16, bf16), (f16, f32), (bf16, f32)]
REFUSED = [(f32, f64), (f32, f16), (f32, bf16), (f16, f64), (f16, bf16), (bf16, f16), (f64, f32)]


def _norms(x, w):
    C = x.shape[1]
    rm, rv = torch.zeros(C, dtype=w.dtype), torch.ones(C, dtype=w.dtype)
    return {
        "layer_norm": lambda: F.layer_norm(x, (C,), w, w),
        "rms_norm": lambda: F.rms_norm(x, (C,), w),
        "add_layer_norm": lambda: F.add_layer_norm(x, x, (C,), w, w),
        "group_norm": lambda: F.group_norm(x, 2, w, w),
        "batch_norm": lambda: F.batch_norm(x, rm, rv, w, w, training=True),
    }


@pytest.mark.parametrize("xd,wd", ALLOWED, ids=[f"{x}-{w}" for x, w in ALLOWED])
def test_allowed_parameter_dtypes(xd, wd):
    x, w = torch.randn(4, 6).to(xd), torch.randn(6).to(wd)
    for name, call in _norms(x, w).items():
        out = call()
        assert (out[0] if isinstance(out, tuple) else out).dtype == xd, name


@pytest.mark.parametrize("xd,wd", REFUSED, ids=[f"{x}-{w}" for x, w in REFUSED])
def test_refused_parameter_dtypes_raise_as_torch_on_cpu(xd, wd):
    x, w = torch.randn(4, 6).to(xd), torch.randn(6).to(wd)
    with pytest.raises(RuntimeError):  # torch's CPU layer_norm and group_norm refuse these mixes too
        TF.layer_norm(x, (6,), w, w)
    for name, call in _norms(x, w).items():
        with pytest.raises(RuntimeError, match="mixed dtype"):
            call()


def test_mixed_parameters_among_themselves_are_refused():
    x = torch.randn(4, 6, dtype=f16)
    with pytest.raises(RuntimeError, match="mixed dtype.*weight torch.float32, bias torch.float16"):
        F.layer_norm(x, (6,), torch.ones(6), torch.zeros(6, dtype=f16))


@pytest.mark.parametrize("groups", [-2, 0])
def test_num_groups_must_be_positive(groups):
    x = torch.randn(2, 4, 3)
    if groups < 0:
        with pytest.raises(RuntimeError, match="Expected num groups to be greater than 0, got -2"):
            TF.group_norm(x, groups)
    with pytest.raises(RuntimeError, match=f"Expected num groups to be greater than 0, got {groups}"):
        F.group_norm(x, groups)


def test_triton_on_cpu_names_the_interpreter_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fusedstab.use_backend("triton"):
        with pytest.raises(fusedstab.BackendError, match="TRITON_INTERPRET=1"):
            F.group_norm(torch.randn(2, 4, 3), 2)
